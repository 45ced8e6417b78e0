"""TanH: tanh(x); Caffe's backward dy * (1 - y^2) is autograd's."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("TanH")
class TanH(Layer):
    same_shape = True

    def forward(self, x):
        return torch.tanh(x)
