"""ReLU6 (community Caffe forks, e.g. the MobileNet-v2 ports; OpenCV dnn has it built in):
min(max(x, 0), 6). No parameters. Gradient 1 on (0, 6), 0 elsewhere.
"""
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("ReLU6")
class ReLU6(Layer):
    def forward(self, x):
        return F.relu6(x)
