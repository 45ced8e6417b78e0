"""BatchNorm: y = (x - mean) / sqrt(var + eps) per channel (axis 1), no affine part (use Scale).

Blobs (as in Caffe): 0 running mean sum, 1 running variance sum, 2 scale factor; the stored
statistics are blob / scale factor (0 when the factor is 0). They get no gradient.
use_global_stats defaults to True in TEST and False in TRAIN.

- use_global_stats false (BVLC batch_norm_layer.cpp): batch mean and biased batch variance over
  all axes but 1; the forward also updates the blobs in place (no grad): factor = factor * f + 1,
  mean = f * mean + batch mean, var = f * var + m / (m - 1) * batch var (m = count / channels),
  f = moving_average_fraction. Backward: the true gradient (Caffe's formula is exactly that).
  The segaware fork's own version of this path is broken (it never computes the batch
  variance, dividing by a stale buffer, and its backward reads an unallocated cache), so BVLC's
  behaviour is used.
- use_global_stats true: the stored statistics; backward dy / sqrt(var + eps).
- update_global_stats (DeepLab v2 / segaware), in TRAIN with use_global_stats: the stored mean is
  still used, but the variance is the batch's E((x - stored mean)^2), also used to normalise;
  the blobs are updated as above with the stored mean as "batch mean" and that variance. The
  backward is still dy / sqrt(var + eps), the variance taken as a constant (the fork's quirk).
Unlike BVLC, the segaware fork does not force lr_mult 0 on the three blobs; neither does this
layer (configs set `param { lr_mult: 0 }` themselves).
batch_norm_param.scale_bias (NVIDIA caffe, in OpenCV's proto) adds blobs 3 and 4 (per-channel
scale, default 1, and bias, default 0) applied to the output.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import TEST, TRAIN


@register("BatchNorm")
class BatchNorm(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.batch_norm_param
        self.moving_average_fraction = p.moving_average_fraction
        if not 0 <= self.moving_average_fraction <= 1:
            raise ValueError(f"layer {self.name!r} (BatchNorm): moving_average_fraction must be in [0, 1], "
                             f"got {self.moving_average_fraction}")
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
        self.update_global_stats = p.update_global_stats
        self.eps = p.eps
        shape = self.bottom_shapes[0]
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.add_blob((self.channels,))
        self.add_blob((self.channels,))
        self.add_blob((1,))
        self.scale_bias = p.scale_bias  # NVIDIA caffe (OpenCV's proto): blobs 3, 4 scale and shift the output
        if self.scale_bias:
            self.add_blob((self.channels,), value=1.0)
            self.add_blob((self.channels,), value=0.0)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) > 1 and shape[1] != self.channels:
            raise ValueError(f"layer {self.name!r} (BatchNorm): bottom has {shape[1]} channels, "
                             f"expected {self.channels}")
        return [shape]

    def forward(self, x):
        channels = 1 if x.dim() == 1 else x.shape[1]
        shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 1 else (-1,)
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 1 else [0]
        blobs = [b.detach() for b in self.param_blobs()]
        m = x.numel() // channels
        if self.use_global_stats:
            factor = blobs[2][0]
            factor = torch.where(factor == 0, torch.zeros_like(factor), 1 / factor)
            mean = (blobs[0] * factor).reshape(shape)
            xc = x - mean
            if self.phase == TRAIN and self.update_global_stats:
                var = xc.detach().pow(2).mean(dims)  # around the stored mean; a constant for backward
                self._update(mean.reshape(-1), var, m)
            else:
                var = blobs[1] * factor
        else:
            mean = x.mean(dims, keepdim=True)
            xc = x - mean
            var = xc.pow(2).mean(dims)
            self._update(mean.detach().reshape(-1), var.detach(), m)
        y = xc / (var + self.eps).sqrt().reshape(shape)
        if self.scale_bias:
            y = y * self.blobs[3].reshape(shape) + self.blobs[4].reshape(shape)
        return y

    def _update(self, mean, var, m):
        f = self.moving_average_fraction
        correction = m / (m - 1) if m > 1 else 1.0
        with torch.no_grad():
            self.blobs[2].mul_(f).add_(1)
            self.blobs[0].mul_(f).add_(mean)
            self.blobs[1].mul_(f).add_(var * correction)
