"""ReLU: max(0, x) + negative_slope * min(0, x)."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("ReLU")
class ReLU(Layer):
    exact_bottoms = 1
    exact_tops = 1
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = param.relu_param.negative_slope

    def lowered(self):
        return (torch.relu, ()) if self.negative_slope == 0 else (F.leaky_relu, (self.negative_slope,))

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)
