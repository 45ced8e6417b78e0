"""Slice: split one bottom along an axis at slice_point positions, or into equal parts."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, optional


@register("Slice")
class Slice(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise ValueError(f"layer {self.name!r}: give either axis or slice_dim, not both")
        self.param_axis, self.slice_dim = p.axis, optional(p, "slice_dim")
        self.slice_point = list(p.slice_point)
        self.num_tops = len(param.top)
        if self.num_tops < 1:
            raise ValueError(f"layer {self.name!r}: Slice needs at least one top")

    def sizes(self, shape):
        """(axis, size of each top along it) for a bottom of `shape`."""
        if self.slice_dim is not None:
            if self.slice_dim >= len(shape):
                raise ValueError(f"layer {self.name!r}: slice_dim {self.slice_dim} out of range "
                                 f"for a {len(shape)}-axis bottom")
            axis = self.slice_dim
        else:
            axis = canonical_axis(self.param_axis, len(shape), self.name)
        dim = shape[axis]
        if self.slice_point:
            if len(self.slice_point) != self.num_tops - 1:
                raise ValueError(f"layer {self.name!r}: {len(self.slice_point)} slice_point values "
                                 f"for {self.num_tops} tops; expected {self.num_tops - 1}")
            if self.num_tops > dim:
                raise ValueError(f"layer {self.name!r}: {self.num_tops} tops but axis {axis} has size {dim}")
            bounds = [0] + self.slice_point + [dim]
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            if any(s <= 0 for s in sizes):
                raise ValueError(f"layer {self.name!r}: slice_point {self.slice_point} must increase "
                                 f"strictly within (0, {dim}) on axis {axis}")
        else:
            if dim % self.num_tops:
                raise ValueError(f"layer {self.name!r}: {self.num_tops} tops do not evenly divide "
                                 f"axis {axis} of size {dim}")
            sizes = [dim // self.num_tops] * self.num_tops
        return axis, sizes

    def forward(self, x):
        axis, sizes = self.sizes(tuple(x.shape))
        if self.num_tops == 1:  # Caffe shares the bottom
            return x.view_as(x)
        return tuple(x.split(sizes, axis))
