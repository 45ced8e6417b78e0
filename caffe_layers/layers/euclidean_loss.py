"""EuclideanLoss: sum((a - b)^2) / (2 N); both bottoms get gradients."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, count


@register("EuclideanLoss")
class EuclideanLoss(Layer):
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if len(bottom_shapes) != 2:
            raise ValueError(f"layer {self.name!r}: EuclideanLoss takes 2 bottoms")

    def top_shapes(self, bottom_shapes):
        a, b = (tuple(s) for s in bottom_shapes)
        if a[:1] != b[:1] or count(a) != count(b):
            raise ValueError(f"layer {self.name!r}: bottoms {list(a)} and {list(b)} must have the same num and count")
        return [()]

    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2
