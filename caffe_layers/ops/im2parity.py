"""im2parity: does each neighbour carry the patch centre's label? (segaware, forward only).

Reproduces caffe/src/caffe/util/im2parity.cpp:
- Labels are read as C++ ints (truncated toward zero).
- A neighbour outside the image reads label 0 (so it is "same" exactly when the centre is 0), and is
  never ignored on that account.
- With an ignore label, a pair with either label equal to it gives the ignore label.
- A patch whose centre lies outside the image gives the ignore label at every tap. The original
  writes its ignore_label_ member there even when no ignore label was set (then uninitialised);
  here that case writes `ignore_label` if given, else `missing_value` (0, the proto default).
- Every channel writes the same kh*kw output rows, so with C > 1 the last channel wins.
"""
import torch

from caffe_layers.ops.geometry import check_geometry, inside, pad_windows, window


def im2parity(labels, kernel, pad=0, stride=1, dilation=1, ignore_label=None, missing_value=0):
    """N x C x H x W labels -> N x (kh*kw) x H_out x W_out of 1 (same label), 0, or ignore_label."""
    kernel, pad, stride, dilation, out = check_geometry(labels, kernel, pad, stride, dilation, "im2parity")
    lab = labels[:, -1:].detach().trunc()  # C > 1: the last channel overwrites the others
    lp = pad_windows(lab, pad, kernel, stride, dilation, out)  # out-of-bounds neighbours read 0
    centre = (kernel[0] // 2, kernel[1] // 2)
    c_val = window(lp, *centre, stride, dilation, out)[:, 0]
    c_in = (inside(labels.shape[2], pad[0], stride[0], centre[0] * dilation[0], out[0], labels.device)[:, None]
            & inside(labels.shape[3], pad[1], stride[1], centre[1] * dilation[1], out[1], labels.device)[None, :])
    outside = float(ignore_label if ignore_label is not None else missing_value)
    parity = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            here = window(lp, i, j, stride, dilation, out)[:, 0]
            p = (here == c_val).to(labels.dtype)
            if ignore_label is not None:
                ign = (here == ignore_label) | (c_val == ignore_label)
                p = torch.where(ign, torch.full_like(p, float(ignore_label)), p)
            parity.append(torch.where(c_in, p, torch.full_like(p, outside)))
    return torch.stack(parity, 1)
