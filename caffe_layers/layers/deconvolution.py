"""Deconvolution: the transpose of Convolution (Caffe's DeconvolutionLayer)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.convolution import _DECONV, check_bottoms, conv_setup


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
        for i in range(self.nsp):
            extent = self.dilation[i] * (self.kernel[i] - 1) + 1
            size = bottom_shapes[0][self.axis + 1 + i]
            if self.stride[i] * (size - 1) + extent - 2 * self.pad[i] <= 0:
                raise ValueError(f"{self.what}: output size along spatial axis {i} would be non-positive "
                                 f"(input {size}, kernel extent {extent}, pad {self.pad[i]})")

    def forward(self, *bottoms):
        check_bottoms(self, bottoms)
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        tops = []
        for x in bottoms:
            lead = x.shape[:self.axis]
            x = x.reshape((-1,) + tuple(x.shape[self.axis:]))
            # output size stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad, as Caffe
            y = _DECONV[self.nsp](x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation)
            tops.append(y.reshape(tuple(lead) + tuple(y.shape[1:])))
        return tops[0] if len(tops) == 1 else tuple(tops)
