"""Resize (the bilinear ResizeLayer the SPN HELEN config uses; densebox lineage, util_img.cpp).

Output size: resize_param height/width, or with is_pyramid_test int(out_*_scale * input size).
Sampling: source coordinate = dst * (src_size / dst_size), no half-pixel offset;
out = w_h0 w_w0 x[y, x] + w_h0 w_w1 x[y, x+1] + w_h1 w_w0 x[y+1, x] + w_h1 w_w1 x[y+1, x+1].
Quirk, kept by default (resize_param border: DROP): a neighbour past the last row/column is dropped
together with its weight, not renormalised, so with upscaling the last row/column fade (x2: the last
one is half the input). border: REPLICATE (ours) clamps to the edge instead. Backward is the transpose.
"""
import math

import math

import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import pb


def output_size_rule(p, name="?"):
    """("fixed", height, width), or ("scaled", height scale, width scale as float32 values) with is_pyramid_test:
    plain values read once, so that forward reads no proto message (torch.compile traces it whole)."""
    if not p.is_pyramid_test:
        if not (p.HasField("height") and p.HasField("width")):
            raise ValueError(f"layer {name!r} (Resize): resize_param height and width are required "
                             "unless is_pyramid_test is true")
        return "fixed", int(p.height), int(p.width)
    if not (p.HasField("out_height_scale") and p.HasField("out_width_scale")):
        raise ValueError(f"layer {name!r} (Resize): is_pyramid_test needs out_height_scale and out_width_scale")
    return "scaled", float(np.float32(p.out_height_scale)), float(np.float32(p.out_width_scale))


def resize_output_size(in_h, in_w, rule):
    kind, h, w = rule
    if kind == "fixed":
        return h, w
    # float * int in float32, truncated, as in the C++
    return int(_float32_product(h, in_h)), int(_float32_product(w, in_w))


def _float32_product(scale, n):
    """float32(scale) * float32(n) in float32, in plain Python arithmetic: torch.compile folds it on a static
    size, where numpy's would become tensor ops and the output size data-dependent. The float64 product of two
    24-bit mantissas is exact, so rounding it once gives the float32 product."""
    return _round_to_float32(_round_to_float32(float(scale)) * _round_to_float32(float(n)))


def _round_to_float32(x):
    """The nearest float32 (ties to even, as round() does) of a float in float32's normal range, or 0."""
    if x == 0:
        return 0.0
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * (1 << 24)), exponent - 24)


def _axis_weights(src, dst, dtype, device, border):
    """Lower indices, upper indices, lower weights, upper weights along one axis."""
    npdt = np.float64 if dtype == torch.float64 else np.float32
    scale = npdt(src) / npdt(dst)
    f = np.arange(dst).astype(npdt) * scale
    lo = np.floor(f)
    frac = (f - lo).astype(npdt)
    lo = lo.astype(np.int64)
    w0, w1 = np.abs(npdt(1) - frac), np.abs(frac)
    hi = lo + 1
    outside = hi >= src
    hi[outside] = src - 1
    if border == "drop":
        w1 = np.where(outside, npdt(0), w1)
    else:  # replicate: the upper neighbour is the edge pixel itself
        w1 = w1.astype(npdt)
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return as_t(lo), as_t(hi), as_t(w0).to(dtype), as_t(w1).to(dtype)


def bilinear_resize(x, out_h, out_w, border="drop"):
    """The original's bilinear resize of x (N, C, H, W) to (N, C, out_h, out_w); differentiable."""
    H, W = x.shape[2], x.shape[3]
    if x.device.type == "meta":
        return x.new_empty(x.shape[0], x.shape[1], out_h, out_w)
    h0, h1, wh0, wh1 = _axis_weights(H, out_h, x.dtype, x.device, border)
    v0, v1, ww0, ww1 = _axis_weights(W, out_w, x.dtype, x.device, border)
    wh0, wh1, ww0, ww1 = wh0[:, None], wh1[:, None], ww0[None, :], ww1[None, :]
    top, bottom = x.index_select(2, h0), x.index_select(2, h1)
    # the original's order: ((a + b) + c) + d, each weight product formed before multiplying
    out = (wh0 * ww0) * top.index_select(3, v0)
    out = out + (wh0 * ww1) * top.index_select(3, v1)
    out = out + (wh1 * ww0) * bottom.index_select(3, v0)
    return out + (wh1 * ww1) * bottom.index_select(3, v1)


@register("Resize")
class Resize(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if len(bottom_shapes) != 1 or len(bottom_shapes[0]) != 4:
            raise ValueError(f"layer {self.name!r} (Resize): takes one (N, C, H, W) bottom, got "
                             f"{[list(s) for s in bottom_shapes]}")
        self.p = param.resize_param
        if self.p.type != pb.ResizeParameter.BILINEAR:
            raise ValueError(f"layer {self.name!r} (Resize): only type BILINEAR exists in the original layer")
        self.size_rule = output_size_rule(self.p, self.name)
        self.border = pb.ResizeParameter.Border.Name(self.p.border).lower()  # "drop" or "replicate"

    def top_shapes(self, bottom_shapes):
        n, c, h, w = bottom_shapes[0]
        out_h, out_w = resize_output_size(h, w, self.size_rule)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"layer {self.name!r} (Resize): output size {out_h}x{out_w} is empty")
        return [(n, c, out_h, out_w)]

    def forward(self, x):
        out_h, out_w = resize_output_size(x.shape[2], x.shape[3], self.size_rule)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"layer {self.name!r} (Resize): output size {out_h}x{out_w} is empty")
        return bilinear_resize(x, out_h, out_w, self.border)
