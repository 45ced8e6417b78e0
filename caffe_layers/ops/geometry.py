"""Patch geometry shared by the im2* operations (Caffe's convolution arithmetic)."""
import functools

import numpy as np
import torch

# What the fork writes for removed neighbours: FLT_MAX / 100 evaluated in float (3.4028235e36),
# "to give room for the grad check"; the same float value is used in float64 nets.
FLT_MAX_100 = float(np.float32(np.finfo(np.float32).max) / np.float32(100))
FLT_MAX = float(np.finfo(np.float32).max)


@functools.cache
def flt_max(dtype):
    """Caffe's FLT_MAX sentinel in `dtype`: FLT_MAX, or the largest finite value of a narrower type
    (float16, bfloat16), where FLT_MAX itself overflows."""
    return min(FLT_MAX, float(torch.finfo(dtype).max))


def flt_max_100(dtype):
    """The fork's FLT_MAX / 100 for removed neighbours, scaled down the same way for a narrower type."""
    return FLT_MAX_100 if flt_max(dtype) == FLT_MAX else flt_max(dtype) / 100


def pair(value, what="value"):
    """(a, b) from an int or a 2-sequence."""
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {value}")
    return value


def output_size(size, kernel, pad, stride, dilation):
    """Caffe's output size: (size + 2 pad - extent) / stride + 1, C++ integer division."""
    extent = dilation * (kernel - 1) + 1
    num = size + 2 * pad - extent
    out = (abs(num) // stride) * (1 if num >= 0 else -1) + 1  # C++ truncates toward zero
    if out <= 0:
        raise ValueError(f"kernel extent {extent} (kernel {kernel}, dilation {dilation}) does not fit "
                         f"an input of size {size} with pad {pad} and stride {stride}")
    return out


def check_geometry(x, kernel, pad, stride, dilation, what):
    """Validated (kernel, pad, stride, dilation, (H_out, W_out)) for an N x C x H x W input."""
    if x.dim() != 4:
        raise ValueError(f"{what}: expected an N x C x H x W input, got shape {list(x.shape)}")
    kernel, pad = pair(kernel, "kernel"), pair(pad, "pad")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0 or min(pad) < 0:
        raise ValueError(f"{what}: kernel, stride and dilation must be positive and pad non-negative; "
                         f"got kernel {kernel}, pad {pad}, stride {stride}, dilation {dilation}")
    out = tuple(output_size(x.shape[2 + i], kernel[i], pad[i], stride[i], dilation[i]) for i in range(2))
    return kernel, pad, stride, dilation, out


def pad_windows(x, pad, kernel, stride, dilation, out):
    """x zero-padded by `pad`, plus on the bottom/right what the last window still needs.

    Caffe's output size truncates toward zero, so it is 1 (not 0) when the dilated kernel overruns the
    padded input by less than a stride; that window reads past the padding, where Caffe's bounds checks
    see "outside the image" (zeros). The extra zeros give `window` those positions.
    """
    import torch.nn.functional as F

    extra = [max(0, (out[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 - (x.shape[2 + a] + 2 * pad[a]))
             for a in range(2)]
    return F.pad(x, (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0]))


def window(xp, i, j, stride, dilation, out):
    """The values of padded input `xp` at kernel offset (i, j) for every output position."""
    h0, w0 = i * dilation[0], j * dilation[1]
    return xp[:, :, h0:h0 + stride[0] * (out[0] - 1) + 1:stride[0],
              w0:w0 + stride[1] * (out[1] - 1) + 1:stride[1]]


def inside(size, pad, stride, offset, out, device):
    """Boolean vector over output positions: is `pos * stride - pad + offset` inside [0, size)?"""
    import torch

    pos = torch.arange(out, device=device) * stride - pad + offset
    return (pos >= 0) & (pos < size)
