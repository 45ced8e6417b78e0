"""DistLoss: the segaware contrastive hinge on im2dist distances, with the original's backward.

Reproduces caffe/src/caffe/layers/dist_loss_layer.cpp (CPU; the goldens come from it):
- parity is read as a C++ int (truncated). Entries equal to the ignore label are skipped;
  nonzero parity (same label) costs max(dist - alpha, 0), zero parity max(beta - dist, 0).
- loss = sum of those hinges / count, where count is every element of dist, ignored ones included.
- Backward writes diff / count into the dist gradient, diff being +hinge (same) or -hinge (different):
  the gradient of half the *squared* hinge, not of the loss computed in forward, and the top diff
  (hence loss_weight) is ignored. The parity input gets no gradient.
- The diff buffer is zeroed only for the first image (caffe_set of C*H*W elements), so an ignored
  entry of image n >= 1 keeps the value the buffer held from the previous forward (`stale`).
`true_gradient=True` gives autograd's gradient of the forward loss instead (times the top diff).
The fork's GPU DistLoss differs (it only processes the first image); the CPU code is followed.
"""
import torch


def dist_loss_masks(dist, parity, ignore_label):
    """(kept entries, same-label entries) of parity, as booleans."""
    if parity.shape != dist.shape:
        raise ValueError(f"dist_loss: parity shape {list(parity.shape)} must equal dist shape {list(dist.shape)}")
    p = parity.detach().trunc()
    keep = torch.ones_like(p, dtype=torch.bool) if ignore_label is None else p != ignore_label
    return keep, p != 0


def dist_loss_diff(dist, parity, alpha, beta, ignore_label=None, stale=None, masks=None):
    """The original's diff_ buffer: +max(d - alpha, 0) (same), -max(beta - d, 0) (different).

    Ignored entries are 0 in the first image and `stale` (the previous buffer, same shape) after it.
    `masks`: dist_loss_masks(dist, parity, ignore_label), where the caller has them.
    """
    keep, same = masks or dist_loss_masks(dist, parity, ignore_label)
    d = dist.detach()
    diff = torch.where(same, (d - alpha).clamp_min(0), -(beta - d).clamp_min(0))
    if stale is None or d.shape[0] == 1:
        return torch.where(keep, diff, 0.0)
    old = stale.to(d).reshape(d.shape).clone()
    old[:1] = 0
    return torch.where(keep, diff, old)


class _DistLossCaffe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dist, loss, diff):
        ctx.save_for_backward(diff)
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff / diff.numel(), None, None  # quirk: the top diff (loss_weight) is not used


def dist_loss(dist, parity, alpha, beta, ignore_label=None, true_gradient=False, diff=None, masks=None):
    """Scalar loss sum(hinge) / dist.numel(); see the module docstring for its backward.

    `diff` is the buffer from dist_loss_diff (computed here, without stale values, when not given);
    the layer passes its own to carry stale values between calls, and its masks (dist_loss_masks).
    """
    keep, same = masks or dist_loss_masks(dist, parity, ignore_label)
    # the sum in at least float32 (a float16 sum overflows), the loss in dist's dtype
    acc = torch.promote_types(dist.dtype, torch.float32)
    if true_gradient:
        hinge = torch.where(same, (dist - alpha).clamp_min(0), (beta - dist).clamp_min(0))
        return (torch.where(keep, hinge, torch.zeros_like(hinge)).sum(dtype=acc) / dist.numel()).to(dist.dtype)
    if diff is None:
        diff = dist_loss_diff(dist, parity, alpha, beta, ignore_label, masks=(keep, same))
    # diff is +hinge (same) or -hinge (different) at the kept entries: the same hinge values, summed
    loss = (torch.where(keep, diff.abs(), 0.0).sum(dtype=acc) / dist.numel()).to(dist.dtype)
    return _DistLossCaffe.apply(dist, loss, diff)
