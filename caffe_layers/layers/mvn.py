"""MVN: subtract the mean (and divide by the standard deviation) over each (num, channel) slice,
or over each num when across_channels.

Caffe's quirks (mvn_layer.cpp), kept:
- eps is added to the standard deviation, not the variance: y = (x - mean) / (sqrt(var) + eps).
- the top has the legacy 4-D shape (num, channels, height, width): a 2-D bottom gives an
  (N, C, 1, 1) top, and more than 4 axes is an error.
- with normalize_variance the backward is (dy - mean(dy) - mean(dy * y) * y) / (sqrt(var) + eps),
  which drops the factor (sqrt(var) + eps) / sqrt(var) of the true gradient's last term (it
  differs when eps is not negligible, and stays finite for a constant slice).
  mvn_param { exact_grad: true } (ours) gives the true gradient.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, legacy_shape


class _MVNCaffe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        y, std = _normalize(x, eps)
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, std = ctx.saved_tensors
        dx = dy - dy.mean(1, keepdim=True) - (dy * y).mean(1, keepdim=True) * y
        return dx / std, None


def _normalize(x, eps):
    xc = x - x.mean(1, keepdim=True)
    std = xc.pow(2).mean(1, keepdim=True).sqrt() + eps
    return xc / std, std


@register("MVN")
class MVN(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = p.eps
        self.exact_grad = p.exact_grad

    def top_shapes(self, bottom_shapes):
        if len(bottom_shapes[0]) > 4:
            raise ValueError(f"layer {self.name!r} (MVN): bottom must have at most 4 axes, got {list(bottom_shapes[0])}")
        return [legacy_shape(bottom_shapes[0])]

    def forward(self, x):
        shape = legacy_shape(x.shape)
        rows = shape[0] if self.across_channels else shape[0] * shape[1]
        flat = x.reshape(rows, -1)
        if not self.normalize_variance:
            y = flat - flat.mean(1, keepdim=True)
        elif self.exact_grad:
            y = _normalize(flat, self.eps)[0]
        else:
            y = _MVNCaffe.apply(flat, self.eps)
        return y.reshape(shape)
