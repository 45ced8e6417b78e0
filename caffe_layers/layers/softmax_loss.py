"""SoftmaxWithLoss: multinomial logistic loss of softmax(bottom 0) against integer labels."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.accuracy import check_label_count, gather_labels, labels_per_prediction
from caffe_layers.layers.base import Layer, optional
from caffe_layers.formats.proto import pb

NORM = pb.LossParameter
FLT_MIN = 1.1754943508222875e-38


def loss_normalization(loss_param, default=None):
    """Caffe's rule: the legacy `normalize` applies only when `normalization` is not set; with neither
    set, `default` if given, else the proto default (VALID)."""
    if not loss_param.HasField("normalization"):
        if loss_param.HasField("normalize"):
            return NORM.VALID if loss_param.normalize else NORM.BATCH_SIZE
        if default is not None:
            return default
    return loss_param.normalization


def normalizer(mode, outer, inner, valid_count):
    """Caffe's get_normalizer, at least 1 (so an all-ignored batch gives 0, not NaN)."""
    if mode == NORM.FULL:
        n = outer * inner
    elif mode == NORM.VALID:
        n = valid_count
    elif mode == NORM.BATCH_SIZE:
        n = outer
    elif mode == NORM.NONE:
        n = 1
    else:
        raise ValueError(f"unknown loss normalization mode {mode}")
    return torch.clamp(torch.as_tensor(n, dtype=valid_count.dtype, device=valid_count.device), min=1.0)


def _count_normalizer(mode, outer, inner):
    """normalizer() as a number where every label is valid (no ignore_label)."""
    if mode == NORM.FULL or mode == NORM.VALID:
        n = outer * inner
    elif mode == NORM.BATCH_SIZE:
        n = outer
    elif mode == NORM.NONE:
        n = 1
    else:
        raise ValueError(f"unknown loss normalization mode {mode}")
    return float(max(n, 1))


def _softmax_loss(x, lab, valid, mode, name):
    """(loss, prob, safe labels, valid as x's dtype or None, normalizer) of Caffe's forward; `valid` None:
    every label counts (the products with an all-ones mask are skipped: they change no value)."""
    outer, classes, inner = x.shape
    prob = torch.softmax(x, 1)
    if valid is None:
        safe, v, norm = lab, None, _count_normalizer(mode, outer, inner)
    else:
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        v = valid.to(x.dtype)
        norm = normalizer(mode, outer, inner, v.sum())
    logs = torch.log(gather_labels(prob, safe, name).clamp(min=FLT_MIN))
    if v is not None:
        logs = logs * v
        return -logs.sum() / norm, prob, safe, v, norm
    return logs.sum() / -norm, prob, safe, v, norm  # (the same number: one call fewer)


class _SoftmaxLoss(torch.autograd.Function):
    """Caffe's forward and backward: d bottom = (prob - onehot) * top_diff / normalizer, 0 where ignored.

    The backward ignores the FLT_MIN clamp of the forward's log, as Caffe does.
    """

    @staticmethod
    def forward(ctx, x, lab, valid, mode, name):
        loss, prob, safe, v, norm = _softmax_loss(x, lab, valid, mode, name)
        ctx.v, ctx.norm = v, norm
        ctx.save_for_backward(prob, safe)
        return loss, prob

    @staticmethod
    def backward(ctx, grad_loss, grad_prob):
        prob, safe = ctx.saved_tensors
        return _softmax_loss_diff(prob, safe, ctx.v, ctx.norm, grad_loss), None, None, None, None


def _softmax_loss_diff(prob, safe, v, norm, top_diff, minus_ones=None):
    """Caffe's bottom diff: (prob - onehot(label)) * top_diff / normalizer, 0 where v (the valid mask) is 0;
    `minus_ones`: -1 in safe's shape and prob's dtype, if the caller keeps one."""
    if minus_ones is None:
        minus_ones = torch.full(safe.shape, -1.0, dtype=prob.dtype, device=prob.device)
    diff = prob.scatter_add(1, safe, minus_ones)
    if v is not None:
        diff = diff * v
    return diff * (top_diff / norm)


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    exact_bottoms = 2
    min_tops, max_tops = 1, 2
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        lp = param.loss_param
        self.ignore_label = optional(lp, "ignore_label")
        self.mode = loss_normalization(lp)
        self.axis = param.softmax_param.axis
        self.num_tops = len(param.top)

    def top_shapes(self, bottom_shapes):
        scores, label = (tuple(s) for s in bottom_shapes)
        if scores[:1] != label[:1]:
            raise ValueError(f"layer {self.name!r}: scores and labels must have the same num, "
                             f"got {list(scores)} and {list(label)}")
        check_label_count(self.name, scores, label, self.axis)
        return [()] if self.num_tops < 2 else [(), scores]

    def forward(self, scores, label):
        axis = self.axis % scores.dim()
        s, lab, valid = labels_per_prediction(scores, label, axis, self.ignore_label, self.name)
        if torch.is_grad_enabled() and scores.requires_grad:
            loss, prob = _SoftmaxLoss.apply(s, lab, valid, self.mode, self.name)
        else:  # no graph to record (a test net, a frozen input): the same values without autograd.Function
            loss, prob = _softmax_loss(s, lab, valid, self.mode, self.name)[:2]
        if self.num_tops < 2:
            return loss
        # Caffe's second top shares the softmax data; diffs given to it do not reach the bottom.
        return loss, prob.detach().reshape(scores.shape)

    def caffe_forward(self, bottoms, tops):
        """forward's values written into the tops (engine/explicit.py); what the backward needs is kept, as
        Caffe's layer keeps prob_."""
        scores, label = bottoms
        s, lab, valid = labels_per_prediction(scores, label, self.axis % scores.dim(), self.ignore_label, self.name)
        loss, prob, safe, v, norm = _softmax_loss(s, lab, valid, self.mode, self.name)
        tops[0].copy_(loss)
        if len(tops) > 1:
            tops[1].copy_(prob.reshape(scores.shape))
        object.__setattr__(self, "_kept", (scores, prob, safe, v, norm))  # (not nn.Module's slower __setattr__)

    def caffe_backward(self, tops, top_diffs, bottoms, propagate_down):
        if not propagate_down[0]:  # (never to the labels: Caffe refuses, autograd gives them nothing)
            return None, None
        kept = getattr(self, "_kept", None)
        if kept is None or kept[0] is not bottoms[0] or kept[1].numel() != bottoms[0].numel():
            self.caffe_forward(bottoms, [torch.empty_like(t) for t in tops])  # no forward of these bottoms yet
            kept = self._kept
        _, prob, safe, v, norm = kept
        minus_ones = getattr(self, "_minus_ones", None)
        if (minus_ones is None or minus_ones.shape != safe.shape or minus_ones.dtype != prob.dtype
                or minus_ones.device != prob.device):
            minus_ones = torch.full(safe.shape, -1.0, dtype=prob.dtype, device=prob.device)
            object.__setattr__(self, "_minus_ones", minus_ones)
        diff = _softmax_loss_diff(prob, safe, v, norm, top_diffs[0], minus_ones)
        return diff.reshape(bottoms[0].shape), None
