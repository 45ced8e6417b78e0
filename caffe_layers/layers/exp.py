"""Exp: y = base ^ (shift + scale * x); base -1 means e. Backward dy * y * log(base) * scale.

Quirk of the segaware fork (exp_layer.cpp): the outer factor base^shift is computed as
pow(base, shift) even when base is -1 (e), giving NaN for a non-integer shift and +-1 for an
integer one; BVLC fixed it to exp(shift). exp_param { fix_e_shift: true } (ours) gives BVLC's.
"""
import math

import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


def c_pow(base, exponent):
    """C's pow: NaN for a negative base with a non-integer exponent, inf for 0 to a negative power."""
    try:
        return math.pow(base, exponent)
    except ValueError:
        return math.nan
    except ZeroDivisionError:
        return math.inf


def check_base(layer_name, kind, base):
    """Exp and Log take a strictly positive base, or -1 for e."""
    if base != -1 and not base > 0:
        raise ValueError(f"layer {layer_name!r} ({kind}): base must be strictly positive or -1 (e), got {base}")


@register("Exp")
class Exp(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.exp_param
        check_base(self.name, "Exp", p.base)
        self.base, self.scale, self.shift = p.base, p.scale, p.shift
        self.fix_e_shift = p.fix_e_shift

    def forward(self, x):
        log_base = 1.0 if self.base == -1 else math.log(self.base)
        inner = log_base * self.scale
        if self.shift == 0:
            outer = 1.0
        elif self.base == -1 and self.fix_e_shift:
            outer = math.exp(self.shift)
        else:
            outer = c_pow(self.base, self.shift)
        y = torch.exp(x * inner if inner != 1 else x)
        return y * outer if outer != 1 else y
