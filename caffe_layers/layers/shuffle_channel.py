"""ShuffleChannel (farmingyard/ShuffleNet's Caffe layer): with g = shuffle_channel_param.group,
view the channels as (g, C/g), transpose to (C/g, g) and flatten: output channel j*g + i is input
channel i*(C/g) + j. Backward is autograd (the inverse permutation, as the original's).
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("ShuffleChannel")
class ShuffleChannel(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.group = param.shuffle_channel_param.group
        if self.group < 1:
            raise ValueError(f"layer {self.name!r} (ShuffleChannel): group must be at least 1")

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] % self.group:
            raise ValueError(f"layer {self.name!r} (ShuffleChannel): channels ({list(x.shape)}) must "
                             f"divide into group {self.group}")
        n, c = x.shape[:2]
        rest = x.shape[2:]
        return x.reshape(n, self.group, c // self.group, *rest).transpose(1, 2).reshape(x.shape)
