"""Eltwise: PROD, SUM (with one coeff per bottom) or MAX of two or more same-shaped bottoms.

MAX follows eltwise_layer.cpp: bottom 0 wins over bottom 1 only if strictly greater (a tie
goes to bottom 1); later bottoms win only if strictly greater than the running max (a tie
keeps the earlier one). The gradient goes to the winner only.
PROD's gradient is the product of the other bottoms (stable_prod_grad, the default); with
stable_prod_grad: false it is y / x_i as in Caffe (NaN/inf where x_i = 0).
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, leaf_function
from caffe_layers.layers.relu import eager_without_autograd
from caffe_layers.formats.proto import pb

OP = pb.EltwiseParameter


class _ProdByDivision(torch.autograd.Function):
    """y = prod(x_i); dx_i = dy * y / x_i (Caffe with stable_prod_grad: false)."""

    @staticmethod
    def forward(ctx, *xs):
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, *xs = ctx.saved_tensors
        return tuple(dy * (y / x) for x in xs)


def weighted_sum(xs, coeffs, into_first=False):
    """sum of c * x, left to right, each term in one pass (Caffe's axpy); into_first writes it into xs[0]."""
    y = xs[0]
    if coeffs[0] != 1:
        y = y.mul_(coeffs[0]) if into_first else y * coeffs[0]
    for c, x in zip(coeffs[1:], xs[1:]):
        y = y.add_(x, alpha=c) if into_first else torch.add(y, x, alpha=c)
    return y


@leaf_function
def sum_into_first(*args):
    """Eltwise SUM of (bottoms..., coeffs, layer name), written into the first bottom where eager_without_autograd
    (TorchNet passes one that no one reads after): Eltwise.forward's passes, so its numbers."""
    *xs, coeffs, name = args
    if any(x.shape != xs[0].shape for x in xs[1:]):
        raise ValueError(f"layer {name!r} (Eltwise): bottoms of shapes {[list(x.shape) for x in xs]}; "
                         f"all must be equal")
    return weighted_sum(xs, coeffs, into_first=eager_without_autograd())


@register("Eltwise")
class Eltwise(Layer):
    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.eltwise_param
        n = len(self.bottom_shapes)
        if n < 2:
            raise ValueError(f"layer {self.name!r} (Eltwise): needs at least 2 bottoms, got {n}")
        if len(p.coeff) not in (0, n):
            raise ValueError(f"layer {self.name!r} (Eltwise): takes one coeff per bottom ({n}), got {len(p.coeff)}")
        if p.operation == OP.PROD and len(p.coeff):
            raise ValueError(f"layer {self.name!r} (Eltwise): coeff is only allowed for SUM")
        self.op = p.operation
        self.coeffs = list(p.coeff) or [1.0] * n
        self.stable_prod_grad = p.stable_prod_grad

    def top_shapes(self, bottom_shapes):
        first = tuple(bottom_shapes[0])
        for i, s in enumerate(bottom_shapes[1:], 1):
            if tuple(s) != first:
                raise ValueError(f"layer {self.name!r} (Eltwise): bottom {i} has shape {list(s)}, "
                                 f"bottom 0 has {list(first)}; all must be equal")
        if self.op not in (OP.PROD, OP.SUM, OP.MAX):
            raise ValueError(f"layer {self.name!r} (Eltwise): unknown operation {self.op}")
        return [first]

    def in_place_form(self, overwritable):
        """(function, constants, bottom order) of a SUM accumulated into its first bottom (see TorchNet's reuse);
        two bottoms of coefficient 1 may swap (IEEE addition commutes)."""
        if self.op != OP.SUM:
            return None
        if overwritable[0]:
            return sum_into_first, (tuple(self.coeffs), self.name), list(range(len(self.coeffs)))
        if len(self.coeffs) == 2 and self.coeffs == [1, 1] and overwritable[1]:
            return sum_into_first, ((1, 1), self.name), [1, 0]
        return None

    def forward(self, *xs):
        if any(x.shape != xs[0].shape for x in xs[1:]):  # torch would broadcast them
            self.top_shapes([x.shape for x in xs])
        if self.op == OP.PROD:
            if not self.stable_prod_grad:
                return _ProdByDivision.apply(*xs)
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return y
        if self.op == OP.SUM:
            return weighted_sum(xs, self.coeffs)
        if self.op == OP.MAX:
            y = torch.where(xs[0] > xs[1], xs[0], xs[1])
            for x in xs[2:]:
                y = torch.where(x > y, x, y)
            return y
        raise ValueError(f"layer {self.name!r} (Eltwise): unknown operation {self.op}")
