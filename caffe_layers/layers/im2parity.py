"""Im2parity (segaware): 1 where a neighbour has the patch centre's label, 0 where not (no backward).

Quirks (out-of-bounds neighbours read label 0, out-of-image centres give the ignore label, the last
channel wins) are documented in caffe_layers/ops/im2parity.py.
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, optional
from caffe_layers.layers.patch_geometry import from_nchw, patch_geometry, patch_top_shape, to_nchw
from caffe_layers.native import im2parity


@register("Im2parity")
class Im2parity(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis, self.kernel, self.pad, self.stride, self.dilation = patch_geometry(param, bottom_shapes[0])
        p = param.im2parity_param
        # uint32 in the proto, compared as a C++ int
        self.ignore_label = optional(p, "ignore_label", int)

    def top_shapes(self, bottom_shapes):
        return [patch_top_shape(self, bottom_shapes[0], self.kernel[0] * self.kernel[1])]

    def forward(self, labels):
        y = im2parity(to_nchw(labels, self.axis), self.kernel, self.pad, self.stride, self.dilation,
                      self.ignore_label)
        return from_nchw(y, labels.shape[:self.axis])
