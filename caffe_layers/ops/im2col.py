"""im2col in Caffe's layout: rows are (channel, kernel row, kernel col), columns output positions."""
import torch.nn.functional as F

from caffe_layers.ops.geometry import check_geometry, pad_windows


def im2col(x, kernel, pad=0, stride=1, dilation=1):
    """N x C x H x W -> N x (C*kh*kw) x H_out x W_out; zero padding; backward is col2im (autograd)."""
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, "im2col")
    if any((o - 1) * st + d * (k - 1) + 1 > size + 2 * p
           for o, st, d, k, size, p in zip(out, stride, dilation, kernel, x.shape[2:], pad)):
        # the last window overruns the padded input (Caffe's size truncates to 1): see pad_windows
        x, pad = pad_windows(x, pad, kernel, stride, dilation, out), 0
    cols = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)
    return cols.reshape(x.shape[0], -1, *out)
