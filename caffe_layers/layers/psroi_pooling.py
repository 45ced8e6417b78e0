"""PSROIPooling (daijifeng001/caffe-rfcn, position-sensitive ROI pooling of R-FCN): average-pool
bin (gh, gw) of each region from its own channel group: output channel k of bin (gh, gw) reads
input channel (k*group_size + gh)*group_size + gw.

Bottoms: features (N, output_dim*group_size^2, H, W) and rois (R, 5) [batch_index, x1, y1, x2, y2].
As the fork's kernel: corners are rounded (half away from zero), x2/y2 get +1, then all are
scaled by spatial_scale; the region is at least 0.1 wide and high; bin (ph, pw) spans
floor(ph*bh + y1) .. ceil((ph+1)*bh + y1), clipped to the map; an empty bin gives 0. Top
(R, output_dim, group_size, group_size). Backward (autograd) spreads each output's gradient
evenly over its bin, as the fork's; no gradient flows to the rois.
"""
import math

import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.roi_pooling import c_round


@register("PSROIPooling")
class PSROIPooling(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.psroi_pooling_param
        self.where = f"layer {self.name!r} (PSROIPooling)"
        for name in ("spatial_scale", "output_dim", "group_size"):
            if not p.HasField(name):
                raise ValueError(f"{self.where}: psroi_pooling_param.{name} is required")
        if p.output_dim <= 0 or p.group_size <= 0:
            raise ValueError(f"{self.where}: output_dim and group_size must be > 0")
        if len(bottom_shapes) != 2:
            raise ValueError(f"{self.where}: takes 2 bottoms (features, rois), got {len(bottom_shapes)}")
        self.spatial_scale, self.output_dim, self.group = p.spatial_scale, p.output_dim, p.group_size
        channels = bottom_shapes[0][1]
        if channels != self.output_dim * self.group * self.group:
            raise ValueError(f"{self.where}: input channels must be output_dim*group_size^2 = "
                             f"{self.output_dim * self.group ** 2}, got {channels}")

    def top_shapes(self, bottom_shapes):
        return [(bottom_shapes[1][0], self.output_dim, self.group, self.group)]

    def forward(self, x, rois):
        n, _, height, width = x.shape
        f32, g = np.float32, self.group
        boxes = rois.detach().to("cpu", torch.float32).reshape(rois.shape[0], -1).numpy()
        scale = f32(self.spatial_scale)
        # channel of output k at bin (gh, gw): (k*g + gh)*g + gw
        channel = torch.arange(self.output_dim * g * g, device=x.device).reshape(self.output_dim, g, g)
        outs = []
        for r in boxes:
            b = int(r[0])
            if not 0 <= b < n:
                raise ValueError(f"{self.where}: roi batch index {b} out of range for {n} images")
            x1 = f32(c_round(float(r[1]))) * scale
            y1 = f32(c_round(float(r[2]))) * scale
            x2 = f32(c_round(float(r[3])) + 1.0) * scale
            y2 = f32(c_round(float(r[4])) + 1.0) * scale
            bin_h = max(y2 - y1, f32(0.1)) / f32(g)
            bin_w = max(x2 - x1, f32(0.1)) / f32(g)
            cells = []
            for gh in range(g):
                hs = min(max(math.floor(f32(gh) * bin_h + y1), 0), height)
                he = min(max(math.ceil(f32(gh + 1) * bin_h + y1), 0), height)
                for gw in range(g):
                    ws = min(max(math.floor(f32(gw) * bin_w + x1), 0), width)
                    we = min(max(math.ceil(f32(gw + 1) * bin_w + x1), 0), width)
                    if he <= hs or we <= ws:
                        cells.append(x.new_zeros(self.output_dim))
                    else:
                        window = x[b, channel[:, gh, gw], hs:he, ws:we]
                        cells.append(window.sum(dim=(1, 2)) / ((he - hs) * (we - ws)))
            outs.append(torch.stack(cells, dim=1).reshape(self.output_dim, g, g))
        if not outs:
            return x.new_zeros((0, self.output_dim, g, g))
        return torch.stack(outs)
