"""A Caffe net as a torch.nn.Module, with the pycaffe interface on top."""
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from caffe_layers.pycaffe import mode
from caffe_layers.layers import layer_class
from caffe_layers.errors import PrototxtError
from caffe_layers.formats.proto import TEST, check_blob_shape, pb, phase_value
from caffe_layers.formats.prototxt import read_net


def state_meets_rule(state, rule):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def filter_net(net, state):
    """The layers of `net` that NetState `state` includes (Caffe's Net::FilterNet)."""
    kept = []
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise ValueError(f"layer {layer.name!r} specifies both include and exclude rules")
        if len(layer.include):
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            kept.append(layer)
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.layer.extend(kept)
    out.state.CopyFrom(state)
    return out


@dataclass
class Step:
    """One layer of the net in execution order."""
    layer: nn.Module
    bottoms: list
    tops: list
    propagate_down: list
    loss_weights: list = field(default_factory=list)


class Blob:
    """pycaffe's Blob: .data and .diff as numpy arrays (views of the CPU tensors)."""

    def __init__(self, net, name):
        self._net, self._name = net, name

    @property
    def data(self):
        return _numpy_view(self._net._blob_data(self._name))

    @data.setter
    def data(self, value):
        self.data[...] = value

    @property
    def diff(self):
        return _numpy_view(self._net._blob_diff(self._name))

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    @property
    def shape(self):
        return tuple(self._net.blob_shapes[self._name])

    @property
    def count(self):
        return int(np.prod(self.shape))

    @property
    def num(self):
        return self.shape[0]

    @property
    def channels(self):
        return self.shape[1]

    @property
    def height(self):
        return self.shape[2]

    @property
    def width(self):
        return self.shape[3]

    def reshape(self, *shape):
        self._net.reshape_blob(self._name, shape)


class ParamBlob:
    """pycaffe's view of a parameter blob: .data and .diff as numpy arrays."""

    def __init__(self, param):
        self._param = param

    @property
    def data(self):
        return _numpy_view(self._param.data)

    @data.setter
    def data(self, value):
        self.data[...] = value

    @property
    def diff(self):
        if self._param.grad is None:
            self._param.grad = torch.zeros_like(self._param)
        return _numpy_view(self._param.grad)

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    @property
    def shape(self):
        return tuple(self._param.shape)

    @property
    def count(self):
        return self._param.numel()

    def reshape(self, *shape):
        self._param.data = self._param.data.new_zeros(shape)


