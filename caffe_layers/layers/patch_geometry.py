"""Kernel/pad/stride/dilation from a ConvolutionParameter, as the segaware im2* layers read it.

Not a layer: shared by Im2col, Im2dist, Im2parity and DistLoss (their LayerSetUp code is the same);
`conv_geometry` is Caffe's per-axis rule, also read by Convolution and Deconvolution. patch_geometry
supports only two spatial axes (the fork's im2dist/im2parity are 2-D only).
"""
from caffe_layers.layers.base import canonical_axis
from caffe_layers.ops.geometry import output_size


def _per_axis(name, values, has_hw, h, w, default, nsp, what):
    """Caffe's rule: `name` once or once per spatial axis, or name_h and name_w (2-D only)."""
    if has_hw:
        if nsp != 2:
            raise ValueError(f"{what}: {name}_h & {name}_w can only be used for 2D convolution")
        if len(values):
            raise ValueError(f"{what}: either {name} or {name}_h/w should be specified; not both")
        return int(h), int(w)
    if len(values) == 0:
        if default is None:
            raise ValueError(f"{what}: kernel_size (or kernel_h and kernel_w) is required")
        return (default,) * nsp
    if len(values) not in (1, nsp):
        raise ValueError(f"{what}: {name} must be specified once, or once per spatial dimension "
                         f"({name} specified {len(values)} times; {nsp} spatial dims)")
    return tuple(int(values[0 if len(values) == 1 else i]) for i in range(nsp))


def conv_geometry(cp, nsp, what):
    """(kernel, pad, stride, dilation), tuples of `nsp` ints, from ConvolutionParameter `cp` by Caffe's
    BaseConvolutionLayer rules (the kernel is required; kernel and stride must be nonzero)."""
    has = cp.HasField
    kernel = _per_axis("kernel_size", cp.kernel_size, has("kernel_h") or has("kernel_w"),
                       cp.kernel_h, cp.kernel_w, None, nsp, what)
    if min(kernel) <= 0:
        raise ValueError(f"{what}: filter dimensions must be nonzero, got kernel {list(kernel)}")
    stride = _per_axis("stride", cp.stride, has("stride_h") or has("stride_w"), cp.stride_h, cp.stride_w, 1, nsp, what)
    if min(stride) <= 0:
        raise ValueError(f"{what}: stride dimensions must be nonzero, got {list(stride)}")
    pad = _per_axis("pad", cp.pad, has("pad_h") or has("pad_w"), cp.pad_h, cp.pad_w, 0, nsp, what)
    dilation = _per_axis("dilation", cp.dilation, False, 0, 0, 1, nsp, what)
    return kernel, pad, stride, dilation


def patch_geometry(param, bottom_shape):
    """(channel_axis, kernel, pad, stride, dilation) for a layer reading `param.convolution_param`."""
    cp, name = param.convolution_param, param.name
    what = f"layer {name!r} ({param.type})"
    axis = canonical_axis(cp.axis, len(bottom_shape), name)
    if len(bottom_shape) - axis - 1 != 2:
        raise ValueError(f"{what}: needs exactly 2 spatial axes after channel axis "
                         f"{axis}, got bottom shape {list(bottom_shape)}")
    return (axis,) + conv_geometry(cp, 2, what)


def patch_top_shape(layer, bottom_shape, channels):
    """The top shape of an im2* layer (layer.axis, .kernel, .pad, .stride, .dilation set by
    patch_geometry): the axes before the channel axis, `channels`, then the output height and width."""
    shape, axis = tuple(bottom_shape), layer.axis
    if len(shape) != axis + 3:
        raise ValueError(f"layer {layer.name!r}: needs exactly 2 spatial axes after channel axis "
                         f"{axis}, got bottom shape {list(shape)}")
    try:
        out = tuple(output_size(shape[axis + 1 + i], layer.kernel[i], layer.pad[i], layer.stride[i],
                                layer.dilation[i]) for i in range(2))
    except ValueError as err:
        raise ValueError(f"layer {layer.name!r}: {err}") from None
    return shape[:axis] + (channels,) + out


def to_nchw(x, axis):
    """Fold the axes before `axis` into one batch axis: (..., C, H, W) -> (num, C, H, W); `from_nchw`
    unfolds them again given the leading shape."""
    return x.reshape(-1, *x.shape[axis:]) if axis != 1 else x


def from_nchw(y, lead):
    return y.reshape(*lead, *y.shape[1:]) if len(lead) != 1 else y
