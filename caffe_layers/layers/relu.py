"""ReLU: max(0, x) + negative_slope * min(0, x)."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, leaf_function


def eager_without_autograd():
    """Whether a step may write into its bottom: eager (a traced graph would keep the in-place op for calls that
    record autograd) and nothing recorded (no_grad, inference_mode)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


@leaf_function
def relu_into_input(x):
    """torch.relu written into x where eager_without_autograd (TorchNet passes an x that no one reads after)."""
    return torch.relu_(x) if eager_without_autograd() else torch.relu(x)


@leaf_function
def leaky_relu_into_input(x, negative_slope):
    return F.leaky_relu_(x, negative_slope) if eager_without_autograd() else F.leaky_relu(x, negative_slope)


@register("ReLU")
class ReLU(Layer):
    exact_bottoms = 1
    exact_tops = 1
    same_shape = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = param.relu_param.negative_slope

    def lowered(self):
        return (torch.relu, ()) if self.negative_slope == 0 else (F.leaky_relu, (self.negative_slope,))

    def in_place_form(self, overwritable):
        """(function, constants, bottom order) writing the result into the bottom: see TorchNet's reuse."""
        if not overwritable[0]:
            return None
        if self.negative_slope == 0:
            return relu_into_input, (), [0]
        return leaky_relu_into_input, (self.negative_slope,), [0]

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)
