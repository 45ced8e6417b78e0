"""EPELoss: end-point error of a flow prediction, as FlowNet trains it.

The specification is segaware's L1Loss (l1loss_layer.cu) with l2_per_location: true, and it reads
the same l1_loss_param. Bottoms: prediction and ground truth (N, C, H, W), or one bottom that is
already their difference. Per location e = sqrt(sum_c d^2 + epsilon) (epsilon inside the root: a
Power layer with shift epsilon; 0.01 by default, so a perfect prediction still costs sqrt(0.01)
per pixel), loss = sum e / N. NaN entries of the difference (invalid ground truth) count as 0.
l2_prescale_by_channels divides sum_c d^2 by C; normalize_by_num_entries divides by the number of
non-NaN entries / C instead of N; plateau > 0 zeroes sum_c d^2 (value and gradient) where it is
below plateau^2.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("EPELoss")
class EPELoss(Layer):
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.l1_loss_param
        self.prescale = p.l2_prescale_by_channels
        self.by_entries = p.normalize_by_num_entries
        self.epsilon = p.epsilon
        self.plateau = p.plateau
        if len(bottom_shapes) not in (1, 2):
            raise ValueError(f"layer {self.name!r} (EPELoss): expected 1 or 2 bottoms, got {len(bottom_shapes)}")
        if len(bottom_shapes) == 2 and self.bottom_shapes[0] != self.bottom_shapes[1]:
            raise ValueError(f"layer {self.name!r} (EPELoss): prediction {self.bottom_shapes[0]} and ground "
                             f"truth {self.bottom_shapes[1]} must have the same shape")
        if len(self.bottom_shapes[0]) < 2:
            raise ValueError(f"layer {self.name!r} (EPELoss): bottoms need a channel axis, got "
                             f"{self.bottom_shapes[0]}")

    def top_shapes(self, bottom_shapes):
        return [()]

    def forward(self, *bottoms):
        d = bottoms[0] - bottoms[1] if len(bottoms) == 2 else bottoms[0]
        valid = ~torch.isnan(d)
        d = torch.where(valid, d, torch.zeros_like(d))
        c = d.shape[1]
        s = (d * d).sum(1)
        if self.prescale:
            s = s / c
        if self.plateau > 0:
            s = torch.where(s < self.plateau * self.plateau, torch.zeros_like(s), s)
        total = torch.sqrt(s + self.epsilon).sum()
        if self.by_entries:
            norm = valid.sum().to(d.dtype) / c
        else:
            norm = d.shape[0]
        return total / norm
