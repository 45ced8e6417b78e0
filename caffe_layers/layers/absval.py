"""AbsVal: |x|. Caffe's backward is dy * sign(x) with sign(0) = 0, which is torch.abs's."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("AbsVal")
class AbsVal(Layer):
    same_shape = True

    def forward(self, x):
        return torch.abs(x)
