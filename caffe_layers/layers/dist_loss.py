"""DistLoss (segaware): contrastive hinge loss on Im2dist distances given Im2parity labels.

The loss is sum(hinge) / count over all elements; the original backward (kept by default) gives
+-hinge / count regardless of loss_weight and carries stale values for ignored entries of images
after the first (see caffe_layers/ops/dist_loss.py). dist_loss_param.true_gradient (ours) gives
the gradient of the forward loss instead.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, optional
from caffe_layers.layers.patch_geometry import patch_geometry
from caffe_layers.ops.dist_loss import dist_loss, dist_loss_diff, dist_loss_masks


@register("DistLoss")
class DistLoss(Layer):
    exact_bottoms = 2
    exact_tops = 1
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if len(bottom_shapes) != 2:
            raise ValueError(f"layer {self.name!r} (DistLoss): needs 2 bottoms (dist, parity), got {len(bottom_shapes)}")
        dist, parity = self.bottom_shapes
        if len(dist) != 4 or tuple(parity) != tuple(dist):
            raise ValueError(f"layer {self.name!r} (DistLoss): needs a 4-D dist and a parity of the same "
                             f"shape, got {list(dist)} and {list(parity)}")
        patch_geometry(param, dist)  # the original validates convolution_param (kernel_size required), unused
        p = param.dist_loss_param
        if not (p.HasField("alpha") and p.HasField("beta")):
            raise ValueError(f"layer {self.name!r} (DistLoss): dist_loss_param needs alpha and beta")
        if not 0 < p.alpha < p.beta:
            raise ValueError(f"layer {self.name!r} (DistLoss): need 0 < alpha < beta, got alpha {p.alpha}, beta {p.beta}")
        self.alpha, self.beta = p.alpha, p.beta
        self.ignore_label = optional(p, "ignore_label", int)
        self.true_gradient = p.true_gradient
        self._stale = None  # the original's diff_ buffer (flat), kept between forwards

    def top_shapes(self, bottom_shapes):
        return [()]

    def forward(self, dist, parity):
        if self.true_gradient or torch.compiler.is_exporting():
            # an exported program keeps no state between calls; the stale buffer only ever changes the backward
            return dist_loss(dist, parity, self.alpha, self.beta, self.ignore_label, true_gradient=self.true_gradient)
        stale = self._stale
        n = dist.numel()
        # Caffe's Blob keeps its memory when the count does not grow (zeroed when it reallocates)
        if stale is not None and (stale.numel() < n or stale.device != dist.device or stale.dtype != dist.dtype):
            stale = None
        prev = None if stale is None else stale[:n].reshape(dist.shape)
        masks = dist_loss_masks(dist, parity, self.ignore_label)
        diff = dist_loss_diff(dist, parity, self.alpha, self.beta, self.ignore_label, prev, masks)
        if stale is None or stale.numel() == n:  # (a fresh buffer would be zeros, then all of diff written)
            self._stale = diff.reshape(-1)
        else:  # a copy: the old buffer may be an earlier forward's diff, saved for its backward
            self._stale = stale.clone()
            self._stale[:n] = diff.reshape(-1)
        return dist_loss(dist, parity, self.alpha, self.beta, self.ignore_label, diff=diff, masks=masks)
