"""Input: tops whose values the caller provides."""
from caffe_layers.errors import PrototxtError
from caffe_layers.formats.proto import check_blob_shape
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("Input")
class Input(Layer):
    exact_bottoms = 0
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        shapes = [tuple(s.dim) for s in param.input_param.shape]
        tops = len(param.top)
        if len(shapes) not in (1, tops):
            raise ValueError(f"layer {param.name!r}: input_param must give 1 or {tops} shapes, got {len(shapes)}")
        self.shapes = shapes * tops if len(shapes) == 1 else shapes
        for top, shape in zip(param.top, self.shapes):
            check_blob_shape(shape, f"layer {self.name!r}: top {top!r}", PrototxtError)

    def top_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):
        raise RuntimeError(f"Input layer {self.name!r} has no forward: the net feeds its tops")
