"""The base class of every layer."""
import math

import torch
from torch import nn

from caffe_layers.errors import PrototxtError
from caffe_layers.formats.proto import check_blob_shape
from caffe_layers.layers.fillers import fill


class Layer(nn.Module):
    """One Caffe layer as a torch module.

    A subclass reads its settings from `param` (a caffe LayerParameter) in __init__, creating its
    parameter blobs with `add_blob`; `forward(*bottoms)` returns one top tensor or a tuple of them.
    `bottom_shapes` are the shapes of the bottoms, known when the net is built (Caffe's
    LayerSetUp). Top shapes are found by running forward on meta tensors; a layer whose forward
    cannot run on meta tensors overrides `top_shapes`.
    """

    is_loss = False  # loss layers get loss_weight 1 on their first top by default
    # Caffe's ExactNumBottomBlobs / MinBottomBlobs / MaxBottomBlobs and the same for tops, from the
    # original layer's header (None: not constrained); checked once here, as Layer::CheckBlobCounts.
    # Tops are not checked for a layer built without any (a module used on its own), nor their
    # minimum for loss layers (Caffe's AutoTopBlobs adds the missing ones).
    exact_bottoms = min_bottoms = max_bottoms = None
    exact_tops = min_tops = max_tops = None

    def __init__(self, param, bottom_shapes, phase):
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = phase
        self.blobs = nn.ParameterList()
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]
        self._check_blob_counts(len(self.bottom_shapes), len(param.top))

    def _check_blob_counts(self, bottoms, tops):
        checks = [("bottom", bottoms, self.exact_bottoms, self.min_bottoms, self.max_bottoms)]
        if tops:
            auto = self.is_loss and tops < (self.exact_tops or self.min_tops or 0)
            if not auto:
                checks.append(("top", tops, self.exact_tops, self.min_tops, self.max_tops))
        for what, n, exact, low, high in checks:
            if exact is not None and n != exact:
                expected, number = "exactly", exact
            elif low is not None and n < low:
                expected, number = "at least", low
            elif high is not None and n > high:
                expected, number = "at most", high
            else:
                continue
            raise PrototxtError(f"layer {self.name!r} ({self.param.type}): takes {expected} {number} {what} "
                                f"blob{'' if number == 1 else 's'}, got {n}")

    def add_blob(self, shape, filler_param=None, value=None):
        """Append a learnable blob, filled by a FillerParameter or a constant."""
        check_blob_shape(shape, f"layer {self.name!r}: parameter blob {len(self.blobs)}", PrototxtError)
        try:
            if filler_param is not None:
                data = fill(shape, filler_param)
            else:
                data = torch.full(tuple(shape), 0.0 if value is None else value)
        except RuntimeError as err:
            if not _too_large(err):
                raise
            raise PrototxtError(f"layer {self.name!r}: parameter blob {len(self.blobs)} of shape "
                                f"{list(shape)} cannot be allocated") from err
        self.blobs.append(nn.Parameter(data))
        return self.blobs[-1]

    def top_shapes(self, bottom_shapes):
        dtype = self.blobs[0].dtype if len(self.blobs) else torch.float32
        metas = tuple(torch.empty(s, dtype=dtype, device="meta") for s in bottom_shapes)
        state = {k: torch.empty_like(v, device="meta") for k, v in self.named_parameters()}
        state.update({k: torch.empty_like(v, device="meta") for k, v in self.named_buffers()})
        try:
            tops = torch.func.functional_call(self, state, metas)
        except RuntimeError as err:  # shapes only: what fails here is a size, e.g. a huge pad
            if not _too_large(err):
                raise
            raise PrototxtError(f"layer {self.name!r}: its settings make a blob too large for these "
                                f"bottoms ({err})") from err
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        return [tuple(t.shape) for t in tops]

    def extra_repr(self):
        return f"{self.name!r}"


def _too_large(err):
    text = str(err)
    return "Storage size calculation overflowed" in text or "can't allocate memory" in text


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
