"""NormConv (segaware): normalised convolution of an image (bottom 0) guided by embeddings (bottom 1).

Settings come from convolution_param (kernel, pad, stride, dilation, num_output, group, bias_term,
fillers) and norm_conv_param (norm L1/L2, scale_term with scale_filler, remove_center,
remove_bounds). Blobs: weight, then bias (if bias_term), then the 1-element scale (if scale_term).
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.patch_geometry import patch_geometry, patch_top_shape
from caffe_layers.native import im2dist, norm_conv_filter
from caffe_layers.formats.proto import pb


@register("NormConv")
class NormConv(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        cp, ncp = param.convolution_param, param.norm_conv_param
        if len(bottom_shapes) != 2:
            raise ValueError(f"NormConv layer {self.name!r} needs 2 bottoms (image, embeddings)")
        img, emb = bottom_shapes
        if len(img) != 4 or len(emb) != 4 or img[0] != emb[0] or img[2:] != emb[2:]:
            raise ValueError(f"NormConv layer {self.name!r}: image {list(img)} and embeddings {list(emb)} must be "
                             f"N x C x H x W with the same N, H and W")
        if cp.bottom_is_im2col:
            raise ValueError(f"NormConv layer {self.name!r}: bottom_is_im2col is not supported (the original's "
                             f"NormConv still runs im2col on such a bottom, overrunning its buffer)")
        self.axis, self.kernel, self.pad, self.stride, self.dilation = patch_geometry(param, img)
        if self.axis != 1:
            raise ValueError(f"NormConv layer {self.name!r}: only channel axis 1 is supported")
        self.group = cp.group
        if cp.num_output <= 0 or img[1] % self.group or cp.num_output % self.group:
            raise ValueError(f"NormConv layer {self.name!r}: num_output {cp.num_output} and channels {img[1]} "
                             f"must be positive multiples of group {self.group}")
        self.norm = pb.NormConvParameter.Norm.Name(ncp.norm)
        self.remove_center, self.remove_bounds = ncp.remove_center, ncp.remove_bounds
        self.bias_term, self.scale_term = cp.bias_term, ncp.scale_term
        self.add_blob((cp.num_output, img[1] // self.group) + tuple(self.kernel), cp.weight_filler)
        if self.bias_term:
            self.add_blob((cp.num_output,), cp.bias_filler)
        if self.scale_term:
            self.add_blob((1,), ncp.scale_filler)
        self.is_1x1 = self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0)
        # Quirk of the original: for a 1x1 kernel with stride 1 and pad 0 its backward writes no image
        # diff (col2im is skipped). norm_conv_param { drop_1x1_image_grad: false } (ours): the true gradient.
        self.drop_1x1_image_grad = ncp.drop_1x1_image_grad

    def top_shapes(self, bottom_shapes):
        img, emb = (tuple(s) for s in bottom_shapes)
        if len(img) != 4 or len(emb) != 4 or img[0] != emb[0] or img[2:] != emb[2:]:
            raise ValueError(f"NormConv layer {self.name!r}: image {list(img)} and embeddings {list(emb)} must be "
                             f"N x C x H x W with the same N, H and W")
        return [patch_top_shape(self, img, self.blobs[0].shape[0])]

    def forward(self, img, emb):
        dist = im2dist(emb, self.kernel, self.pad, self.stride, self.dilation, self.norm,
                       self.remove_center, self.remove_bounds)
        if self.is_1x1 and self.drop_1x1_image_grad:
            img = img.detach()
        blobs = self.param_blobs()
        bias = blobs[1] if self.bias_term else None
        scale = blobs[-1] if self.scale_term else None
        return norm_conv_filter(img, dist, blobs[0], bias, scale, self.pad, self.stride, self.dilation,
                                self.group)
