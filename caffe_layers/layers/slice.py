"""Slice: split one bottom along an axis at slice_point positions, or into equal parts."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.concat import LegacyAxis


@register("Slice")
class Slice(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.slice_param
        self._axis = LegacyAxis(self.name, p, "slice_dim")
        self.slice_point = list(p.slice_point)
        self.num_tops = len(param.top)
        if self.num_tops < 1:
            raise ValueError(f"layer {self.name!r}: Slice needs at least one top")
        self.axis = self._axis(len(bottom_shapes[0]))  # the same for every shape of that many axes

    def sizes(self, shape):
        """(axis, size of each top along it) for a bottom of `shape`."""
        axis = self._axis(len(shape))
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

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        axis, sizes = self.sizes(shape)
        return [shape[:axis] + (s,) + shape[axis + 1:] for s in sizes]

    def forward(self, x):
        if self.num_tops == 1:  # Caffe shares the bottom
            return x.view_as(x)
        if self.slice_point:
            return tuple(x.tensor_split(self.slice_point, self.axis))
        return tuple(x.chunk(self.num_tops, self.axis))
