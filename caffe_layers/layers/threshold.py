"""Threshold: 1 where x > threshold, else 0. Caffe has no backward for it (the top carries no gradient)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Threshold")
class Threshold(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.threshold = param.threshold_param.threshold

    def forward(self, x):
        return (x > self.threshold).to(x.dtype)
