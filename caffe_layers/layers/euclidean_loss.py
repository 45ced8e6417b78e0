"""EuclideanLoss: sum((a - b)^2) / (2 N); both bottoms get gradients."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


@register("EuclideanLoss")
class EuclideanLoss(Layer):
    exact_bottoms = 2
    exact_tops = 1
    is_loss = True

    def forward(self, a, b):
        if a.shape[0] != b.shape[0] or a.numel() != b.numel():
            raise ValueError(f"layer {self.name!r}: bottoms {list(a.shape)} and {list(b.shape)} "
                             f"must have the same num and count")
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2
