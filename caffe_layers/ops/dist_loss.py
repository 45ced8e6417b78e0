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


def _masks(dist, parity, ignore_label):
    if parity.shape != dist.shape:
        raise ValueError(f"dist_loss: parity shape {list(parity.shape)} must equal dist shape {list(dist.shape)}")
    p = parity.detach().trunc()
    keep = torch.ones_like(p, dtype=torch.bool) if ignore_label is None else p != ignore_label
    return keep, p != 0


def dist_loss_diff(dist, parity, alpha, beta, ignore_label=None, stale=None):
    """The original's diff_ buffer: +max(d - alpha, 0) (same), -max(beta - d, 0) (different).

    Ignored entries are 0 in the first image and `stale` (the previous buffer, same shape) after it.
    """
    keep, same = _masks(dist, parity, ignore_label)
    d = dist.detach()
    diff = torch.where(same, (d - alpha).clamp_min(0), -(beta - d).clamp_min(0))
    old = torch.zeros_like(d) if stale is None else stale.to(d).reshape(d.shape).clone()
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


def dist_loss(dist, parity, alpha, beta, ignore_label=None, true_gradient=False, diff=None):
    """Scalar loss sum(hinge) / dist.numel(); see the module docstring for its backward.

    `diff` is the buffer from dist_loss_diff (computed here, without stale values, when not given);
    the layer passes its own to carry stale values between calls.
    """
    keep, same = _masks(dist, parity, ignore_label)
    hinge = torch.where(same, (dist - alpha).clamp_min(0), (beta - dist).clamp_min(0))
    # the sum in at least float32 (a float16 sum overflows), the loss in dist's dtype
    acc = torch.promote_types(dist.dtype, torch.float32)
    loss = (torch.where(keep, hinge, torch.zeros_like(hinge)).sum(dtype=acc) / dist.numel()).to(dist.dtype)
    if true_gradient:
        return loss
    if diff is None:
        diff = dist_loss_diff(dist, parity, alpha, beta, ignore_label)
    return _DistLossCaffe.apply(dist, loss.detach(), diff)
