"""Concat: join the bottoms along one axis (axis, or the legacy concat_dim)."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, optional


class LegacyAxis:
    """`axis`, or the legacy field `legacy` (concat_dim, slice_dim: non-negative, no wrap-around)."""

    def __init__(self, layer_name, p, legacy):
        if p.HasField("axis") and p.HasField(legacy):
            raise ValueError(f"layer {layer_name!r}: give either axis or {legacy}, not both")
        self.layer_name, self.legacy = layer_name, legacy
        self.axis, self.legacy_value = p.axis, optional(p, legacy)

    def __call__(self, num_axes):
        if self.legacy_value is None:
            return canonical_axis(self.axis, num_axes, self.layer_name)
        if self.legacy_value >= num_axes:
            raise ValueError(f"layer {self.layer_name!r}: {self.legacy} {self.legacy_value} out of range "
                             f"for {num_axes}-axis bottoms")
        return self.legacy_value


@register("Concat")
class Concat(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self._axis = LegacyAxis(self.name, param.concat_param, "concat_dim")
        if not bottom_shapes:
            raise ValueError(f"layer {self.name!r}: Concat needs at least one bottom")
        # the same for every shape of that many axes; a single bottom is shared, its axis never read
        self.axis = self._axis(len(bottom_shapes[0])) if len(bottom_shapes) > 1 else None

    def top_shapes(self, bottom_shapes):
        first = tuple(bottom_shapes[0])
        if len(bottom_shapes) == 1:  # Caffe shares the bottom (the axis is not even checked)
            return [first]
        axis = self._axis(len(first))
        for i, s in enumerate(bottom_shapes[1:], 1):
            if len(s) != len(first) or any(s[j] != first[j] for j in range(len(first)) if j != axis):
                raise ValueError(f"layer {self.name!r}: bottom {i} has shape {list(s)}; all bottoms "
                                 f"must have shape {list(first)} except at axis {axis}")
        return [first[:axis] + (sum(s[axis] for s in bottom_shapes),) + first[axis + 1:]]

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return bottoms[0].view_as(bottoms[0])
        try:
            return torch.cat(bottoms, self.axis)
        except RuntimeError:  # bottoms of other sizes than the net was built for: say which, as Caffe
            self.top_shapes([b.shape for b in bottoms])
            raise
