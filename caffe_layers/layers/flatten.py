"""Flatten: merge axes axis..end_axis into one."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Flatten")
class Flatten(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis, self.end_axis = param.flatten_param.axis, param.flatten_param.end_axis

    def forward(self, x):
        start = canonical_axis(self.axis, x.dim(), self.name)
        end = canonical_axis(self.end_axis, x.dim(), self.name)
        if end + 1 < start:
            raise ValueError(f"layer {self.name!r}: end_axis {self.end_axis} comes before axis {self.axis}")
        shape = list(x.shape)
        merged = 1
        for s in shape[start:end + 1]:
            merged *= s
        return x.reshape(shape[:start] + [merged] + shape[end + 1:])
