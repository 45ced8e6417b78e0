"""Softmax along `axis`; Caffe's backward (dy - sum(dy * y)) * y is autograd's."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Softmax")
class Softmax(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis = param.softmax_param.axis

    def top_shapes(self, bottom_shapes):
        canonical_axis(self.axis, len(bottom_shapes[0]), self.name)
        return [tuple(bottom_shapes[0])]

    def lowered(self):
        return torch.softmax, (self.axis,)

    def forward(self, x):
        return torch.softmax(x, self.axis)
