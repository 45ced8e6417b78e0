"""Tile: repeat the blob `tiles` times along `axis` (whole blocks from that axis on, like torch.repeat)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Tile")
class Tile(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.tile_param
        if not p.HasField("tiles"):
            raise ValueError(f"layer {self.name!r} (Tile): tile_param.tiles must be specified")
        if p.tiles <= 0:
            raise ValueError(f"layer {self.name!r} (Tile): tiles must be positive, got {p.tiles}")
        self.axis, self.tiles = p.axis, p.tiles

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        axis = canonical_axis(self.axis, len(shape), self.name)
        return [shape[:axis] + (shape[axis] * self.tiles,) + shape[axis + 1:]]

    def forward(self, x):
        axis = self.axis % x.dim()
        reps = [1] * x.dim()
        reps[axis] = self.tiles
        return x.repeat(*reps)
