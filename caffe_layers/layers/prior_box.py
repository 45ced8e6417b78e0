"""PriorBox (SSD fork): the default boxes of one feature map, in image-normalised corners.

Top (1, 2, H*W*num_priors*4): channel 0 holds [xmin, ymin, xmax, ymax] of every prior (pixel by
pixel, row-major; per min_size: the min_size square, the sqrt(min_size*max_size) square, then
one box per aspect ratio other than 1), channel 1 the variances. Image size and step come from
img_size/img_h/img_w and step/step_h/step_w when set, else from the bottoms' shapes at call
time, so a net runs at any input size. As in the fork, min_size/max_size are truncated to
integers when the boxes are computed. The output depends only on the bottoms' shapes: it is
not differentiable, and no gradient flows to the bottoms (the fork's Backward does nothing).
"""
import math

import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, legacy_shape


def _pair(p, single, h_name, w_name, where):
    """(h, w) from `single` or from both `h_name` and `w_name` (not both ways), each > 0; (0, 0) when unset."""
    if p.HasField(h_name) or p.HasField(w_name):
        if p.HasField(single):
            raise ValueError(f"{where}: either {single} or {h_name}/{w_name} should be specified; not both")
        h, w = getattr(p, h_name), getattr(p, w_name)
        if h <= 0 or w <= 0:
            raise ValueError(f"{where}: {h_name} and {w_name} must be larger than 0")
        return h, w
    if p.HasField(single):
        if getattr(p, single) <= 0:
            raise ValueError(f"{where}: {single} must be larger than 0")
        return getattr(p, single), getattr(p, single)
    return 0, 0


@register("PriorBox")
class PriorBox(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.prior_box_param
        where = f"layer {self.name!r} (PriorBox)"
        for name in ("offset_h", "offset_w", "width", "height"):
            if len(getattr(p, name)):
                raise ValueError(f"{where}: prior_box_param.{name} is an OpenCV extension of the SSD layer "
                                 f"that this package does not implement")
        if not p.min_size:
            raise ValueError(f"{where}: must provide min_size")
        if any(s <= 0 for s in p.min_size):
            raise ValueError(f"{where}: min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = list(p.min_size)
        ratios = [1.0]
        for ar in p.aspect_ratio:
            if all(abs(ar - r) >= 1e-6 for r in ratios):
                ratios.append(ar)
                if p.flip:
                    ratios.append(float(np.float32(1.0 / ar)))
        self.aspect_ratios = ratios
        self.max_sizes = list(p.max_size)
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise ValueError(f"{where}: {len(self.max_sizes)} max_size for {len(self.min_sizes)} min_size")
            if any(mx <= mn for mn, mx in zip(self.min_sizes, self.max_sizes)):
                raise ValueError(f"{where}: max_size must be greater than min_size")
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        var = list(p.variance) or [0.1]
        if len(var) not in (1, 4) or any(v <= 0 for v in var):
            raise ValueError(f"{where}: variance must be 1 or 4 positive values, got {list(p.variance)}")
        self.variance = var
        self.img_h, self.img_w = _pair(p, "img_size", "img_h", "img_w", where)
        self.step_h, self.step_w = _pair(p, "step", "step_h", "step_w", where)
        self.offset = p.offset
        if self.img_h == 0 and len(bottom_shapes) < 2:
            raise ValueError(f"{where}: without img_size/img_h/img_w it needs the image as second bottom")

    def top_shapes(self, bottom_shapes):
        _, _, h, w = legacy_shape(bottom_shapes[0])
        return [(1, 2, h * w * self.num_priors * 4)]

    def priors(self, layer_h, layer_w, img_h, img_w):
        """(2, layer_h*layer_w*num_priors*4) float32: the boxes, then the variances."""
        f32 = np.float32
        if self.step_h == 0 or self.step_w == 0:
            step_w, step_h = f32(img_w) / f32(layer_w), f32(img_h) / f32(layer_h)
        else:
            step_w, step_h = f32(self.step_w), f32(self.step_h)
        offset = f32(self.offset)
        cx = (np.arange(layer_w, dtype=f32) + offset) * step_w      # float, as the fork
        cy = (np.arange(layer_h, dtype=f32) + offset) * step_h
        sizes = []                                                   # (box_w, box_h) in float
        for s, min_size in enumerate(self.min_sizes):
            m = int(min_size)
            sizes.append((f32(m), f32(m)))
            if self.max_sizes:
                side = f32(math.sqrt(m * int(self.max_sizes[s])))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = np.sqrt(f32(ar))
                sizes.append((f32(m) * root, f32(m) / root))
        bw = np.array([b[0] for b in sizes], dtype=np.float64)
        bh = np.array([b[1] for b in sizes], dtype=np.float64)
        x = cx.astype(np.float64)[None, :, None]
        y = cy.astype(np.float64)[:, None, None]
        shape = (layer_h, layer_w, len(sizes))
        boxes = np.stack([np.broadcast_to((x - bw / 2.0) / img_w, shape),
                          np.broadcast_to((y - bh / 2.0) / img_h, shape),
                          np.broadcast_to((x + bw / 2.0) / img_w, shape),
                          np.broadcast_to((y + bh / 2.0) / img_h, shape)], axis=-1).astype(f32).ravel()
        if self.clip:
            boxes = np.clip(boxes, 0, 1)
        variances = np.tile(np.array(self.variance, dtype=f32), boxes.size // len(self.variance))
        return np.stack([boxes, variances])

    def forward(self, feature, image=None):
        _, _, layer_h, layer_w = legacy_shape(feature.shape)
        if self.img_h == 0 or self.img_w == 0:
            _, _, img_h, img_w = legacy_shape(image.shape)
        else:
            img_h, img_w = self.img_h, self.img_w
        out = self.priors(layer_h, layer_w, img_h, img_w)
        return torch.as_tensor(out, dtype=feature.dtype).to(feature.device).unsqueeze(0)
