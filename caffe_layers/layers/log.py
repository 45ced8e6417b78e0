"""Log: y = log_base(shift + scale * x); base -1 means e. Backward dy * scale / (log(base) * (shift + scale * x))."""
import math

import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.exp import check_base


@register("Log")
class Log(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.log_param
        check_base(self.name, "Log", p.base)
        if p.base == 1:
            raise ValueError(f"layer {self.name!r} (Log): base 1 gives log(base) = 0")
        self.base_scale = 1.0 if p.base == -1 else 1.0 / math.log(p.base)
        self.scale, self.shift = p.scale, p.shift

    def forward(self, x):
        y = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            y = y + self.shift
        y = torch.log(y)
        return y * self.base_scale if self.base_scale != 1 else y
