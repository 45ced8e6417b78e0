"""ROIPooling (rbgirshick/caffe-fast-rcnn): max-pool each region of interest into a fixed
pooled_h x pooled_w grid.

Bottoms: features (N, C, H, W) and rois (R, 5) rows [batch_index, x1, y1, x2, y2] in image
coordinates. Corners are scaled by spatial_scale and rounded half away from zero (C's round);
the region is at least 1x1; bin (ph, pw) spans rows floor(ph*bh) .. ceil((ph+1)*bh) (bh = region
height / pooled_h, in float) offset by the region start and clipped to the map. An empty bin
gives 0. Top (R, C, pooled_h, pooled_w). Backward (autograd) sends each output's gradient to
the maximum of its bin, as the fork's argmax does (ties, which random data does not have, may
pick another position). No gradient flows to the rois, as in the fork.
"""
import math

import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


def c_round(v):
    """C's round(): half away from zero."""
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


@register("ROIPooling")
class ROIPooling(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.roi_pooling_param
        self.where = f"layer {self.name!r} (ROIPooling)"
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise ValueError(f"{self.where}: pooled_h and pooled_w must be > 0")
        if len(bottom_shapes) != 2:
            raise ValueError(f"{self.where}: takes 2 bottoms (features, rois), got {len(bottom_shapes)}")
        self.pooled_h, self.pooled_w, self.spatial_scale = p.pooled_h, p.pooled_w, p.spatial_scale

    def top_shapes(self, bottom_shapes):
        features, rois = bottom_shapes
        return [(rois[0], features[1], self.pooled_h, self.pooled_w)]

    def forward(self, x, rois):
        n, c, height, width = x.shape
        f32 = np.float32
        boxes = rois.detach().to("cpu", torch.float32).reshape(rois.shape[0], -1).numpy()
        scale = f32(self.spatial_scale)
        outs = []
        for r in boxes:
            b = int(r[0])
            if not 0 <= b < n:
                raise ValueError(f"{self.where}: roi batch index {b} out of range for {n} images")
            x1, y1, x2, y2 = (c_round(float(f32(v) * scale)) for v in r[1:5])
            bin_h = f32(max(y2 - y1 + 1, 1)) / f32(self.pooled_h)
            bin_w = f32(max(x2 - x1 + 1, 1)) / f32(self.pooled_w)
            cells = []
            for ph in range(self.pooled_h):
                hs = min(max(math.floor(f32(ph) * bin_h) + y1, 0), height)
                he = min(max(math.ceil(f32(ph + 1) * bin_h) + y1, 0), height)
                for pw in range(self.pooled_w):
                    ws = min(max(math.floor(f32(pw) * bin_w) + x1, 0), width)
                    we = min(max(math.ceil(f32(pw + 1) * bin_w) + x1, 0), width)
                    if he <= hs or we <= ws:
                        cells.append(x.new_zeros(c))
                    else:
                        cells.append(x[b, :, hs:he, ws:we].reshape(c, -1).amax(dim=1))
            outs.append(torch.stack(cells, dim=1).reshape(c, self.pooled_h, self.pooled_w))
        if not outs:
            return x.new_zeros((0, c, self.pooled_h, self.pooled_w))
        return torch.stack(outs)
