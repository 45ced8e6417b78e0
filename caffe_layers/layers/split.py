"""Split: copies of one bottom; the diffs of the copies are summed in backward."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Split")
class Split(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.num_tops = len(param.top)

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])] * self.num_tops

    def forward(self, x):
        # Distinct views (not one object) so each top keeps its own diff in net.backward.
        return tuple(x.view_as(x) for _ in range(self.num_tops))
