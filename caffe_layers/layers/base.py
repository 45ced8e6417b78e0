"""The base class of every layer."""
import contextlib
import functools
import math

import numpy as np
import torch
from torch import nn

from caffe_layers.errors import PrototxtError
from caffe_layers.formats.proto import check_blob_shape
from caffe_layers.layers.fillers import fill, fill_into


_deferring = [False]


class stored_attribute:
    """A class attribute reading `name` from a module's `store` (_modules or _parameters): what
    nn.Module.__getattr__ finds, without its failed lookup first (0.1 us instead of 0.5 us, for every
    layer and blob a generated forward reads). Missing there, it falls back to nn.Module.__getattr__.
    A non-data descriptor: a value in the instance's own __dict__ still comes first."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        try:
            return module.__dict__[self.store][self.name]
        except KeyError:
            return nn.Module.__getattr__(module, self.name)


class _BlobList(nn.ParameterList):
    """A layer's parameter blobs; the layer itself writes and reads them in state dicts (as "<i>")."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args):
        pass


for _i in range(16):  # blob indices read as properties; more blobs take nn.Module.__getattr__
    setattr(_BlobList, str(_i), stored_attribute("_parameters", str(_i)))


LEAF_FUNCTIONS = []


def leaf_function(fn):
    """Mark a lowered form's function (Layer.lowered) that has Python control flow: a TorchNet traced again
    from its code (unpickling) keeps it one call instead of tracing into it."""
    LEAF_FUNCTIONS.append(fn)
    return fn


@contextlib.contextmanager
def deferred_fills():
    """Inside this block add_blob only allocates; the net fills what its weights do not give (fill_blobs)."""
    old, _deferring[0] = _deferring[0], True
    try:
        yield
    finally:
        _deferring[0] = old


