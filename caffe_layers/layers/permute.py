"""Permute (SSD fork): reorder the axes by permute_param.order; axes it leaves out follow in
their own order. The top is a new tensor even when the order is the identity (the fork shares
the bottom's data then; the values are the same).
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Permute")
class Permute(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if len(bottom_shapes) != 1:
            raise ValueError(f"layer {self.name!r} (Permute): takes one bottom, got {len(bottom_shapes)}")
        num_axes = len(bottom_shapes[0])
        order = []
        for axis in param.permute_param.order:
            if axis >= num_axes:
                raise ValueError(f"layer {self.name!r} (Permute): order {axis} is not an axis of the "
                                 f"{num_axes}-axis bottom")
            if axis in order:
                raise ValueError(f"layer {self.name!r} (Permute): order repeats axis {axis}")
            order.append(axis)
        self.order = order + [a for a in range(num_axes) if a not in order]

    def forward(self, x):
        if x.dim() != len(self.order):
            raise ValueError(f"layer {self.name!r} (Permute): bottom has {x.dim()} axes, the order "
                             f"{self.order} needs {len(self.order)}")
        return x.permute(self.order).contiguous()
