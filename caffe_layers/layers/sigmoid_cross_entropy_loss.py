"""SigmoidCrossEntropyLoss: cross-entropy of sigmoid(bottom 0) against targets in [0, 1]."""
import math

import torch

from caffe_layers.layers import register
from caffe_layers.layers.accuracy import labels_as_int
from caffe_layers.layers.base import Layer, optional
from caffe_layers.layers.softmax_loss import NORM, loss_normalization, normalizer


class _SigmoidCE(torch.autograd.Function):
    """Caffe's stable loss -[x (t - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0]))]; backward sigmoid(x) - t.

    A custom backward because autograd through |x| gives 1 - t instead of 1/2 - t at x == 0.
    """

    @staticmethod
    def forward(ctx, x, target, valid, mode):
        pos = (x >= 0).to(x.dtype)
        v = valid.to(x.dtype)
        terms = x * (target - pos) - torch.log(1 + torch.exp(x - 2 * x * pos))
        norm = normalizer(mode, x.shape[0], x[0].numel(), v.sum())
        ctx.save_for_backward(x, target, v, norm)
        return -(terms * v).sum() / norm

    @staticmethod
    def backward(ctx, grad):
        x, target, v, norm = ctx.saved_tensors
        return (torch.sigmoid(x) - target) * v * (grad / norm), None, None, None


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(Layer):
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        lp = param.loss_param
        self.ignore_label = optional(lp, "ignore_label")
        # BVLC's rule; the segaware fork has no options and always divides by the batch size,
        # which is also the default here.
        self.mode = loss_normalization(lp, default=NORM.BATCH_SIZE)
        if len(bottom_shapes) != 2:
            raise ValueError(f"layer {self.name!r}: SigmoidCrossEntropyLoss takes 2 bottoms (scores, targets)")

    def top_shapes(self, bottom_shapes):
        x, target = (tuple(s) for s in bottom_shapes)
        if x[:1] != target[:1] or math.prod(x) != math.prod(target):
            raise ValueError(f"layer {self.name!r}: scores {list(x)} and targets {list(target)} "
                             f"must have the same num and count")
        return [()]

    def forward(self, x, target):
        target = target.detach().reshape(x.shape)
        if self.ignore_label is None:
            valid = torch.ones_like(x, dtype=torch.bool)
        else:
            valid = labels_as_int(target) != self.ignore_label
        return _SigmoidCE.apply(x, target, valid, self.mode)
