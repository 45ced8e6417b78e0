"""Convolution (BaseConvolutionLayer + ConvolutionLayer), with the segaware fork's bottom_is_im2col.

`conv_setup` reads the settings shared with Deconvolution.
"""
import math

import torch
import torch.nn.functional as F

from caffe_layers.formats.proto import TRAIN
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, leaf_function
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


def _short(values):
    """One int for equal values along every axis (torch parses it faster than a list)."""
    return values[0] if len(set(values)) == 1 else tuple(values)


def kernel_extents(layer):
    """The dilated kernel size along each spatial axis."""
    return [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel)]


def conv_top_shapes(layer, bottom_shapes, spatial_size):
    """Check the bottoms; one top per bottom, num_output channels, spatial_size(axis i, size) each."""
    first = tuple(bottom_shapes[0])
    if len(first) != layer.axis + 1 + layer.nsp or first[layer.axis] != layer.channels:
        raise ValueError(f"{layer.what}: bottom shape {list(first)} does not fit the layer "
                         f"({layer.channels} channels on axis {layer.axis}, {layer.nsp} spatial axes)")
    if any(tuple(s) != first for s in bottom_shapes[1:]):
        raise ValueError(f"{layer.what}: all bottoms must have the same shape, got {list(map(list, bottom_shapes))}")
    spatial = tuple(spatial_size(i, size) for i, size in enumerate(first[layer.axis + 1:]))
    if min(spatial) <= 0:
        raise ValueError(f"{layer.what}: bottom shape {list(first)} gives an empty output {list(spatial)}")
    return [first[:layer.axis] + (layer.num_output,) + spatial] * len(bottom_shapes)


def each_bottom(layer, bottoms, conv):
    """Apply `conv` to every bottom with the axes before the channel axis folded into one batch axis,
    and unfold them again; one top per bottom."""
    if layer.axis == 1 and len(bottoms) == 1:
        return conv(bottoms[0])
    tops = [from_nchw(conv(to_nchw(x, layer.axis)), x.shape[:layer.axis]) for x in bottoms]
    return tops[0] if len(tops) == 1 else tuple(tops)


def pads_onednn_blocks(channels):
    """Whether oneDNN's plain-layout CPU convolution pads `channels` (>= 8, not a multiple of 16) to its
    16-channel blocks: there its channels-last kernels, which do not pad, run forward and backward
    ~1.2-1.4x faster (LeNet's conv2, 20 -> 50 channels: 7.5 ms -> 5.9 ms a training iteration on one
    thread); for 1 or 3 channels, or multiples of 16, the plain layout is as fast or faster."""
    return channels >= 8 and channels % 16 != 0


def as_channels_last(t):
    """t in the channels-last layout. A one-channel NCHW tensor is already in that memory order, and
    .contiguous(channels_last) leaves its strides as they are (oneDNN then answers in NCHW): it is restrided."""
    if t.shape[1] == 1 and t.is_contiguous():
        _, _, h, w = t.shape
        return t.as_strided(t.shape, (h * w, 1, w, 1))
    return t.contiguous(memory_format=torch.channels_last)


