"""Kernel/pad/stride/dilation from a ConvolutionParameter, as the segaware im2* layers read it.

Not a layer: shared by Im2col, Im2dist, Im2parity and DistLoss (their LayerSetUp code is the same).
Only two spatial axes are supported (the fork's im2dist/im2parity are 2-D only).
"""
from caffe_layers.layers.base import canonical_axis


def _two(name, values, has_hw, h, w, default, layer):
    if has_hw:
        if len(values):
            raise ValueError(f"layer {layer!r}: give either {name} or {name}_h/{name}_w, not both")
        return int(h), int(w)
    if len(values) == 0:
        if default is None:
            raise ValueError(f"layer {layer!r}: convolution_param needs kernel_size (or kernel_h and kernel_w)")
        return default, default
    if len(values) not in (1, 2):
        raise ValueError(f"layer {layer!r}: {name} must be given once or once per spatial axis (2), "
                         f"got {len(values)} values")
    return (int(values[0]),) * 2 if len(values) == 1 else (int(values[0]), int(values[1]))


def patch_geometry(param, bottom_shape):
    """(channel_axis, kernel, pad, stride, dilation) for a layer reading `param.convolution_param`."""
    cp, name = param.convolution_param, param.name
    axis = canonical_axis(cp.axis, len(bottom_shape), name)
    if len(bottom_shape) - axis - 1 != 2:
        raise ValueError(f"layer {name!r} ({param.type}): needs exactly 2 spatial axes after channel axis "
                         f"{axis}, got bottom shape {list(bottom_shape)}")
    kernel = _two("kernel_size", cp.kernel_size, cp.HasField("kernel_h") or cp.HasField("kernel_w"),
                  cp.kernel_h, cp.kernel_w, None, name)
    stride = _two("stride", cp.stride, cp.HasField("stride_h") or cp.HasField("stride_w"),
                  cp.stride_h, cp.stride_w, 1, name)
    pad = _two("pad", cp.pad, cp.HasField("pad_h") or cp.HasField("pad_w"), cp.pad_h, cp.pad_w, 0, name)
    dilation = _two("dilation", cp.dilation, False, 0, 0, 1, name)
    if min(kernel) <= 0 or min(stride) <= 0:
        raise ValueError(f"layer {name!r}: kernel {kernel} and stride {stride} must be nonzero")
    return axis, kernel, pad, stride, dilation


def to_nchw(x, axis):
    """Fold the axes before `axis` into one batch axis: (..., C, H, W) -> (num, C, H, W)."""
    return x.reshape(-1, *x.shape[axis:]) if axis != 1 else x


def from_nchw(y, lead):
    return y.reshape(*lead, *y.shape[1:]) if len(lead) != 1 else y
