"""Im2dist (segaware): distances from each patch centre's embedding to its kh*kw neighbours.

All quirks (FLT_MAX/100 for removed taps, zero for out-of-bounds neighbours and out-of-image
centres, L2 = half the squared distance, the L1 backward's sign(0) = -1) are documented in
caffe_layers/ops/im2dist.py. im2dist_param.true_gradient (ours) switches L1 to the true gradient.
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.patch_geometry import from_nchw, patch_geometry, patch_top_shape, to_nchw
from caffe_layers.native import im2dist
from caffe_layers.formats.proto import pb


@register("Im2dist")
class Im2dist(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.axis, self.kernel, self.pad, self.stride, self.dilation = patch_geometry(param, bottom_shapes[0])
        p = param.im2dist_param
        self.norm = pb.Im2distParameter.Norm.Name(p.norm)
        self.remove_center, self.remove_bounds = p.remove_center, p.remove_bounds
        self.true_gradient = p.true_gradient

    def top_shapes(self, bottom_shapes):
        return [patch_top_shape(self, bottom_shapes[0], self.kernel[0] * self.kernel[1])]

    def forward(self, x):
        y = im2dist(to_nchw(x, self.axis), self.kernel, self.pad, self.stride, self.dilation, self.norm,
                    self.remove_center, self.remove_bounds, self.true_gradient)
        return from_nchw(y, x.shape[:self.axis])