class _ChannelsLastConv2d(torch.autograd.Function):
    """conv2d forward and backward in the channels-last layout. The top comes back in the plain layout, or
    channels-last where `channels_last_top` (every reader takes that layout: plan.mark_channels_last); the
    input's gradient in the layout the input came in. The backward computes only the gradients autograd asks
    for (Caffe's propagate_down)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad, dilation, channels_last_top):
        ctx.plain_input = x.is_contiguous()
        x, weight = as_channels_last(x), as_channels_last(weight)
        ctx.save_for_backward(x, weight)
        ctx.settings, ctx.has_bias = (stride, pad, dilation), bias is not None
        top = F.conv2d(x, weight, bias, stride, pad, dilation)
        return top if channels_last_top else top.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, pad, dilation = (list(v) if isinstance(v, tuple) else [v, v] for v in ctx.settings)
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        dx, dw, db = torch.ops.aten.convolution_backward(
            as_channels_last(grad), x, weight, [weight.shape[0]], stride, pad, dilation, False, [0, 0], 1, need)
        if dx is not None and ctx.plain_input:
            dx = dx.contiguous()
        return dx, None if dw is None else dw.contiguous(), db, None, None, None, None


@leaf_function
def train_conv2d(x, weight, bias, stride, pad, dilation, group, channels_last_top=False):
    """F.conv2d for a TRAIN-phase layer that takes channels-last inputs (Convolution.takes_channels_last: oneDNN
    pads its channels, pads_onednn_blocks, or it has one). Where gradients are taken on the CPU it runs through
    _ChannelsLastConv2d (for one channel only where its top stays channels-last: `channels_last_top`); its top
    is in the plain layout unless `channels_last_top`."""
    if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (x.requires_grad or weight.requires_grad) and (channels_last_top or pads_onednn_blocks(x.shape[1]))):
        return _ChannelsLastConv2d.apply(x, weight, bias, stride, pad, dilation, channels_last_top)
    top = F.conv2d(x, weight, bias, stride, pad, dilation, group)
    return top if channels_last_top or top.is_contiguous() else top.contiguous()


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
        # the usual case (one bottom, channels on axis 1): forward makes one call with arguments made here
        self._plain_args = None
        if not self.bottom_is_im2col and len(bottom_shapes) == 1 and self.axis == 1:
            self._plain_args = ((() if self.bias_term else (None,))
                                + tuple(_short(v) for v in (self.stride, self.pad, self.dilation)) + (self.group,))
        self._function = _CONV[self.nsp]
        # plan.mark_channels_last may let such a layer's producer hand it a channels-last bottom
        self.takes_channels_last = (self._plain_args is not None and phase == TRAIN and self.nsp == 2
                                    and self.group == 1 and (pads_onednn_blocks(channels) or channels == 1))
        if self.takes_channels_last:
            self._function = train_conv2d
            self._plain_args += (False,)
        if not self.bottom_is_im2col:
            for i, extent in enumerate(kernel_extents(self)):
                size = bottom_shapes[0][self.axis + 1 + i]
                if size + 2 * self.pad[i] < extent:
                    raise ValueError(f"{self.what}: spatial size {size} with pad {self.pad[i]} is smaller "
                                     f"than the kernel extent {extent}")

    def top_shapes(self, bottom_shapes):
        if self.bottom_is_im2col:  # a 1x1 convolution of the column buffer
            return conv_top_shapes(self, bottom_shapes, lambda i, size: size)
        extents = kernel_extents(self)
        return conv_top_shapes(self, bottom_shapes, lambda i, size: (
            size + 2 * self.pad[i] - extents[i]) // self.stride[i] + 1)

    def lowered(self):
        return None if self._plain_args is None else (self._function, self._plain_args)

    def keep_channels_last(self):
        """Hand the top on channels-last under autograd on the CPU (every reader takes that layout)."""
        if self.takes_channels_last:
            self._plain_args = self._plain_args[:-1] + (True,)
            return True
        return False

    def forward(self, *bottoms):
        if self._plain_args is not None:  # (weight, bias) or (weight,) + (None, ...): F.conv2d's order
            return self._function(bottoms[0], *self.param_blobs(), *self._plain_args)
        weight, bias = (self.param_blobs() + (None,))[:2]
        if self.bottom_is_im2col:
            # segaware: the column buffer is used as is: a 1x1 (grouped) convolution, output size =
            # input size; stride, pad and dilation are ignored.
            w = weight.reshape(weight.shape[0], -1, *([1] * self.nsp))
            return each_bottom(self, bottoms, lambda x: _CONV[self.nsp](x, w, bias, 1, 0, 1, self.group))
        conv = _CONV[self.nsp]
        return each_bottom(self, bottoms, lambda x: conv(x, weight, bias, self.stride, self.pad, self.dilation,
                                                         self.group))
