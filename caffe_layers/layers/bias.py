"""Bias: y = x + b, b broadcast over x's axes [axis, axis + b.dim()); b is a learned blob or bottom 1.

Shape rules (bias_layer.cpp, shared with Scale): the blob's shape is x.shape[axis:axis + num_axes]
(num_axes -1: to the end, 0: a scalar); a 0-axis b applies to every element, whatever axis says.
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis
from caffe_layers.formats.proto import pb


def operand_shape(layer, kind, bottom_shape, axis, num_axes):
    """The shape of a learned Bias/Scale blob for a bottom of `bottom_shape`."""
    axis = canonical_axis(axis, len(bottom_shape), layer.name)
    if num_axes < -1:
        raise ValueError(f"layer {layer.name!r}: num_axes must be non-negative, or -1 to extend to the end "
                         f"of bottom[0], got {num_axes}")
    if num_axes >= 0 and axis + num_axes > len(bottom_shape):
        raise ValueError(f"layer {layer.name!r}: {kind} blob's shape extends past bottom[0]'s shape "
                         f"{list(bottom_shape)} when applied starting with axis {axis} over {num_axes} axes")
    end = len(bottom_shape) if num_axes == -1 else axis + num_axes
    return tuple(bottom_shape[axis:end])


def check_operand(layer, kind, bottom_shape, operand_shape, axis):
    """Reshape-time check that an operand of `operand_shape` fits bottom[0] from `axis` on."""
    if not operand_shape:
        return
    axis = canonical_axis(axis, len(bottom_shape), layer.name)
    if tuple(bottom_shape[axis:axis + len(operand_shape)]) != tuple(operand_shape):
        raise ValueError(f"layer {layer.name!r}: {kind} of shape {list(operand_shape)} does not match bottom[0] "
                         f"shape {list(bottom_shape)} from axis {axis}")


def broadcast_operand(x, operand, axis):
    """`operand` reshaped to broadcast against x from `axis` on (axis 0 for a 0-axis operand)."""
    if operand.dim() == 0:
        return operand
    if axis < 0:
        axis += x.dim()
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * (x.dim() - axis - operand.dim()))


@register("Bias")
class Bias(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.bias_param
        self.axis = p.axis
        if len(self.bottom_shapes) not in (1, 2):
            raise ValueError(f"layer {self.name!r} (Bias): takes 1 or 2 bottoms, got {len(self.bottom_shapes)}")
        if len(self.bottom_shapes) == 1:
            shape = operand_shape(self, "bias", self.bottom_shapes[0], p.axis, p.num_axes)
            self.add_blob(shape, p.filler if p.HasField("filler") else pb.FillerParameter())

    def top_shapes(self, bottom_shapes):
        bias = bottom_shapes[1] if len(bottom_shapes) == 2 else self.blobs[0].shape
        check_operand(self, "bias", bottom_shapes[0], bias, self.axis)
        return [tuple(bottom_shapes[0])]

    def forward(self, x, *rest):
        b = rest[0] if rest else self.param_blobs()[0]
        return x + broadcast_operand(x, b, self.axis)