def _refused_when_lowered(register):
    """nn.Module's hook `register` method, refused for a layer a TorchNet calls as its lowered form."""
    @functools.wraps(register)
    def checked(self, *args, **kwargs):
        self._refuse_hook_when_lowered()
        return register(self, *args, **kwargs)
    return checked


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
    # Caffe's ExactNumBottomBlobs / MinBottomBlobs / MaxBottomBlobs and the same for tops, from the
    # original layer's header (None: not constrained); checked once here, as Layer::CheckBlobCounts.
    # Tops are not checked for a layer built without any (a module used on its own), nor their
    # minimum for loss layers (Caffe's AutoTopBlobs adds the missing ones).
    exact_bottoms = min_bottoms = max_bottoms = None
    exact_tops = min_tops = max_tops = None
    same_shape = False  # one top of bottom 0's shape
    blobs = stored_attribute("_modules", "blobs")
    lowered_in = None  # the TorchNet calling this layer's lowered form (no module call), if one does

    def __init__(self, param, bottom_shapes, phase):
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = phase
        self.blobs = _BlobList()
        self.bottom_shapes = [tuple(s) for s in bottom_shapes]
        self.shared_blobs = set()  # indices of blobs that are another layer's (ParamSpec sharing)
        self._fills = []  # per blob: (filler_param, value), run by fill_blobs
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
        """Append a learnable blob, to be filled by a FillerParameter or a constant (a number or a tensor).

        The values are written by fill_blobs, which the net runs for the blobs its weights do not give, so
        that a net built with weights draws no random numbers it would throw away."""
        check_blob_shape(shape, f"layer {self.name!r}: parameter blob {len(self.blobs)}", PrototxtError)
        try:
            self.blobs.append(nn.Parameter(zeroed(tuple(shape))))
        except (RuntimeError, MemoryError, ValueError) as err:
            if isinstance(err, RuntimeError) and not _too_large(err):
                raise
            raise PrototxtError(f"layer {self.name!r}: parameter blob {len(self.blobs)} of shape "
                                f"{list(shape)} cannot be allocated") from err
        self._fills.append((filler_param, value))
        if not _deferring[0]:
            self._fill(len(self.blobs) - 1)
        return self.blobs[-1]

    def lowered(self):
        """(function, constants) where forward is function(*bottoms, *self.param_blobs(), *constants) for
        every input: the torch face then calls the function itself, its blobs as graph attributes, without
        a module call (per-layer overhead on small nets). None (the default): the module is called."""
        return None

    def _refuse_hook_when_lowered(self):
        if self.lowered_in is not None:
            raise ValueError(f"layer {self.name!r} runs as torch functions in TorchNet {self.lowered_in!r}, "
                             f"not as a module call: a module hook would not run; build the net with "
                             f"lower=False to hook its layers")

    register_forward_pre_hook = _refused_when_lowered(nn.Module.register_forward_pre_hook)
    register_forward_hook = _refused_when_lowered(nn.Module.register_forward_hook)
    register_full_backward_pre_hook = _refused_when_lowered(nn.Module.register_full_backward_pre_hook)
    register_full_backward_hook = _refused_when_lowered(nn.Module.register_full_backward_hook)

    def param_blobs(self):
        """The parameter blobs as a tuple, for forward: indexing the ParameterList costs microseconds.
        (A blob shared under another shape is a parametrization, not in _parameters: the slow way.)"""
        blobs = self._modules["blobs"]  # (no Module.__getattr__: this runs in every forward)
        plain = blobs._parameters
        return tuple(plain.values()) if len(plain) == len(blobs) else tuple(blobs)

    @torch.no_grad()
    def fill_blobs(self, loaded=()):
        """Fill every own blob whose id is not in `loaded`, in blob order."""
        for i in range(len(self._fills)):
            if i not in self.shared_blobs and id(self.blobs[i]) not in loaded:
                self._fill(i)

    @torch.no_grad()
    def _fill(self, i):
        """Fill blob i, which is still the zeroed memory add_blob allocated (a zero fill writes nothing)."""
        filler_param, value = self._fills[i]
        blob = self.blobs[i]
        if filler_param is not None and filler_param.type == "constant":
            value, filler_param = filler_param.value, None
        if filler_param is not None:
            try:  # drawn in float32 as Caffe's, in place where the blob is a float32 one
                if blob.dtype == torch.float32 and blob.is_contiguous():
                    fill_into(blob, filler_param)
                else:
                    blob.copy_(fill(blob.shape, filler_param))
            except ValueError as err:  # the filler's settings; the net may fill after its build
                raise PrototxtError(f"layer {self.name!r}: parameter blob {i}: {err}") from err
        elif isinstance(value, torch.Tensor):
            blob.copy_(value)
        elif not (value is None or (value == 0 and math.copysign(1.0, value) > 0)):  # +0: already so
            blob.fill_(value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # keys "<layer>.<i>", Caffe's blob order (not "<layer>.blobs.<i>")
        for i, blob in enumerate(self.blobs):
            destination[prefix + str(i)] = blob if keep_vars else blob.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with torch.no_grad():
            for i, blob in enumerate(self.blobs):
                key = prefix + str(i)
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = torch.as_tensor(state_dict[key])
                if tuple(value.shape) != tuple(blob.shape):
                    error_msgs.append(f"{key}: shape {list(value.shape)} does not fit {list(blob.shape)}")
                    continue
                blob.copy_(value)
        if strict:
            own = {prefix + str(i) for i in range(len(self.blobs))}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own
                                   and "." not in k[len(prefix):])

    def top_shapes(self, bottom_shapes):
        if self.same_shape:
            return [tuple(bottom_shapes[0])]
        return meta_top_shapes(self, bottom_shapes)

    def extra_repr(self):
        return f"{self.name!r}"


def zeroed(shape):
    """A zero tensor of the default dtype; a float32 one is numpy's calloc memory, whose pages the kernel
    zeroes when first touched: a blob that stays zero (Caffe's default constant filler) costs no writes."""
    if torch.get_default_dtype() != torch.float32:
        return torch.zeros(shape)
    return torch.from_numpy(np.zeros(shape, np.float32))


def _too_large(err):
    text = str(err)
    return "Storage size calculation overflowed" in text or "can't allocate memory" in text


def meta_top_shapes(layer, bottom_shapes):
    """The top shapes found by running the layer's forward on meta tensors (parameters and buffers
    replaced by meta copies); the fallback of `Layer.top_shapes` and the tests' check of the rules."""
    dtype = layer.blobs[0].dtype if len(layer.blobs) else torch.float32
    metas = tuple(torch.empty(s, dtype=dtype, device="meta") for s in bottom_shapes)
    state = {k: torch.empty_like(v, device="meta") for k, v in layer.named_parameters()}
    state.update({k: torch.empty_like(v, device="meta") for k, v in layer.named_buffers()})
    try:
        tops = torch.func.functional_call(layer, state, metas) if state else layer.forward(*metas)
    except RuntimeError as err:  # shapes only: what fails here is a size, e.g. a huge pad
        if not _too_large(err):
            raise
        raise PrototxtError(f"layer {layer.name!r}: its settings make a blob too large for these "
                            f"bottoms ({err})") from err
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
