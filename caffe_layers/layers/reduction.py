"""Reduction: SUM, ASUM, SUMSQ or MEAN over all axes from `axis` on, times coeff."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis
from caffe_layers.formats.proto import pb

OPS = pb.ReductionParameter


@register("Reduction")
class Reduction(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.reduction_param
        self.op, self.axis, self.coeff = p.operation, p.axis, p.coeff
        if self.op not in (OPS.SUM, OPS.ASUM, OPS.SUMSQ, OPS.MEAN):
            raise ValueError(f"layer {self.name!r}: unknown reduction operation {self.op}")

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        return [shape[:canonical_axis(self.axis, len(shape), self.name)]]

    def forward(self, x):
        axis = self.axis % x.dim()
        flat = x.reshape(tuple(x.shape[:axis]) + (-1,))  # reduces every axis from `axis` on
        if self.op == OPS.ASUM:
            out = flat.abs().sum(-1)
        elif self.op == OPS.SUMSQ:
            out = (flat * flat).sum(-1)
        else:
            out = flat.sum(-1)
        coeff = self.coeff / flat.shape[-1] if self.op == OPS.MEAN else self.coeff
        return out * coeff if coeff != 1 else out
