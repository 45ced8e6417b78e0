"""InnerProduct: y = x W^T + b over the axes from `axis` on, flattened (transpose: y = x W)."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, count


@register("InnerProduct")
class InnerProduct(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.inner_product_param
        self.what = f"layer {param.name!r} (InnerProduct)"
        if p.num_output <= 0:
            raise ValueError(f"{self.what}: num_output must be positive, got {p.num_output}")
        shape = bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), param.name)
        self.K = count(shape, self.axis)
        self.N = p.num_output
        self.transpose = p.transpose
        self.bias_term = p.bias_term
        self.add_blob([self.K, self.N] if self.transpose else [self.N, self.K], p.weight_filler)
        if self.bias_term:
            self.add_blob([self.N], p.bias_filler)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) <= self.axis or count(shape, self.axis) != self.K:
            raise ValueError(f"{self.what}: input size incompatible with inner product parameters: bottom "
                             f"{list(shape)} must have {self.K} elements from axis {self.axis} on")
        return [shape[:self.axis] + (self.N,)]

    def forward(self, x):
        lead = tuple(x.shape[:self.axis])
        flat = x.reshape(-1, self.K)
        w, b = (self.param_blobs() + (None,))[:2]
        y = F.linear(flat, w.t() if self.transpose else w, b)
        return y.reshape(lead + (self.N,))

    def caffe_forward(self, bottoms, tops):
        """forward written into the top (engine/explicit.py): one addmm, as F.linear computes it."""
        w, b = (self.param_blobs() + (None,))[:2]
        x, y = bottoms[0].reshape(-1, self.K), tops[0].view(-1, self.N)
        w = w if self.transpose else w.t()
        if b is None:
            torch.mm(x, w, out=y)
        else:
            torch.addmm(b, x, w, out=y)

    def caffe_backward(self, tops, top_diffs, bottoms, propagate_down):
        """Caffe's Backward_cpu: dW += dy^T x (x^T dy where transpose), db += the column sums of dy, dx = dy W."""
        w, b = (self.param_blobs() + (None,))[:2]
        dy, x = top_diffs[0].reshape(-1, self.N), bottoms[0].reshape(-1, self.K)
        dw = torch.mm(x.t(), dy)  # (the products autograd takes: equal diffs)
        _param_diff(w).add_(dw if self.transpose else dw.t())
        if b is not None:
            _param_diff(b).add_(dy.sum(0))
        if not propagate_down[0]:
            return (None,)
        return (torch.mm(dy, w.t() if self.transpose else w).view(bottoms[0].shape),)


def _param_diff(blob):
    """A parameter blob's diff (its .grad), zeros where it has none yet."""
    if blob.grad is None:
        blob.grad = torch.zeros_like(blob)
    return blob.grad