class _Reshaped(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(self.shape)


def _share_reshaped(blobs, i, owner, shape):
    """Make blobs[i] read as `owner` viewed with `shape` (gradients reach the owner)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(blobs, str(i), _Reshaped(shape), unsafe=True)
    blobs.parametrizations[str(i)].original = owner


def _numpy_view(tensor):
    """A writable view of a CPU tensor; a read-only copy of a GPU one (writes would be lost)."""
    if tensor.device.type == "cpu":
        return tensor.detach().numpy()
    array = tensor.detach().cpu().numpy()
    array.setflags(write=False)
    return array


class Net(nn.Module):
    """A Caffe net built from a prototxt.

    Torch use: `net(data=tensor)` returns {output blob: tensor}, differentiable.
    pycaffe use: `net.blobs['data'].data[...] = x; out = net.forward()` returns numpy arrays;
    `net.backward()` fills every blob's .diff and the parameter diffs.
    """

    def __init__(self, prototxt, weights=None, phase=TEST, variables=None, *, level=0, stages=(),
                 strict_weights=False, fuse=True, keep_blobs=()):
        super().__init__()
        if isinstance(weights, int) and not isinstance(weights, bool):
            weights, phase = None, weights  # pycaffe's caffe.Net(proto, caffe.TEST, weights=...)
        self.phase = phase_value(phase)
        param = read_net(prototxt, variables)
        state = pb.NetState(phase=self.phase, level=level)
        state.stage.extend(stages)
        self.net_param = filter_net(param, state)
        self.name = self.net_param.name
        self.force_backward = self.net_param.force_backward
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)
        self.layer_modules = nn.ModuleList()
        self.steps = []
        self.blob_shapes = OrderedDict()
        self.param_specs = []  # one (parameter, lr_mult, decay_mult) per learnable blob, owners only
        from caffe_layers.layers.python_layer import module_search_path

        with module_search_path(prototxt):  # Python layers may import modules beside the prototxt
            self._build()
        from caffe_layers.engine.fusion import fuse_steps

        # full forward passes run fused segaware convolutions (caffe_layers/engine/fusion.py); fuse=False or
        # keep_blobs (blobs to materialise) opt out; partial runs always use self.steps
        self.fused_steps = fuse_steps(self, keep_blobs) if fuse else None
        self._input_names = set(self.inputs)
        self._data, self._diff, self._first = {}, {}, {}
        self._fused_away = set()  # blobs the last forward did not compute (inside fused chains)
        if weights is not None:
            self.copy_from(weights, strict=strict_weights)
        if mode.device().type != "cpu":
            self.to(mode.device())

    # ---- building ------------------------------------------------------------------------
    def _build(self):
        owners = {}  # shared parameter name -> (parameter, layer name)
        for lp in self.net_param.layer:
            for b in lp.bottom:
                if b not in self.blob_shapes:
                    raise ValueError(f"layer {lp.name!r} ({lp.type}): unknown bottom blob {b!r}; "
                                     f"known blobs: {list(self.blob_shapes)}")
            if len(lp.propagate_down) not in (0, len(lp.bottom)):
                raise ValueError(f"layer {lp.name!r}: propagate_down must be given for all "
                                 f"{len(lp.bottom)} bottoms or none")
            lp.phase = self.phase
            cls = layer_class(lp.type, lp.name)
            if cls.is_loss and not len(lp.top):
                # Caffe's AutoTopBlobs: a loss layer without a top gets an anonymous one (names may repeat)
                name, k = f"{lp.name} (automatic)", 1
                while name in self.blob_shapes:
                    name, k = f"{lp.name} (automatic {k})", k + 1
                lp.top.append(name)
            bottom_shapes = [self.blob_shapes[b] for b in lp.bottom]
            try:
                layer = cls(lp, bottom_shapes, self.phase)
                top_shapes = layer.top_shapes(bottom_shapes)
            except Exception as err:
                shapes = ", ".join(f"{b} {list(s)}" for b, s in zip(lp.bottom, bottom_shapes))
                raise ValueError(f"layer {lp.name!r} ({lp.type}) with bottoms [{shapes}]: {err}") from err
            if len(top_shapes) != len(lp.top):
                raise ValueError(f"layer {lp.name!r} ({lp.type}) produces {len(top_shapes)} tops, "
                                 f"but the prototxt names {len(lp.top)}")
            for name, shape in zip(lp.top, top_shapes):
                check_blob_shape(shape, f"layer {lp.name!r} ({lp.type}): top {name!r}", PrototxtError)
                self.blob_shapes[name] = tuple(shape)
            self._share_params(lp, layer, owners)
            self.layer_modules.append(layer)
            self.steps.append(Step(layer, list(lp.bottom), list(lp.top),
                                   list(lp.propagate_down) or [True] * len(lp.bottom),
                                   self._loss_weights(lp, layer)))

    @staticmethod
    def _loss_weights(lp, layer):
        if len(lp.loss_weight):
            if len(lp.loss_weight) != len(lp.top):
                raise ValueError(f"layer {lp.name!r}: loss_weight must be given for each of its "
                                 f"{len(lp.top)} tops or none")
            return list(lp.loss_weight)
        return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(len(lp.top))]

    def _share_params(self, lp, layer, owners):
        if len(lp.param) > len(layer.blobs):
            raise ValueError(f"layer {lp.name!r} ({lp.type}) has {len(layer.blobs)} parameter blobs "
                             f"but {len(lp.param)} param specs")
        for i, blob in enumerate(layer.blobs):
            spec = lp.param[i] if i < len(lp.param) else pb.ParamSpec()
            if spec.name and spec.name in owners:
                owner, owner_layer = owners[spec.name]
                permissive = spec.share_mode == pb.ParamSpec.PERMISSIVE
                same = owner.numel() == blob.numel() if permissive else owner.shape == blob.shape
                if not same:
                    raise ValueError(f"layer {lp.name!r}: shared parameter {spec.name!r} has shape "
                                     f"{list(blob.shape)} here but {list(owner.shape)} in layer {owner_layer!r}")
                if tuple(owner.shape) == tuple(blob.shape):
                    layer.blobs[i] = owner
                else:  # PERMISSIVE: Caffe shares the owner's data and diff under this layer's shape
                    _share_reshaped(layer.blobs, i, owner, tuple(blob.shape))
                continue
            if spec.name:
                owners[spec.name] = (blob, lp.name)
            self.param_specs.append((blob, spec.lr_mult, spec.decay_mult))

    # ---- running -------------------------------------------------------------------------
    @property
    def device(self):
        return self._device_marker.device

    def run(self, inputs, start=0, end=None, hook=None):
        """Run steps[start:end] and return every blob value (dict name -> tensor).

        Blobs not produced in that range come from `inputs`, then from the stored blob data.
        `hook(step, tops)` is called after each layer (for dumps and comparisons).
        """
        values = dict(inputs)
        steps = self.steps[start:end]
        if self.fused_steps is not None and start == 0 and end in (None, len(self.steps)):
            steps = self.fused_steps
        for step in steps:
            if not step.bottoms and step.layer.param.type == "Input":
                for top in step.tops:
                    if top not in values:
                        values[top] = self._blob_data(top).to(self.device)
                continue
            bottoms = []
            for name, down in zip(step.bottoms, step.propagate_down):
                value = values[name] if name in values else self._blob_data(name)
                bottoms.append(value if down else value.detach())
            tops = step.layer(*bottoms)
            if isinstance(tops, torch.Tensor):
                tops = (tops,)
            if len(tops) != len(step.tops):
                raise RuntimeError(f"layer {step.layer.name!r} returned {len(tops)} tops, expected {len(step.tops)}")
            for name, value in zip(step.tops, tops):
                values[name] = value
            if hook is not None:
                hook(step, tops)
        return values

    def _top_weights(self):
        """(top, loss weight) for every step's tops, in step order (a top written in place repeats)."""
        for step in self.steps:
            yield from zip(step.tops, step.loss_weights)

    @property
    def top_loss_weights(self):
        """{top: loss weight}; a top written by several layers (in place) has the last one's weight."""
        return dict(self._top_weights())

    def loss(self, values):
        """The weighted sum of the loss tops in `values`, as Caffe's Net::ForwardBackward reports it."""
        total = None
        for name, weight in self._top_weights():
            if weight and name in values:
                term = weight * values[name].sum()
                total = term if total is None else total + term
        return total

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """Torch inputs give torch outputs; numpy (or no) inputs run pycaffe-style."""
        torch_mode = any(isinstance(v, torch.Tensor) for v in inputs.values())
        for name in inputs:
            if name not in self.blob_shapes:
                raise KeyError(f"{name!r} is not a blob of net {self.name!r}; inputs are {self.inputs}")
        first, last = self._range(start, end)
        if torch_mode:
            feed = {k: v.to(self.device) if isinstance(v, torch.Tensor) else
                    torch.as_tensor(np.asarray(v), dtype=self._dtype(), device=self.device)
                    for k, v in inputs.items()}
        else:
            for k, v in inputs.items():
                self._store_input(k, v)
            feed = {}
            if self.force_backward:
                for name in self.inputs:
                    self._data[name] = self._blob_data(name).detach().requires_grad_(True)
                    feed[name] = self._data[name].to(self.device)
        self._first = {}

        def remember(step, tops):
            for name, value in zip(step.tops, tops):
                self._first.setdefault(name, value)

        values = self.run(feed, first, last, hook=remember)
        self._fused_away = {t for s in self.steps[first:last] for t in s.tops} - values.keys()
        for name in self._fused_away:
            self._data.pop(name, None)
        for name in self.inputs:
            self._first.setdefault(name, values.get(name, self._data.get(name)))
        self._data.update(values)
        self._diff = {}
        wanted = list(self.outputs if last == len(self.steps) else self.steps[last - 1].tops)
        wanted += [b for b in (blobs or []) if b not in wanted]
        if torch_mode:
            return {name: values[name] if name in values else self._blob_data(name) for name in wanted}
        return {name: _numpy_view(self._blob_data(name)) for name in wanted}

    __call__ = nn.Module.__call__

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """pycaffe's backward: output diffs (given, stored, or loss_weight for loss tops) flow down.

        Every blob's .diff and every parameter's diff are filled (parameter diffs accumulate).
        Returns the diffs of the net inputs and of the blobs named in `diffs`.
        """
        tensors, grads = [], []
        for name, weight in self._top_weights():
            if weight and name in self._data:
                value = self._data[name]
                tensors.append(value)
                grads.append(torch.full_like(value, weight))
        loss_blobs = {id(t) for t in tensors}
        for name in self.outputs:
            value = self._data.get(name)
            if value is None or id(value) in loss_blobs or not value.requires_grad:
                continue
            diff = top_diffs.get(name, self._diff.get(name))
            if diff is None:
                continue
            tensors.append(value)
            grads.append(torch.as_tensor(np.asarray(diff) if not isinstance(diff, torch.Tensor) else diff,
                                         dtype=value.dtype, device=value.device).reshape(value.shape))
        tracked = {n: t for n, t in self._first.items() if t is not None and t.requires_grad}
        for t in tracked.values():
            if t.grad_fn is not None:
                t.retain_grad()
        if tensors:
            torch.autograd.backward(tensors, grads)
        self._diff = {n: (t.grad if t.grad is not None else torch.zeros_like(t)).detach()
                      for n, t in tracked.items()}
        wanted = list(self.inputs) + [b for b in (diffs or []) if b not in self.inputs]
        return {name: _numpy_view(self._blob_diff(name)) for name in wanted}

    def _range(self, start, end):
        names = self._layer_names
        first = names.index(start) if start is not None else 0
        last = names.index(end) + 1 if end is not None else len(self.steps)
        return first, last

    def _dtype(self):
        for p in self.parameters():
            return p.dtype
        return torch.float32

    # ---- blob storage (pycaffe interface) ------------------------------------------------
    def _blob_data(self, name):
        """Stored blob values; input blobs stay on the CPU so pycaffe scripts can write into them."""
        if name in self._fused_away:
            raise KeyError(f"blob {name!r} was not computed: it is inside a fused segmentation-aware "
                           f"convolution; build the net with keep_blobs=[{name!r}] or fuse=False")
        if name not in self._data:
            device = "cpu" if name in self._input_names else self.device
            self._data[name] = torch.zeros(self.blob_shapes[name], dtype=self._dtype(), device=device)
        return self._data[name]

    def _blob_diff(self, name):
        if name not in self._diff:
            self._diff[name] = torch.zeros(self.blob_shapes[name], dtype=self._dtype(), device=self.device)
        return self._diff[name]

    def _store_input(self, name, value):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(self.blob_shapes[name]):
            self.reshape_blob(name, value.shape)
        self._blob_data(name).detach().copy_(torch.as_tensor(value))

    def reshape_blob(self, name, shape):
        self.blob_shapes[name] = tuple(int(s) for s in shape)
        self._data.pop(name, None)
        self._diff.pop(name, None)
        self.reshape()

    def reshape(self):
        """Infer every blob shape again from the current input shapes."""
        for step in self.steps:
            if step.layer.param.type == "Input" and not step.bottoms:
                continue
            shapes = step.layer.top_shapes([self.blob_shapes[b] for b in step.bottoms])
            for name, shape in zip(step.tops, shapes):
                if self.blob_shapes.get(name) != tuple(shape) and name not in step.bottoms:
                    self._data.pop(name, None)
                self.blob_shapes[name] = tuple(shape)

    @property
    def blobs(self):
        return OrderedDict((name, Blob(self, name)) for name in self.blob_shapes)

    @property
    def params(self):
        return OrderedDict((layer.name, [ParamBlob(p) for p in layer.blobs])
                           for layer in self.layer_modules if len(layer.blobs))

    @property
    def layers(self):
        return list(self.layer_modules)

    @property
    def _layer_names(self):
        return [layer.name for layer in self.layer_modules]

    @property
    def layer_dict(self):
        return OrderedDict((layer.name, layer) for layer in self.layer_modules)

    @property
    def inputs(self):
        return [t for s in self.steps if s.layer.param.type == "Input" and not s.bottoms for t in s.tops]

    @property
    def outputs(self):
        available = []
        for step in self.steps:
            available = [b for b in available if b not in step.bottoms]
            available += [t for t in step.tops if t not in available]
        return available

    @property
    def top_names(self):
        return OrderedDict((s.layer.name, list(s.tops)) for s in self.steps)

    @property
    def bottom_names(self):
        return OrderedDict((s.layer.name, list(s.bottoms)) for s in self.steps)

    # ---- parameters ----------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        return OrderedDict((f"{layer.name}.{i}", p.detach())
                           for layer in self.layer_modules for i, p in enumerate(layer.blobs))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        own = {f"{layer.name}.{i}": p for layer in self.layer_modules for i, p in enumerate(layer.blobs)}
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for key, value in state_dict.items():
                if key in own:
                    if tuple(own[key].shape) != tuple(value.shape):
                        raise ValueError(f"{key}: shape {list(value.shape)} does not fit {list(own[key].shape)}")
                    own[key].copy_(torch.as_tensor(value))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def copy_from(self, weights, strict=False):
        """Load a .caffemodel / .caffemodel.h5 (matched by layer name, as Caffe does)."""
        from caffe_layers.formats.weights import load_weights

        return load_weights(self, weights, strict=strict)

    def save(self, path):
        """Write the weights as a .caffemodel (or .caffemodel.h5), like pycaffe's net.save."""
        from caffe_layers.formats.weights import save_weights

        save_weights(self, path)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._data = {k: fn(v.detach()).cpu() for k, v in self._data.items() if k in self._input_names}
        self._diff = {}
        return result
