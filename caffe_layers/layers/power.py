"""Power: y = (shift + scale * x) ^ power, with Caffe's backward formulas.

Caffe's backward (power_layer.cpp) is the true gradient except where the base is 0: for
shift == 0 it uses power * y / x and otherwise diff_scale * y / (shift + scale * x), giving
NaN/inf there (true gradient: 0 for power > 1). power_param { exact_grad: true } (ours) gives the
true gradient.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.exp import c_pow


class _PowerCaffe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, power, scale, shift):
        y = _forward(x, power, scale, shift)
        ctx.save_for_backward(x, y)
        ctx.consts = power, scale, shift
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.consts
        diff_scale = power * scale
        if diff_scale == 0:
            return torch.zeros_like(x), None, None, None
        if power == 1:
            grad = torch.full_like(x, diff_scale)
        elif power == 2:
            grad = (diff_scale * scale) * x + diff_scale * shift
        elif shift == 0:
            grad = power * (y / x)
        else:
            grad = diff_scale * (y / (scale * x + shift))
        return dy * grad, None, None, None


def _forward(x, power, scale, shift):
    if power * scale == 0:  # the input is ignored
        value = 1.0 if power == 0 else c_pow(shift, power)
        return torch.full_like(x, value)
    y = x * scale if scale != 1 else x.clone()
    if shift != 0:
        y = y + shift
    if power != 1:
        y = y.pow(power)
    return y


@register("Power")
class Power(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.exact_grad = p.exact_grad

    def forward(self, x):
        if self.exact_grad:
            return _forward(x, self.power, self.scale, self.shift)
        return _PowerCaffe.apply(x, self.power, self.scale, self.shift)
