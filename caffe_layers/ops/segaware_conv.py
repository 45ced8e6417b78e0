"""Segmentation-aware convolution: the segaware chain Im2col -> Eltwise PROD with a tiled mask ->
Convolution{bottom_is_im2col}, as one operation (the native kernel never builds the C*K*H*W buffers).

    y[n, o, p] = sum_{c, k} W[o, c*K + k] * im2col(x)[n, c*K + k, p] * mask[n, k, p] + b[o]

mask is N x K x H_out x W_out (K = kh*kw, the Exp output before Tile); W is the convolution's weight
blob, read as O x (C*K) like Caffe's bottom_is_im2col convolution (group 1).
"""
import torch.nn.functional as F

from caffe_layers.ops.geometry import check_geometry
from caffe_layers.ops.im2col import im2col


def check_shapes(x, mask, weight, bias, K, out):
    N, C = x.shape[:2]
    if tuple(mask.shape) != (N, K, *out):
        raise ValueError(f"segaware_conv: mask must be N x kh*kw x H_out x W_out = {[N, K, *out]}, "
                         f"got {list(mask.shape)}")
    if weight.numel() % weight.shape[0] or weight.numel() // weight.shape[0] != C * K:
        raise ValueError(f"segaware_conv: weight must hold num_output x (C*kh*kw = {C * K}) values, "
                         f"got shape {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"segaware_conv: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


def segaware_conv(x, mask, weight, bias, kernel, pad=0, stride=1, dilation=1):
    """N x C x H x W input, N x K x H_out x W_out mask -> N x O x H_out x W_out (the unfused chain)."""
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, "segaware_conv")
    K = kernel[0] * kernel[1]
    check_shapes(x, mask, weight, bias, K, out)
    cols = im2col(x, kernel, pad, stride, dilation)
    hit = cols * mask.repeat(1, x.shape[1], 1, 1)  # Tile(axis 1, tiles C), then Eltwise PROD
    w = weight.reshape(weight.shape[0], -1, 1, 1)
    return F.conv2d(hit, w, bias)
