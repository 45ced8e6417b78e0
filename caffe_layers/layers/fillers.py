"""Caffe's weight fillers (include/caffe/filler.hpp), drawing from torch's default generator."""
import math

import torch

from caffe_layers.formats.proto import pb

FILLERS = {}


def filler(name):
    def deco(fn):
        FILLERS[name] = fn
        return fn
    return deco


def fill(shape, param, dtype=torch.float32):
    """A new tensor of `shape` filled as FillerParameter `param` says."""
    return fill_into(torch.empty(tuple(shape), dtype=dtype), param)


def fill_into(out, param):
    """Fill the contiguous tensor `out` as FillerParameter `param` says, drawing in place: the numbers a
    new tensor of its shape and dtype would get (a net's blobs skip a second buffer and its copy)."""
    kind = param.type
    if kind not in FILLERS:
        raise ValueError(f"unknown filler type {kind!r}; known: {sorted(FILLERS)}")
    if out.numel() == 0 and kind != "xy":  # nothing to draw (and fan_in / fan_out would be 0)
        return out
    FILLERS[kind](out, param)
    return out


def _fans(shape):
    # Caffe: fan_in = count / num, fan_out = count / channels
    count = math.prod(shape)
    fan_in = count // shape[0] if shape else 1
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _scale_denominator(shape, param):
    fan_in, fan_out = _fans(shape)
    if param.variance_norm == pb.FillerParameter.FAN_OUT:
        return fan_out
    if param.variance_norm == pb.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def _sparsify(out, param):
    # Caffe keeps each weight with probability sparse / num_outputs (Bernoulli mask).
    if param.sparse >= 0:
        if out.dim() < 2:
            raise ValueError("sparse filling needs a blob with at least 2 axes")
        keep = param.sparse / out.shape[0]
        out.mul_(torch.bernoulli(torch.full(out.shape, keep, dtype=out.dtype)))


@filler("constant")
def constant(out, param):
    out.fill_(param.value)


@filler("uniform")
def uniform(out, param):
    if not param.min <= param.max:  # caffe_rng_uniform: CHECK_LE(a, b)
        raise ValueError(f"uniform filler needs min <= max, got min {param.min:g}, max {param.max:g}")
    width = torch.tensor(param.max, dtype=out.dtype) - torch.tensor(param.min, dtype=out.dtype)
    if not torch.isfinite(width):  # boost's uniform_real then draws inf/nan forever: Caffe never returns
        raise ValueError(f"uniform filler needs max - min finite in {out.dtype}, got min {param.min:g}, "
                         f"max {param.max:g}")
    out.uniform_(param.min, param.max)


@filler("gaussian")
def gaussian(out, param):
    if not param.std > 0:  # caffe_rng_gaussian: CHECK_GT(sigma, 0)
        raise ValueError(f"gaussian filler needs std > 0, got {param.std:g}")
    out.normal_(param.mean, param.std)
    _sparsify(out, param)


@filler("positive_unitball")
def positive_unitball(out, param):
    flat = out.uniform_().view(out.shape[0] if out.dim() else 1, -1)
    flat.div_(flat.sum(1, keepdim=True))


@filler("xavier")
def xavier(out, param):
    bound = math.sqrt(3.0 / _scale_denominator(out.shape, param))
    out.uniform_(-bound, bound)


@filler("msra")
def msra(out, param):
    std = math.sqrt(2.0 / _scale_denominator(out.shape, param))
    out.normal_(0.0, std)


@filler("bilinear")
def bilinear(out, param):
    """Upsampling kernel for Deconvolution: f = ceil(K/2), c = (2f - 1 - f%2) / (2f)."""
    shape = tuple(out.shape)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    pos = torch.arange(k, dtype=torch.float64)
    w = 1 - (pos / f - c).abs()
    out.copy_((w[:, None] * w[None, :]).to(out.dtype).expand(shape))


@filler("xy")
def xy(out, param):
    """segaware's XYFiller: channel 0 = x (column), channel 1 = y (row); needs 2 channels.

    Quirk: the original indexes image n at n*c*H*W with c the loop's channel (0 or 1), not the
    channel count, so x lands in image 0 channel 0 every time and the y map of image n in flat slot
    n + 1; for num > 1 later images get y maps (or stay 0). `xy_all_images: true` (ours) fills
    every image.
    """
    shape = tuple(out.shape)
    legacy = shape + (1,) * (4 - len(shape))  # Caffe's num/channels/height/width
    if len(shape) > 4 or math.prod(shape) == 0 or legacy[1] != 2:
        raise ValueError(f"xy filler needs a non-empty blob of at most 4 axes with 2 channels, got {list(shape)}")
    n, _, h, w = legacy
    ys, xs = torch.meshgrid(torch.arange(h, dtype=out.dtype), torch.arange(w, dtype=out.dtype), indexing="ij")
    maps = out.zero_().view(n, 2, h, w)
    if param.xy_all_images:
        maps[:, 0], maps[:, 1] = xs, ys
    else:
        slots = maps.view(2 * n, h, w)
        slots[0] = xs
        slots[1:n + 1] = ys
