"""Divide (caffe-spn): top = 1 / bottom, with the original's clamping of values near zero.

Quirks of the original, kept by default (each has a divide_param option of ours):
- the clamp differs by device: Forward_cpu replaces exact zeros by 1e-4, the CUDA kernel replaces
  |x| < 1e-6 (negative ones too) by +1e-6. clamp: DEVICE (default) follows the tensor's device,
  clamp: CPU / GPU force one rule.
- the clamped value is written back into the bottom blob (modify_bottom: true), so later readers
  of that blob see it, as in Caffe.
- backward is -top_diff / x_clamped^2 also where x was clamped (the true gradient there is 0:
  true_gradient: true gives it).
divide_param.alpha is parsed but, as in the original, unused.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import pb


def clamp_mask(x, rule):
    """(mask of clamped entries, replacement value) for rule 'cpu' or 'gpu'."""
    if rule == "cpu":
        return x == 0, 1e-4
    wide = x.double()  # the kernel compares a float with the double literals 1e-6 and -1e-6
    return (wide < 1e-6) & (wide > -1e-6), 1e-6


class _Reciprocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, eps, true_gradient):
        xc = x.masked_fill(mask, eps)
        ctx.save_for_backward(xc, mask)
        ctx.true_gradient = true_gradient
        return 1 / xc

    @staticmethod
    def backward(ctx, dtop):
        xc, mask = ctx.saved_tensors
        grad = (-1 / (xc * xc)) * dtop  # the original's expression
        if ctx.true_gradient:
            grad = grad.masked_fill(mask, 0)
        return grad, None, None, None


@register("Divide")
class Divide(Layer):
    exact_bottoms = 1
    exact_tops = 1
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.divide_param
        self.clamp = pb.DivideParameter.Clamp.Name(p.clamp).lower()  # "device", "cpu" or "gpu"
        self.modify_bottom, self.true_gradient = p.modify_bottom, p.true_gradient

    def forward(self, x):
        rule = self.clamp if self.clamp != "device" else ("gpu" if x.device.type == "cuda" else "cpu")
        mask, eps = clamp_mask(x.detach(), rule)
        top = _Reciprocal.apply(x, mask, eps, self.true_gradient)
        if self.modify_bottom and x.device.type != "meta":  # the original writes into bottom data
            if x.requires_grad and torch.is_grad_enabled():
                x.data.masked_fill_(mask, eps)  # .data: not recorded by autograd (Caffe's diffs ignore the write)
            else:
                x.masked_fill_(mask, eps)  # a mutation torch.export sees (it cannot lift .data's tensor)
        return top

    def extra_repr(self):
        return f"{self.name!r}, clamp={self.clamp}"
