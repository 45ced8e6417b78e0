"""Scale: y = x * s (+ b), s broadcast over x's axes [axis, axis + s.dim()) as in Bias.

s is a learned blob (filler, default constant 1) or bottom 1; with bias_term the bias blob
follows Bias's rules with num_axes = scale_param.num_axes (or bottom 1's axis count) and
bias_filler (default constant 0). Blobs: [scale, bias] or, with two bottoms, [bias].
Backward is autograd's, which is Caffe's formula. One difference: Caffe's Backward_cpu
overwrites (not accumulates) the scale blob's diff when outer_dim == 1 with more than one
scale, or when the scale is as large as the bottom; that shows only with iter_size > 1 or a
shared scale blob. Here the diff always accumulates.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.bias import broadcast_operand, check_operand, operand_shape
from caffe_layers.formats.proto import pb


@register("Scale")
class Scale(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.scale_param
        n = len(self.bottom_shapes)
        if n not in (1, 2):
            raise ValueError(f"layer {self.name!r} (Scale): takes 1 or 2 bottoms, got {n}")
        self.axis, self.bias_term = p.axis, p.bias_term
        x_shape = self.bottom_shapes[0]
        if n == 1:
            shape = operand_shape(self, "scale", x_shape, p.axis, p.num_axes)
            filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant", value=1)
            self.add_blob(shape, filler)
        if self.bias_term:
            num_axes = len(self.bottom_shapes[1]) if n == 2 else p.num_axes
            shape = operand_shape(self, "bias", x_shape, p.axis, num_axes)
            self.add_blob(shape, p.bias_filler if p.HasField("bias_filler") else pb.FillerParameter())

    def top_shapes(self, bottom_shapes):
        x = bottom_shapes[0]
        check_operand(self, "scale", x, bottom_shapes[1] if len(bottom_shapes) == 2 else self.blobs[0].shape,
                      self.axis)
        if self.bias_term:
            check_operand(self, "bias", x, self.blobs[-1].shape, self.axis)
        return [tuple(x)]

    def forward(self, x, *rest):
        blobs = self.param_blobs()
        scale = broadcast_operand(x, rest[0] if rest else blobs[0], self.axis)
        if self.bias_term:  # x * scale + bias in one pass
            return torch.addcmul(broadcast_operand(x, blobs[-1], self.axis), x, scale)
        return x * scale
