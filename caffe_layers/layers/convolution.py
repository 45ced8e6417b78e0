"""Convolution (BaseConvolutionLayer + ConvolutionLayer), with the segaware fork's bottom_is_im2col.

`conv_setup` reads the settings shared with Deconvolution.
"""
import math

import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis
from caffe_layers.layers.patch_geometry import conv_geometry, from_nchw, to_nchw

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_setup(layer, param, bottom_shapes, kind):
    """Set kernel/stride/pad/dilation, channel axis, group and the parameter blobs on `layer`."""
    p = param.convolution_param
    what = f"layer {param.name!r} ({kind})"
    layer.what = what
    if not bottom_shapes:
        raise ValueError(f"{what}: needs at least one bottom")
    shape = bottom_shapes[0]
    for s in bottom_shapes[1:]:
        if tuple(s) != tuple(shape):
            raise ValueError(f"{what}: all bottoms must have the same shape, got {list(map(list, bottom_shapes))}")
    layer.axis = canonical_axis(p.axis, len(shape), param.name)
    nsp = len(shape) - layer.axis - 1
    if nsp not in _CONV:
        raise ValueError(f"{what}: supports 1 to 3 spatial axes after the channel axis, got {nsp}")
    layer.nsp = nsp
    # lists: the weight shapes are built as [num_output, channels] + kernel
    layer.kernel, layer.pad, layer.stride, layer.dilation = map(list, conv_geometry(p, nsp, what))
    if any(d <= 0 for d in layer.dilation):
        raise ValueError(f"{what}: dilation must be positive, got {layer.dilation}")
    channels = shape[layer.axis]
    layer.num_output = p.num_output
    layer.group = p.group
    if layer.num_output <= 0:
        raise ValueError(f"{what}: num_output must be positive, got {layer.num_output}")
    if layer.group <= 0 or channels % layer.group:
        raise ValueError(f"{what}: group {layer.group} must divide the {channels} input channels")
    if layer.num_output % layer.group:
        raise ValueError(f"{what}: num_output {layer.num_output} must be a multiple of group {layer.group}")
    layer.channels = channels
    layer.bias_term = p.bias_term
    return p, channels


def kernel_extents(layer):
    """The dilated kernel size along each spatial axis."""
    return [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel)]


def each_bottom(layer, bottoms, conv):
    """Check every bottom, apply `conv` to it with the axes before the channel axis folded into one
    batch axis, and unfold them again; one top per bottom."""
    tops = []
    for x in bottoms:
        if x.dim() != layer.axis + 1 + layer.nsp or x.shape[layer.axis] != layer.channels:
            raise ValueError(f"{layer.what}: bottom shape {list(x.shape)} does not fit the layer "
                             f"({layer.channels} channels on axis {layer.axis}, {layer.nsp} spatial axes)")
        tops.append(from_nchw(conv(to_nchw(x, layer.axis)), x.shape[:layer.axis]))
    return tops[0] if len(tops) == 1 else tuple(tops)


@register("Convolution")
class Convolution(Layer):
    min_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p, channels = conv_setup(self, param, bottom_shapes, "Convolution")
        self.bottom_is_im2col = p.bottom_is_im2col
        per_group = channels // self.group
        kernel_count = math.prod(self.kernel)
        if self.bottom_is_im2col:
            # segaware: the bottom is an im2col buffer, C = channels * prod(kernel); Caffe divides the
            # per-group channels by the kernel sizes (integer division) to get the weight shape.
            if per_group % kernel_count:
                raise ValueError(f"{self.what}: bottom_is_im2col needs channels/group ({per_group}) to be a "
                                 f"multiple of the kernel size product {kernel_count}")
            per_group //= kernel_count
        self.add_blob([self.num_output, per_group] + self.kernel, p.weight_filler)
        if self.bias_term:
            self.add_blob([self.num_output], p.bias_filler)
        if not self.bottom_is_im2col:
            for i, extent in enumerate(kernel_extents(self)):
                size = bottom_shapes[0][self.axis + 1 + i]
                if size + 2 * self.pad[i] < extent:
                    raise ValueError(f"{self.what}: spatial size {size} with pad {self.pad[i]} is smaller "
                                     f"than the kernel extent {extent}")

    def forward(self, *bottoms):
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        if self.bottom_is_im2col:
            # segaware: the column buffer is used as is: a 1x1 (grouped) convolution, output size =
            # input size; stride, pad and dilation are ignored.
            w = weight.reshape(weight.shape[0], -1, *([1] * self.nsp))
            return each_bottom(self, bottoms, lambda x: _CONV[self.nsp](x, w, bias, 1, 0, 1, self.group))
        return each_bottom(self, bottoms, lambda x: _CONV[self.nsp](
            x, weight, bias, self.stride, self.pad, self.dilation, self.group))
