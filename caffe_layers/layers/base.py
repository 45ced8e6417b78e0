"""The base class of every layer."""
import math

import torch
from torch import nn

from caffe_layers.layers.fillers import fill


class Layer(nn.Module):
    """One Caffe layer as a torch module.

    A subclass reads its settings from `param` (a caffe LayerParameter) in __init__, creating its
    parameter blobs with `add_blob`; `forward(*bottoms)` returns one top tensor or a tuple of them.
    `bottom_shapes` are the shapes of the bottoms, known when the net is built (Caffe's
    LayerSetUp); forward must not depend on them (a net may run at other input sizes).
    `top_shapes(bottom_shapes)` is Caffe's Reshape: plain arithmetic on the shapes (it validates them
    too). Elementwise layers set `same_shape = True`; a layer without a rule falls back to running
    forward on meta tensors (`meta_top_shapes`, slow: keep it for rare types).
    """

    is_loss = False  # loss layers get loss_weight 1 on their first top by default
    same_shape = False  # one top of bottom 0's shape

    def __init__(self, param, bottom_shapes, phase):
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = phase
        self.blobs = nn.ParameterList()
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]

    def add_blob(self, shape, filler_param=None, value=None):
        """Append a learnable blob, filled by a FillerParameter or a constant."""
        if filler_param is not None:
            data = fill(shape, filler_param)
        else:
            data = torch.full(tuple(shape), 0.0 if value is None else value)
        self.blobs.append(nn.Parameter(data))
        return self.blobs[-1]

    def param_blobs(self):
        """The parameter blobs as a tuple, for forward: indexing the ParameterList costs microseconds.
        (A blob shared under another shape is a parametrization, not in _parameters: the slow way.)"""
        plain = self.blobs._parameters
        return tuple(plain.values()) if len(plain) == len(self.blobs) else tuple(self.blobs)

    def top_shapes(self, bottom_shapes):
        if self.same_shape:
            return [tuple(bottom_shapes[0])]
        return meta_top_shapes(self, bottom_shapes)

    def extra_repr(self):
        return f"{self.name!r}"


def meta_top_shapes(layer, bottom_shapes):
    """The top shapes found by running the layer's forward on meta tensors (parameters and buffers
    replaced by meta copies); the fallback of `Layer.top_shapes` and the tests' check of the rules."""
    dtype = layer.blobs[0].dtype if len(layer.blobs) else torch.float32
    metas = tuple(torch.empty(s, dtype=dtype, device="meta") for s in bottom_shapes)
    state = {k: torch.empty_like(v, device="meta") for k, v in layer.named_parameters()}
    state.update({k: torch.empty_like(v, device="meta") for k, v in layer.named_buffers()})
    tops = torch.func.functional_call(layer, state, metas) if state else layer.forward(*metas)
    if isinstance(tops, torch.Tensor):
        tops = (tops,)
    return [tuple(t.shape) for t in tops]


def count(shape, start=0, end=None):
    return math.prod(shape[start:end])


def optional(msg, field, convert=None):
    """A proto field's value when it is set, else None (optionally passed through `convert`)."""
    if not msg.HasField(field):
        return None
    value = getattr(msg, field)
    return convert(value) if convert else value


def check_4d(shape, what):
    """For layers that take only (num, channels, height, width) blobs."""
    if len(shape) != 4:
        raise ValueError(f"{what}: input must have 4 axes (num, channels, height, width), got {list(shape)}")


def legacy_shape(shape):
    """Caffe's legacy (num, channels, height, width) of a blob of at most 4 axes: missing axes are 1."""
    return tuple(shape) + (1,) * (4 - len(shape))


def canonical_axis(axis, num_axes, layer_name="?"):
    if not -num_axes <= axis < num_axes:
        raise ValueError(f"layer {layer_name!r}: axis {axis} out of range for a {num_axes}-axis blob")
    return axis % num_axes
