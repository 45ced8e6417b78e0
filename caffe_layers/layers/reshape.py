"""Reshape: a new shape for the axes [axis, axis + num_axes); 0 copies a bottom dim, -1 is inferred."""
import math

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Reshape")
class Reshape(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.reshape_param
        self.dims = list(p.shape.dim)
        self.axis, self.num_axes = p.axis, p.num_axes
        if sum(d == -1 for d in self.dims) > 1:
            raise ValueError(f"layer {self.name!r}: reshape_param.shape may hold at most one -1, got {self.dims}")
        if any(d < -1 for d in self.dims):
            raise ValueError(f"layer {self.name!r}: reshape_param.shape dims must be >= -1, got {self.dims}")
        if self.num_axes < -1:
            raise ValueError(f"layer {self.name!r}: num_axes must be >= -1, got {self.num_axes}")

    def output_shape(self, shape):
        n = len(shape)
        start = self.axis if self.axis >= 0 else n + self.axis + 1  # axis -1 means "after the last"
        if not 0 <= start <= n:
            raise ValueError(f"layer {self.name!r}: axis {self.axis} out of range for a {n}-axis bottom")
        end = n if self.num_axes == -1 else start + self.num_axes
        if end > n:
            raise ValueError(f"layer {self.name!r}: axis {self.axis} + num_axes {self.num_axes} "
                             f"exceeds the {n} bottom axes")
        new = list(self.dims)
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= n:
                    raise ValueError(f"layer {self.name!r}: dim {i} is 0 (copy) but the bottom has no "
                                     f"axis {start + i}")
                new[i] = shape[start + i]
        top = list(shape[:start]) + new + list(shape[end:])
        total = math.prod(shape)
        if -1 in new:
            known = math.prod(d for d in top if d != -1)
            if known == 0 or total % known:
                raise ValueError(f"layer {self.name!r}: cannot infer the -1 dim of {self.dims} "
                                 f"for a bottom of shape {list(shape)}")
            top[start + new.index(-1)] = total // known
        if math.prod(top) != total:
            raise ValueError(f"layer {self.name!r}: shape {top} has {math.prod(top)} elements, "
                             f"the bottom {list(shape)} has {total}")
        return top

    def top_shapes(self, bottom_shapes):
        return [tuple(self.output_shape(tuple(bottom_shapes[0])))]

    def forward(self, x):
        return x.reshape(self.output_shape(tuple(x.shape)))
