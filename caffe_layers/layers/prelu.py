"""PReLU: max(x, 0) + a_c * min(x, 0), one slope per channel (axis 1) or one shared slope.

Caffe's backward treats x = 0 as negative (dy * a, slope diff dy * x), as torch.where does here.
"""
import torch.nn.functional as F

from caffe_layers.formats.proto import pb
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("PReLU")
class PReLU(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.prelu_param
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"layer {self.name!r} (PReLU): bottom must have at least 2 axes, got {list(shape)}")
        self.channel_shared = p.channel_shared
        filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant", value=0.25)
        # a shared slope is a 0-axis blob, as in Caffe
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise ValueError(f"layer {self.name!r} (PReLU): bottom must have at least 2 axes, got {list(shape)}")
        if not self.channel_shared and self.blobs[0].numel() != shape[1]:
            raise ValueError(f"layer {self.name!r} (PReLU): {self.blobs[0].numel()} slopes for {shape[1]} channels")
        return [shape]

    def lowered(self):
        return None if self.channel_shared else (F.prelu, ())

    def forward(self, x):
        # F.prelu is x where x > 0, else slope * x: Caffe's values and (x = 0 as negative) gradients
        (slope,) = self.param_blobs()
        return F.prelu(x, slope.reshape(1) if self.channel_shared else slope)
