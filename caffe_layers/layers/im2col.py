"""Im2col: the convolution's patch matrix as a blob, N x (C*kh*kw) x H_out x W_out (Caffe's layout)."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.patch_geometry import from_nchw, patch_geometry, patch_top_shape, to_nchw
from caffe_layers.ops.im2col import im2col


@register("Im2col")
class Im2col(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis, self.kernel, self.pad, self.stride, self.dilation = patch_geometry(param, bottom_shapes[0])

    def top_shapes(self, bottom_shapes):
        return [patch_top_shape(self, bottom_shapes[0], bottom_shapes[0][self.axis] * self.kernel[0] * self.kernel[1])]

    def forward(self, x):
        y = im2col(to_nchw(x, self.axis), self.kernel, self.pad, self.stride, self.dilation)
        return from_nchw(y, x.shape[:self.axis])
