"""Deconvolution: the transpose of Convolution (Caffe's DeconvolutionLayer)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.convolution import _DECONV, conv_setup, conv_top_shapes, each_bottom, kernel_extents


@register("Deconvolution")
class Deconvolution(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p, channels = conv_setup(self, param, bottom_shapes, "Deconvolution")
        if p.bottom_is_im2col:
            raise ValueError(f"{self.what}: bottom_is_im2col is only supported by Convolution")
        # Caffe's reversed dimensions: weight is channels x (num_output / group) x kernel.
        self.add_blob([channels, self.num_output // self.group] + self.kernel, p.weight_filler)
        if self.bias_term:
            self.add_blob([self.num_output], p.bias_filler)
        for i, extent in enumerate(kernel_extents(self)):
            size = bottom_shapes[0][self.axis + 1 + i]
            if self.stride[i] * (size - 1) + extent - 2 * self.pad[i] <= 0:
                raise ValueError(f"{self.what}: output size along spatial axis {i} would be non-positive "
                                 f"(input {size}, kernel extent {extent}, pad {self.pad[i]})")

    def top_shapes(self, bottom_shapes):
        extents = kernel_extents(self)
        return conv_top_shapes(self, bottom_shapes, lambda i, size: (
            self.stride[i] * (size - 1) + extents[i] - 2 * self.pad[i]))

    def forward(self, *bottoms):
        weight, bias = (self.param_blobs() + (None,))[:2]
        # output size stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad, as Caffe
        return each_bottom(self, bottoms, lambda x: _DECONV[self.nsp](
            x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation))
