"""Sigmoid: 1 / (1 + exp(-x)); Caffe's backward dy * y * (1 - y) is autograd's."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Sigmoid")
class Sigmoid(Layer):
    same_shape = True

    def forward(self, x):
        return torch.sigmoid(x)
