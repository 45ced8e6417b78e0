"""UniqueLabel (DeepLab v2, as in segaware): each image's distinct labels, sorted, padded with -1.

N x 1 x H x W labels -> N x max_labels x 1 x 1; ignore_label values are dropped, force_label values
always included; more distinct values than max_labels is an error, as in the original.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("UniqueLabel")
class UniqueLabel(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.unique_label_param
        shape = self.bottom_shapes[0]
        if len(shape) > 4 or (len(shape) > 1 and shape[1] != 1):
            raise ValueError(f"layer {self.name!r} (UniqueLabel): input must be N x 1 x H x W, got {list(shape)}")
        if not p.HasField("max_labels"):
            raise ValueError(f"layer {self.name!r} (UniqueLabel): unique_label_param.max_labels is required")
        self.max_labels = int(p.max_labels)
        self.ignore = sorted(set(float(v) for v in p.ignore_label))
        self.force = sorted(set(float(v) for v in p.force_label))
        if self.max_labels <= len(self.force):
            raise ValueError(f"layer {self.name!r} (UniqueLabel): max_labels {self.max_labels} must exceed the "
                             f"{len(self.force)} forced labels")

    def top_shapes(self, bottom_shapes):
        return [(bottom_shapes[0][0], self.max_labels, 1, 1)]

    def forward(self, labels):
        n = labels.shape[0]
        top = torch.full((n, self.max_labels, 1, 1), -1.0, dtype=labels.dtype, device=labels.device)
        force = torch.tensor(self.force, dtype=labels.dtype, device=labels.device)
        ignore = torch.tensor(self.ignore, dtype=labels.dtype, device=labels.device)
        for i in range(n):
            vals = labels[i].detach().reshape(-1)
            vals = vals[~torch.isin(vals, ignore)]
            vals = torch.unique(torch.cat([vals, force]))  # sorted, like std::set
            if vals.numel() > self.max_labels:
                raise ValueError(f"layer {self.name!r} (UniqueLabel): image {i} has {vals.numel()} distinct labels, "
                                 f"more than max_labels {self.max_labels}")
            top[i, :vals.numel(), 0, 0] = vals
        return top
