"""Flatten: merge axes axis..end_axis into one."""
import math

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Flatten")
class Flatten(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis, self.end_axis = param.flatten_param.axis, param.flatten_param.end_axis

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        start = canonical_axis(self.axis, len(shape), self.name)
        end = canonical_axis(self.end_axis, len(shape), self.name)
        if end + 1 < start:
            raise ValueError(f"layer {self.name!r}: end_axis {self.end_axis} comes before axis {self.axis}")
        return [shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]]

    def forward(self, x):
        return x.reshape(self.top_shapes([x.shape])[0])
