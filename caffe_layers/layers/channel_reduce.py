"""ChannelReduce (segaware): SUM or MAX over consecutive groups of channels, N x num_channels x H x W."""
import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, legacy_shape
from caffe_layers.formats.proto import pb

NEG_FLT_MAX = -float(np.finfo(np.float32).max)


@register("ChannelReduce")
class ChannelReduce(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.channel_reduce_param
        shape = self.bottom_shapes[0]
        if len(shape) > 4:
            raise ValueError(f"layer {self.name!r} (ChannelReduce): needs at most 4 axes, got {list(shape)}")
        self.num_channels = int(p.num_channels)
        channels = shape[1] if len(shape) > 1 else 1
        if self.num_channels <= 0:
            raise ValueError(f"layer {self.name!r} (ChannelReduce): num_channels must be greater than 0")
        if not p.check_divisor and self.num_channels % channels == 0:
            # quirk: the original's CHECK((num_channels_ % channels_)) is inverted, so it rejects
            # num_channels == channels; channel_reduce_param.check_divisor (ours) tests the intended rule
            raise ValueError(f"layer {self.name!r} (ChannelReduce): the original requires num_channels % channels "
                             f"!= 0 (got {self.num_channels} and {channels} channels); set "
                             f"channel_reduce_param {{ check_divisor: true }} to allow this")
        if channels % self.num_channels:
            raise ValueError(f"layer {self.name!r} (ChannelReduce): num_channels {self.num_channels} must divide "
                             f"the {channels} input channels")
        self.op = p.operation
        if self.op not in (pb.ChannelReduceParameter.SUM, pb.ChannelReduceParameter.MAX):
            raise ValueError(f"layer {self.name!r} (ChannelReduce): unknown operation {self.op}")

    def top_shapes(self, bottom_shapes):
        n, c, h, w = legacy_shape(bottom_shapes[0])
        if c % self.num_channels:
            raise ValueError(f"layer {self.name!r} (ChannelReduce): num_channels {self.num_channels} must divide "
                             f"the {c} input channels")
        return [(n, self.num_channels, h, w)]

    def forward(self, x):
        n, c, h, w = legacy_shape(x.shape)
        groups = x.reshape(n, self.num_channels, c // self.num_channels, h, w)
        if self.op == pb.ChannelReduceParameter.SUM:
            return groups.sum(2)
        # MAX: start at -FLT_MAX and take a channel only if strictly greater, so ties keep the first
        # channel and inputs never above -FLT_MAX give -FLT_MAX with no gradient
        top = torch.full((n, self.num_channels, h, w), NEG_FLT_MAX, dtype=x.dtype, device=x.device)
        for j in range(groups.shape[2]):
            xj = groups[:, :, j]
            top = torch.where(xj > top, xj, top)
        return top
