"""Silence: consumes its bottoms and has no tops (their diffs stay zero)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Silence")
class Silence(Layer):
    min_bottoms = 1
    exact_tops = 0

    def top_shapes(self, bottom_shapes):
        return []

    def forward(self, *bottoms):
        return ()
