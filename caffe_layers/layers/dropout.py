"""Dropout. TRAIN: y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p) (torch's generator, not
Caffe's boost stream); TEST: identity. The backward uses the same mask and scale.

dropout_param.scale_train: false (caffe-fast-rcnn, in OpenCV's proto): TRAIN y = x * mask, TEST
y = x * (1 - p).
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import TRAIN


@register("Dropout")
class Dropout(Layer):
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.ratio = param.dropout_param.dropout_ratio
        if not 0 <= self.ratio < 1:
            raise ValueError(f"layer {self.name!r} (Dropout): dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.scale_train = param.dropout_param.scale_train
        self.mask = None  # the last TRAIN mask (0/1), like Caffe's rand_vec_

    def forward(self, x):
        if self.phase != TRAIN:
            return x.clone() if self.scale_train else x * (1.0 - self.ratio)
        if x.device.type == "meta":
            return torch.empty_like(x)
        mask = torch.bernoulli(torch.full_like(x, 1.0 - self.ratio))
        self.mask = mask
        return x * mask * self.scale if self.scale_train else x * mask
