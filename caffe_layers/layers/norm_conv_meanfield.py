"""NormConvMeanfield (segaware): CRF-as-RNN mean-field inference whose message passing is two
normalised convolutions instead of permutohedral filtering.

Bottoms: unary (N x C x H x W), q0 (the first iteration's softmax input, usually the unary again),
rgbxy (bilateral embeddings), xy (spatial embeddings, e.g. DummyData's "xy" filler). Per iteration:

    prob     = softmax(q) over channels
    spatial  = NormConv(prob, xy)     bilateral = NormConv(prob, rgbxy)   (L2 distances, group C,
               all-ones weights, fixed scale; conv 0 of the param lists is rgbxy, conv 1 is xy)
    q        = unary - compat @ (w_spatial @ spatial + w_bilateral @ bilateral)

Blobs (each 1 x 1 x C x C): spatial weights (identity), bilateral weights (identity), compatibility
(-identity: Potts). The original's backward is the true gradient of this, so autograd gives it.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.native import im2dist, norm_conv_filter
from caffe_layers.formats.proto import pb


@register("NormConvMeanfield")
class NormConvMeanfield(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.norm_conv_meanfield_param
        what = f"NormConvMeanfield layer {self.name!r}"
        if len(bottom_shapes) != 4:
            raise ValueError(f"{what} needs 4 bottoms (unary, q0, rgbxy, xy)")
        unary, q0, rgbxy, xy = bottom_shapes
        if any(len(s) != 4 for s in bottom_shapes) or q0 != unary or any(
                s[0] != unary[0] or s[2:] != unary[2:] for s in (rgbxy, xy)):
            raise ValueError(f"{what}: expected unary and q0 of one N x C x H x W shape and rgbxy, xy with the "
                             f"same N, H, W; got {[list(s) for s in bottom_shapes]}")
        if p.compatibility_mode != pb.NormConvMeanfieldParameter.POTTS:
            raise ValueError(f"{what}: only compatibility_mode POTTS exists")
        self.num_iterations = p.num_iterations
        # Quirk: the original sets its parameter diffs (zeroes, then sums its iterations) instead of
        # adding to them, so with iter_size > 1 only the last sub-batch's gradient survives. Kept by
        # default; norm_conv_meanfield_param { accumulate_param_diffs: true } (ours) accumulates.
        self.accumulate_param_diffs = p.accumulate_param_diffs
        if self.num_iterations <= 1:
            raise ValueError(f"{what}: num_iterations must be greater than 1, got {self.num_iterations}")

        def per_conv(name, default):
            values = list(getattr(p, name))
            if len(values) not in (0, 2):
                raise ValueError(f"{what}: {name} must be given once for each of the 2 normalised "
                                 f"convolutions (rgbxy, xy), got {len(values)} values")
            return values or [default, default]

        if len(p.kernel_size) != 2:
            raise ValueError(f"{what}: kernel_size must be given once for each of the 2 normalised convolutions")
        self.kernel = [int(k) for k in p.kernel_size]
        self.stride = per_conv("stride", 1)
        self.pad = per_conv("pad", 0)
        # The original's default dilation is 0 (a degenerate kernel); we ask for it instead.
        if len(p.dilation) != 2:
            raise ValueError(f"{what}: dilation must be given for each of the 2 normalised convolutions "
                             f"(the original's default, 0, is not a usable dilation)")
        self.dilation = [int(d) for d in p.dilation]
        # Quirk: the default scale is int(0.1) = 0 in the original (uniform weights over the patch).
        self.scale = [float(s) for s in per_conv("scale", 0.0)]
        self.remove_center = [bool(v) for v in per_conv("remove_center", True)]
        self.remove_bounds = [bool(v) for v in per_conv("remove_bounds", True)]
        # norm, scale_term and bias_term are read by nothing in the original: both convolutions are
        # always L2 with a scale and without bias.
        n, c, h, w = unary
        for i in range(2):
            extent = self.dilation[i] * (self.kernel[i] - 1) + 1
            for size in (h, w):
                if (size + 2 * self.pad[i] - extent) // self.stride[i] + 1 != size:
                    raise ValueError(f"{what}: convolution {i} (kernel {self.kernel[i]}, pad {self.pad[i]}, "
                                     f"stride {self.stride[i]}, dilation {self.dilation[i]}) must keep the "
                                     f"{h}x{w} size")
        self.channels = c
        eye = torch.eye(c).reshape(1, 1, c, c)
        self.add_blob((1, 1, c, c), value=eye)   # spatial kernel weights
        self.add_blob((1, 1, c, c), value=eye)   # bilateral kernel weights
        self.add_blob((1, 1, c, c), value=-eye)  # compatibility: Potts

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def _overwrite_param_diffs(self):
        for blob in self.blobs:
            if blob.is_leaf and blob.requires_grad:
                handles = []

                def hook(grad, blob=blob, handles=handles):
                    if blob.grad is not None:
                        blob.grad.zero_()
                    handles.pop().remove()  # once per forward
                    return grad
                handles.append(blob.register_hook(hook))

    def forward(self, unary, q0, rgbxy, xy):
        if torch.is_grad_enabled() and not self.accumulate_param_diffs and unary.device.type != "meta":
            self._overwrite_param_diffs()
        c = self.channels
        dists, weights = [], []
        for i, emb in enumerate((rgbxy, xy)):
            dists.append(im2dist(emb, self.kernel[i], self.pad[i], self.stride[i], self.dilation[i], "L2",
                                 self.remove_center[i], self.remove_bounds[i]))
            weights.append(torch.ones(c, 1, self.kernel[i], self.kernel[i], dtype=unary.dtype, device=unary.device))
        scales = [torch.tensor(s, dtype=unary.dtype, device=unary.device) for s in self.scale]
        w_spatial, w_bilateral, compat = (b.reshape(c, c) for b in self.blobs)
        q = q0
        for _ in range(self.num_iterations):
            prob = torch.softmax(q, dim=1)
            filtered = [norm_conv_filter(prob, dists[i], weights[i], None, scales[i], self.pad[i], self.stride[i],
                                         self.dilation[i], group=c) for i in range(2)]
            bilateral, spatial = filtered
            message = (torch.einsum("oc,nchw->nohw", w_spatial, spatial)
                       + torch.einsum("oc,nchw->nohw", w_bilateral, bilateral))
            q = unary - torch.einsum("oc,nchw->nohw", compat, message)
        return q
