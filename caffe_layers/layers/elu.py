"""ELU: max(x, 0) + alpha * (exp(min(x, 0)) - 1).

Caffe's backward is dy * (x > 0 ? 1 : alpha + y), i.e. alpha at x = 0, as autograd gives here.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("ELU")
class ELU(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.alpha = param.elu_param.alpha

    def forward(self, x):
        neg = self.alpha * torch.expm1(torch.clamp(x, max=0))
        return torch.where(x > 0, x, neg)
