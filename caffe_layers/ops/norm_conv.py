"""Normalised convolution (segaware norm_conv_layer.cpp): a convolution whose every patch is
weighted by a softmax over the patch of (negatively scaled) embedding distances.

    soft = softmax over the kh*kw taps of (-scale * dist)   (of +dist when there is no scale: quirk)
    out[o] = sum_{c in group(o), tap} weight[o, c, tap] * im2col(img)[c, tap] * soft[tap] + bias[o]

`dist` is im2dist's N x (kh*kw) x H_out x W_out output. Autograd gives the original's backward
(its weight, image, embedding and scale diffs are the true gradients of this forward).
"""
import torch

from caffe_layers.ops.im2col import im2col


def check_shapes(img, dist, weight, group, out):
    """The argument checks of the filtering (out: the patches' output size), shared with the native path."""
    c = img.shape[1]
    o, cg, kh, kw = weight.shape
    if c % group or o % group or cg != c // group:
        raise ValueError(f"norm_conv: channels {c} and num_output {o} must be multiples of group {group}, and the "
                         f"weight must be num_output x channels/group x kh x kw, got {list(weight.shape)}")
    if tuple(dist.shape) != (img.shape[0], kh * kw, *out):
        raise ValueError(f"norm_conv: distances of shape {list(dist.shape)} do not fit {kh}x{kw} patches "
                         f"of output size {list(out)}")


def patch_softmax(dist, scale):
    """softmax over the taps of -scale * dist, or of +dist without a scale (the original's quirk)."""
    logits = dist if scale is None else -scale.reshape(()) * dist
    return torch.softmax(logits, dim=1)  # the original subtracts the max, exponentiates and divides


def norm_conv_filter(img, dist, weight, bias=None, scale=None, pad=0, stride=1, dilation=1, group=1):
    """img N x C x H x W, dist N x kk x Ho x Wo, weight O x C/group x kh x kw -> N x O x Ho x Wo."""
    n, c = img.shape[:2]
    o, _, kh, kw = weight.shape
    cols = im2col(img, (kh, kw), pad, stride, dilation)
    check_shapes(img, dist, weight, group, cols.shape[2:])
    soft = patch_softmax(dist, scale)
    ho, wo = cols.shape[2:]
    res = cols.reshape(n, c, kh * kw, ho, wo) * soft[:, None]
    res = res.reshape(n, group, (c // group) * kh * kw, ho * wo)
    w = weight.reshape(group, o // group, (c // group) * kh * kw)
    out = torch.matmul(w, res).reshape(n, o, ho, wo)
    if bias is not None:
        out = out + bias.reshape(1, o, 1, 1)
    return out
