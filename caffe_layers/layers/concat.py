"""Concat: join the bottoms along one axis (axis, or the legacy concat_dim)."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, optional


@register("Concat")
class Concat(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise ValueError(f"layer {self.name!r}: give either axis or concat_dim, not both")
        if not bottom_shapes:
            raise ValueError(f"layer {self.name!r}: Concat needs at least one bottom")
        self.param_axis, self.concat_dim = p.axis, optional(p, "concat_dim")

    def _axis(self, num_axes):
        if self.concat_dim is not None:
            if self.concat_dim >= num_axes:
                raise ValueError(f"layer {self.name!r}: concat_dim {self.concat_dim} out of range "
                                 f"for {num_axes}-axis bottoms")
            return self.concat_dim
        return canonical_axis(self.param_axis, num_axes, self.name)

    def forward(self, *bottoms):
        if len(bottoms) == 1:  # Caffe shares the bottom (the axis is not even checked)
            return bottoms[0].view_as(bottoms[0])
        first = bottoms[0].shape
        axis = self._axis(len(first))
        for i, b in enumerate(bottoms[1:], 1):
            if b.dim() != len(first) or any(b.shape[j] != first[j] for j in range(len(first)) if j != axis):
                raise ValueError(f"layer {self.name!r}: bottom {i} has shape {list(b.shape)}; all bottoms "
                                 f"must have shape {list(first)} except at axis {axis}")
        return torch.cat(bottoms, axis)
