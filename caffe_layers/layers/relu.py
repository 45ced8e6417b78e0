"""ReLU: max(0, x) + negative_slope * min(0, x)."""
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("ReLU")
class ReLU(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = param.relu_param.negative_slope

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)
