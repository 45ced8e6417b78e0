"""BNLL: log(1 + exp(x)), computed as Caffe does; backward dy * e / (e + 1) with e = exp(min(x, 50))."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer

BNLL_THRESHOLD = 50.0


class _BNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        pos = x + torch.log1p(torch.exp(-x.abs()))
        return torch.where(x > 0, pos, torch.log1p(torch.exp(torch.clamp(x, max=0))))

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        # Caffe clamps the exponent at 50 (not the true gradient's sigmoid beyond that)
        e = torch.exp(torch.clamp(x, max=BNLL_THRESHOLD))
        return dy * e / (e + 1)


@register("BNLL")
class BNLL(Layer):
    same_shape = True

    def forward(self, x):
        return _BNLL.apply(x)
