"""im2dist: distances between each patch centre's embedding and its kh*kw neighbours' (segaware).

Reproduces caffe/src/caffe/util/im2dist.cpp (the CPU code; the goldens come from it):
- The centre of output position (h, w) is the input pixel h*sh - ph + (kh//2)*dh (and likewise
  for w), i.e. the kernel's middle tap; kh//2 truncates, so even kernels use the tap after the middle.
- Distances sum over channels: L1 = sum |centre - neighbour|, L2 = sum (centre - neighbour)^2 / 2
  (half the squared distance, not the Euclidean norm).
- A neighbour outside the image is not compared with zero padding: its distance is 0, or
  FLT_MAX/100 with remove_bounds.
- remove_center writes FLT_MAX/100 for the centre tap (its distance would be 0).
- If padding puts the centre itself outside the image, all kh*kw distances are 0, even with
  remove_center / remove_bounds, and no gradient flows from them.
- L1 backward (dist2im_cpu) uses sign(d) = +1 if d > 0 else -1, so a zero difference counts as
  -1, and an out-of-bounds neighbour (d stored as 0) still sends -top_diff to the centre pixel
  although its distance does not depend on it. That is not the gradient of the forward; it is the
  default here. `true_gradient=True` gives autograd's gradient instead (sign(0) = 0, nothing from
  out-of-bounds neighbours), which is also what the fork's GPU kernel computes for sign(0).
- L2 backward is the true gradient.
"""
import torch

from caffe_layers.ops.geometry import FLT_MAX_100, check_geometry, inside, pad_windows, window

NORMS = ("L1", "L2")


def _setup(x, kernel, pad, stride, dilation):
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, "im2dist")
    xp = pad_windows(x, pad, kernel, stride, dilation, out)  # extent past the padded input: see pad_windows
    centre = (kernel[0] // 2, kernel[1] // 2)
    rows = [inside(x.shape[2], pad[0], stride[0], i * dilation[0], out[0], x.device) for i in range(kernel[0])]
    cols = [inside(x.shape[3], pad[1], stride[1], j * dilation[1], out[1], x.device) for j in range(kernel[1])]
    return kernel, pad, stride, dilation, out, xp, centre, rows, cols


def _dist(x, kernel, pad, stride, dilation, norm, remove_center, remove_bounds):
    """The forward values; differentiable by autograd (the true gradient)."""
    kernel, pad, stride, dilation, out, xp, centre, rows, cols = _setup(x, kernel, pad, stride, dilation)
    c_val = window(xp, *centre, stride, dilation, out)
    c_in = rows[centre[0]][:, None] & cols[centre[1]][None, :]
    big = torch.tensor(FLT_MAX_100, dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    dists = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            if remove_center and (i, j) == centre:
                d = big.expand(x.shape[0], *out)
            else:
                diff = c_val - window(xp, i, j, stride, dilation, out)
                d = diff.abs().sum(1) if norm == "L1" else (diff * diff * 0.5).sum(1)
                n_in = rows[i][:, None] & cols[j][None, :]
                d = torch.where(n_in, d, big if remove_bounds else zero)
            dists.append(torch.where(c_in, d, zero))
    return torch.stack(dists, 1)


class _Im2distL1Caffe(torch.autograd.Function):
    """L1 im2dist whose backward is dist2im_cpu's (see the module docstring), not autograd's."""

    @staticmethod
    def forward(ctx, x, kernel, pad, stride, dilation, remove_center, remove_bounds):
        ctx.save_for_backward(x)
        ctx.geometry = (kernel, pad, stride, dilation)
        return _dist(x, kernel, pad, stride, dilation, "L1", remove_center, remove_bounds)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel, pad, stride, dilation, out, xp, centre, rows, cols = _setup(x, *ctx.geometry)
        c_val = window(xp, *centre, stride, dilation, out)
        c_in = (rows[centre[0]][:, None] & cols[centre[1]][None, :]).to(x.dtype)
        gxp = torch.zeros_like(xp)
        gc = window(gxp, *centre, stride, dilation, out)  # views into gxp
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                if (i, j) == centre:  # skipped by the original: the centre's own distance is constant
                    continue
                n_in = rows[i][:, None] & cols[j][None, :]
                diff = torch.where(n_in, c_val - window(xp, i, j, stride, dilation, out), 0.0)
                sign = torch.where(diff > 0, 1.0, -1.0).to(x.dtype)  # quirk: sign(0) = -1
                term = sign * (grad[:, i * kernel[1] + j, None] * c_in)
                gc += term
                # out-of-bounds neighbours land in the padding of gxp and are cropped away below
                window(gxp, i, j, stride, dilation, out).sub_(term)
        H, W = x.shape[2:]
        return gxp[:, :, pad[0]:pad[0] + H, pad[1]:pad[1] + W], None, None, None, None, None, None


def im2dist(x, kernel, pad=0, stride=1, dilation=1, norm="L2", remove_center=False, remove_bounds=False,
            true_gradient=False):
    """N x C x H x W embeddings -> N x (kh*kw) x H_out x W_out distances (see the module docstring).

    `norm` is "L1" or "L2" (half the squared distance; the original's default). `true_gradient`
    only matters for L1: the default reproduces the original CPU backward.
    """
    if norm not in NORMS:
        raise ValueError(f"im2dist: norm must be one of {NORMS}, got {norm!r}")
    if norm == "L1" and not true_gradient:  # _dist inside checks the geometry
        return _Im2distL1Caffe.apply(x, kernel, pad, stride, dilation, bool(remove_center), bool(remove_bounds))
    return _dist(x, kernel, pad, stride, dilation, norm, remove_center, remove_bounds)
