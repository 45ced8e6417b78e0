"""Normalize (SSD fork): L2-normalise each image (across_spatial) or each pixel's channel vector,
then multiply by a learned scale (one value, channel_shared, or one per channel).

norm = sqrt(sum of squares + eps); across_spatial multiplies by 1 / norm, per pixel it divides by
norm, as the fork does. The scale blob has shape () when channel_shared, else (channels,);
scale_filler defaults to constant 1. Backward is autograd (the true gradient, as the fork's).
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import pb


@register("Normalize")
class Normalize(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.norm_param
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"layer {self.name!r} (Normalize): bottom must have at least 2 axes, got {list(shape)}")
        self.across_spatial, self.channel_shared, self.eps = p.across_spatial, p.channel_shared, p.eps
        filler = p.scale_filler if p.HasField("scale_filler") else pb.FillerParameter(type="constant", value=1.0)
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def forward(self, x):
        scale = self.blobs[0]
        expected = 1 if self.channel_shared else x.shape[1]
        if scale.numel() != expected:
            raise ValueError(f"layer {self.name!r} (Normalize): scale blob has {scale.numel()} values, "
                             f"expected {expected} for a bottom of shape {list(x.shape)}")
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        sq = flat * flat
        if self.across_spatial:
            norm = (sq.sum(dim=(1, 2), keepdim=True) + self.eps).sqrt()
            y = flat * (1.0 / norm)
        else:
            norm = (sq.sum(dim=1, keepdim=True) + self.eps).sqrt()
            y = flat / norm
        y = y * (scale.reshape(()) if self.channel_shared else scale.reshape(1, -1, 1))
        return y.reshape(x.shape)
