"""Axpy (hujie-frank/SENet): top = a * x + y with bottoms a (N, C, 1, 1) or (N, C), x and y
(N, C, ...) of one shape; a scales x per image and channel (the squeeze-excitation rescale fused
with the residual sum). Backward is autograd (the true gradient, as the original's).
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Axpy")
class Axpy(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        where = f"layer {self.name!r} (Axpy)"
        if len(bottom_shapes) != 3:
            raise ValueError(f"{where}: takes 3 bottoms (a, x, y), got {len(bottom_shapes)}")
        a, x, y = bottom_shapes
        if tuple(x) != tuple(y) or len(x) < 2 or tuple(a[:2]) != tuple(x[:2]) or \
                (len(a) == 4 and tuple(a[2:]) != (1, 1)) or len(a) not in (2, 4):
            raise ValueError(f"{where}: needs a (N, C, 1, 1) or (N, C) and x, y of one shape (N, C, ...); "
                             f"got {[list(s) for s in bottom_shapes]}")

    def forward(self, a, x, y):
        return y + a.reshape(a.shape[:2] + (1,) * (x.dim() - 2)) * x
