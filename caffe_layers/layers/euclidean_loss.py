"""EuclideanLoss: sum((a - b)^2) / (2 N); both bottoms get gradients."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("EuclideanLoss")
class EuclideanLoss(Layer):
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if len(bottom_shapes) != 2:
            raise ValueError(f"layer {self.name!r}: EuclideanLoss takes 2 bottoms")

    def forward(self, a, b):
        if a.shape[0] != b.shape[0] or a.numel() != b.numel():
            raise ValueError(f"layer {self.name!r}: bottoms {list(a.shape)} and {list(b.shape)} "
                             f"must have the same num and count")
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2
