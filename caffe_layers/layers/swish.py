"""Swish (BVLC; OpenCV dnn has it too): x * sigmoid(beta * x), beta from swish_param (default 1)."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Swish")
class Swish(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.beta = param.swish_param.beta

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)
