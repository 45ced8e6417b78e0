"""LRN: local response normalization across channels or within a channel, Caffe's formulas."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, check_4d
from caffe_layers.layers.pooling import pool_channels_last
from caffe_layers.formats.proto import pb


def position_independent_pow(x, exponent):
    """x ** exponent with the same result for an element wherever it sits in the tensor. torch's float32
    pow on CPU rounds differently in its vector loop and its scalar tails, whose places move with the
    batch size and the thread count: an image's LRN output changed by an ulp with the batch around it
    (Caffe's CPU powx is per element). In float64 then rounded, which is also powf's correct rounding."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return x.double().pow_(exponent).float()
    return x.pow(exponent)


@register("LRN")
class LRN(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.lrn_param
        self.what = f"layer {param.name!r} (LRN)"
        if p.local_size % 2 != 1:
            raise ValueError(f"{self.what}: local_size must be odd, got {p.local_size}")
        if p.norm_region not in (pb.LRNParameter.ACROSS_CHANNELS, pb.LRNParameter.WITHIN_CHANNEL):
            raise ValueError(f"{self.what}: unknown norm_region {p.norm_region}")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.across = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        for s in bottom_shapes:
            check_4d(s, self.what)

    def top_shapes(self, bottom_shapes):
        check_4d(bottom_shapes[0], self.what)
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        pre = (self.size - 1) // 2
        sq = x * x
        if self.across:
            # scale = k + alpha / size * sum of squares over channels c - pre .. c + pre (zero padded),
            # summed in place from shifted channel ranges (no padded copy)
            channels = x.shape[1]
            scale = sq.clone()
            for j in range(1, min(pre, channels - 1) + 1):
                scale[:, j:] += sq[:, :channels - j]
                scale[:, :channels - j] += sq[:, j:]
            scale.mul_(self.alpha / self.size).add_(self.k)
            return x * position_independent_pow(scale, -self.beta)
        # WITHIN_CHANNEL: (1 + alpha * mean of squares over a size x size window) ^ -beta. Caffe builds it
        # from AVE pooling (pad pre, always size^2 elements here) and a Power layer with shift 1: k is unused.
        mean = pool_channels_last(F.avg_pool2d, sq, self.size, stride=1, padding=pre, count_include_pad=True)
        return x * position_independent_pow(mean.mul_(self.alpha).add_(1), -self.beta)
