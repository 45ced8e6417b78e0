"""A Caffe net as a torch.nn.Module, with the pycaffe interface on top."""
import contextlib
import functools
import math
import sys
import weakref
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.utils.weak import WeakIdKeyDictionary

from caffe_layers.pycaffe import mode
from caffe_layers.engine import explicit
from caffe_layers.engine.folding import FoldedConvolution, fold_batchnorm
from caffe_layers.engine.plan import compile_plan, fused_layout, infer_top_shapes, need_backward, rewritten_later
from caffe_layers.errors import TopReshaped
from caffe_layers.formats.proto import TEST, check_blob_shape


# A net whose every blob and parameter holds fewer values runs the pycaffe face on one intra-op thread, as
# Caffe's CPU code: nothing in it gains from a second thread, and torch's softmax and reductions still wake the
# pool for such sizes (~65 us a call with OMP_WAIT_POLICY=PASSIVE, against ~1.5 us on one thread).
TINY_NET_NUMEL = 1 << 15


def is_tiny(net):
    """Whether `net` (a pycaffe Net on the CPU) is below TINY_NET_NUMEL in every blob and parameter."""
    return (net.device.type == "cpu" and all(math.prod(s) < TINY_NET_NUMEL for s in net.blob_shapes.values())
            and all(p.numel() < TINY_NET_NUMEL for p in net.parameters()))


@contextlib.contextmanager
def one_thread_if_tiny(net):
    """Run the block with torch's intra-op threads at 1 where `net` is tiny (is_tiny), then restore them."""
    threads = torch.get_num_threads()
    if threads == 1 or not is_tiny(net):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_thread_if_tiny(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with one_thread_if_tiny(self):
            return method(self, *args, **kwargs)
    return run


class _Shaped:
    """pycaffe's shape accessors over `self.shape`."""

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


class Blob(_Shaped):
    """pycaffe's Blob: .data and .diff are numpy views of the net's persistent storage: a view taken once stays
    the blob across forward, backward and (same-shape) reshape, as in Caffe."""

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

    def reshape(self, *shape):
        self._net.reshape_blob(self._name, shape)


class ParamBlob(_Shaped):
    """pycaffe's view of a parameter blob: .data and .diff as numpy arrays (the diff accumulates until cleared)."""

    def __init__(self, param):
        self._param = param

    @property
    def data(self):
        view = _numpy_view(self._param.data)
        owner = self._param if self._param._base is None else self._param._base  # (a PERMISSIVE share's view)
        _handed_out.setdefault(owner, []).append(weakref.ref(view))
        return view

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

    def reshape(self, *shape):
        self._param.data = self._param.data.new_zeros(shape)


class LayerView:
    """pycaffe's Layer: .type (the Caffe type string), .blobs (ParamBlobs), .name; `.module` is the torch layer."""

    def __init__(self, module):
        self.module = module
        self.name = module.name
        self.type = module.param.type

    @property
    def blobs(self):
        return [ParamBlob(p) for p in self.module.blobs]

    def __repr__(self):
        return f"<caffe layer {self.name!r} ({self.type})>"


# parameter -> weak references to the numpy views of its data handed out (ParamBlob.data). Writes through them
# bypass torch's version counter, which the folded convolutions' kept weights follow (engine/folding.py): a
# pycaffe forward bumps the version of every parameter in here, then forgets those whose views are all gone.
_handed_out = WeakIdKeyDictionary()


def _note_param_writes():
    for param, views in list(_handed_out.items()):
        increment_version(param)
        views[:] = [v for v in views if v() is not None]
        if not views:
            del _handed_out[param]


def _storage_holders(tensor):
    """How many tensors (this one included) share `tensor`'s storage: numpy views, autograd records and
    a caller's tensors hold it too."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1  # (minus the storage object here)


def _count_refs(store):
    return sys.getrefcount(store)


def _refs_when_unheld():
    """sys.getrefcount of a blob's storage inside Net._adoptable when only the blob dict holds it: measured here
    through the same frames (a dict entry, the writer's local, the check's argument), since how many references
    the interpreter's frames count differs between Python versions."""
    blobs = {"blob": object()}
    store = blobs.get("blob")
    return _count_refs(store)


_UNHELD_REFS = _refs_when_unheld()


def _hooked(layer):
    """Whether a module call of `layer` would run hooks (then the layer runs as a module call)."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


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

    def __init__(self, prototxt, *args, weights=None, phase=TEST, variables=None, level=0, stages=(),
                 strict_weights=False, fuse=True, keep_blobs=(), fold=None):
        """Positional: (prototxt, weights, phase, variables), or pycaffe's (prototxt, phase) with weights,
        level and stages as keywords. `fold` (default: in a TEST net) runs each Convolution -> BatchNorm
        [-> Scale] [-> ReLU] written in place on the convolution's top, and that no backward passes through,
        as one folded convolution in full forward passes (engine/folding.py): the blob then holds the last
        layer's value, as in Caffe, up to float rounding."""
        super().__init__()
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            args = (weights,) + args  # pycaffe's caffe.Net(proto, caffe.TEST, weights=...)
        if len(args) > 3:
            raise TypeError(f"Net takes at most (prototxt, weights, phase, variables), got {len(args) + 1} "
                            "positional arguments")
        weights, phase, variables = args + (weights, phase, variables)[len(args):]
        self.plan = compile_plan(prototxt, phase, variables, level, stages)
        self.phase, self.net_param = self.plan.phase, self.plan.net_param
        self.name = self.net_param.name
        self.force_backward = self.net_param.force_backward
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)
        self.steps = self.plan.steps
        self._outputs = tuple(self.plan.outputs)  # (the steps do not change; read by every forward)
        self.blob_shapes = OrderedDict(self.plan.blob_shapes)
        self.param_specs = self.plan.param_specs
        self.layer_modules = nn.ModuleList(self.plan.layers)
        from caffe_layers.engine.fusion import fuse_steps

        # full forward passes run fused segaware convolutions (caffe_layers/engine/fusion.py); fuse=False or
        # keep_blobs (blobs to materialise) opt out; partial runs always use self.steps
        self.fused_steps = fuse_steps(self, keep_blobs) if fuse else None
        self._input_names = set(self.inputs)
        self._data, self._diff, self._graphs = {}, {}, {}
        self._explicit, self._explicit_supported = None, None  # engine/explicit.py, built on first use
        self._fused_away = set()  # blobs the last forward did not compute (inside fused chains)
        self._need_backward, self._bottom_needs = need_backward(self.plan)
        self._rewritten_later = rewritten_later(self.steps)
        fused_indexed, self._fused_blobs = fused_layout(self.steps, self.fused_steps)
        where = self._step_index = {id(s.layer): i for i, s in enumerate(self.steps)}
        # a fused step's x and mask need diffs as its Im2col and Tile's
        self._fused_downs = {i: [self._bottom_needs[where[id(s.layer.im2col)]][0],
                                 self._bottom_needs[where[id(s.layer.tile)]][0]]
                             for i, s in fused_indexed if s is not self.steps[i]}
        if fold if fold is not None else self.phase == TEST:
            fused_indexed = self._folded(fused_indexed or list(enumerate(self.steps)))
        # the (index, step) pairs of a full forward; None: it runs self.steps as they are
        self._full_indexed = fused_indexed if any(s is not self.steps[i] for i, s in fused_indexed) else None
        self._in_place = {i: self._in_place_form(step) for i, step in enumerate(self.steps)}
        loaded = self.copy_from(weights, strict=strict_weights).loaded if weights is not None else ()
        self.plan.fill_blobs(loaded)
        self._mode_generation = mode.generation()
        if mode.device().type != "cpu":
            self.to(mode.device())

    def _folded(self, indexed):
        """`indexed` with each in-place Convolution -> BatchNorm [-> Scale] [-> ReLU] that needs no backward
        folded into one step (every blob counts as needed: only chains writing the convolution's top fold)."""
        out = []
        for step in fold_batchnorm([s for _, s in indexed], set(self.blob_shapes)):
            if not isinstance(step.layer, FoldedConvolution):
                out.append((self._step_index[id(getattr(step.layer, "conv", step.layer))], step))
                continue
            chain = [self._step_index[id(layer)] for layer in (step.layer.conv, step.layer.bn, step.layer.scale,
                                                               step.layer.relu) if layer is not None]
            if any(self._need_backward[i] for i in chain):
                out.extend((i, self.steps[i]) for i in chain)
            else:
                out.append((chain[0], step))
                self._fused_downs[chain[0]] = [False] * len(step.bottoms)
        return out

    def _in_place_form(self, step):
        """(function, constants, bottom order) writing the layer's single top into its bottom's storage, for a
        layer Caffe runs in place (top named as a bottom) that offers one (Layer.in_place_form); else None."""
        if len(step.tops) != 1 or step.tops[0] not in step.bottoms or not hasattr(step.layer, "in_place_form"):
            return None
        return step.layer.in_place_form([b == step.tops[0] for b in step.bottoms])

    # ---- running -------------------------------------------------------------------------
    @property
    def device(self):
        return self._buffers["_device_marker"].device  # (no Module.__getattr__: read for every layer run)

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
        return self.plan.top_weights()

    @property
    def top_loss_weights(self):
        """{top: loss weight}; a top written by several layers (in place) has the last one's weight."""
        return dict(self._top_weights())

    def loss(self, values):
        """The weighted sum of the loss tops in `values`, as Caffe's Net::ForwardBackward reports it."""
        total = None
        for name, weight in self._top_weights():
            if weight and name in values:
                term = values[name]
                term = term.sum() if term.dim() else term  # (a weight of 1 or a 0-d sum changes no value)
                term = term if weight == 1 else weight * term
                total = term if total is None else total + term
        return total

    @_one_thread_if_tiny
    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's forward (numpy or no inputs): layers start..end write Caffe's persistent blobs and the
        tops of the last layer run (or the net outputs) come back as numpy views. Torch tensors as inputs
        give the old differentiable torch call, {blob: tensor} (TorchNet is the torch face)."""
        for name in inputs:
            if name not in self.blob_shapes:
                raise KeyError(f"{name!r} is not a blob of net {self.name!r}; inputs are {self.inputs}")
        self.follow_mode()
        first, last = self._range(start, end)
        if any(isinstance(v, torch.Tensor) for v in inputs.values()):
            feed = {k: v.to(self.device) if isinstance(v, torch.Tensor) else
                    torch.as_tensor(np.asarray(v), dtype=self._dtype(), device=self.device)
                    for k, v in inputs.items()}
            values = self.run(feed, first, last)
            wanted = self._wanted(last, blobs)
            return {name: values[name] if name in values else self._blob_data(name) for name in wanted}
        for k, v in inputs.items():
            self._store_input(k, v)
        if self.explicit_passes() is not None:
            self.explicit_forward(first, last)
            return {name: _numpy_view(self._blob_data(name)) for name in self._wanted(last, blobs)}
        _note_param_writes()
        full = first == 0 and last == len(self.steps) and self._full_indexed is not None
        if full:
            self._graphs = {}
        with torch.no_grad():  # each step sets grad mode as it needs; most need none, and enter nothing
            for index, step in (self._full_indexed if full else list(enumerate(self.steps))[first:last]):
                if not step.is_input:  # each layer keeps the graph of its last forward, as a Caffe layer its state
                    record = self._forward_step(index, step)
                    if record is None:
                        self._graphs.pop(index, None)
                    else:
                        self._graphs[index] = record
        self._fused_away = set(self._fused_blobs) if full else set()
        return {name: _numpy_view(self._blob_data(name)) for name in self._wanted(last, blobs)}

    __call__ = nn.Module.__call__

    def follow_mode(self):
        """After caffe.set_mode_gpu(), set_mode_cpu() or set_device() (since this net was built or last
        followed), move the net where the mode now says; called by pycaffe's forward and backward."""
        if self._mode_generation != mode.generation():
            self._mode_generation = mode.generation()
            if self.device != mode.device():
                self.to(mode.device())

    def explicit_passes(self):
        """The net's explicit forward and backward passes (engine/explicit.py) over its current blob storage,
        or None where a layer needs autograd."""
        if self._explicit is None:
            if self._explicit_supported is None:
                self._explicit_supported = explicit.supports(self)
            if self._explicit_supported:
                self._explicit = explicit.ExplicitPasses(self)
        return self._explicit

    def explicit_forward(self, first=0, last=None):
        """Caffe's Forward of layers first..last-1 through the explicit passes, which it returns; a data layer
        whose batch changed shape reshapes the net's blobs on the way."""
        last = len(self.steps) if last is None else last
        while True:
            passes = self.explicit_passes()
            try:
                passes.forward(first, last)
                return passes
            except TopReshaped as new:
                tops = self.steps[new.index].tops
                self.reshape_blobs({name: value.shape for name, value in zip(tops, new.values)})
                for name, value in zip(tops, new.values):
                    self._blob_data(name).copy_(value)
                first = new.index + 1

    def _wanted(self, last, blobs):
        wanted = list(self.outputs if last == len(self.steps) else self.steps[last - 1].tops)
        return wanted + [b for b in (blobs or []) if b not in wanted]

    def _forward_step(self, index, step, write_tops=True):
        """Run one step on the stored bottoms and write its tops into the stored blobs (if `write_tops`).
        Where Caffe would backpropagate through the layer, its autograd graph is kept:
        (index, step, [(bottom, leaf)], tops)."""
        need = self._need_backward[index]
        downs = self._fused_downs[index] if step is not self.steps[index] else self._bottom_needs[index]
        leaves, bottoms = [], []
        fused = step is not self.steps[index]  # fusion guarantees its x and mask are not rewritten later
        rewrites = [False] * len(step.bottoms) if fused else self._rewritten_later[index]
        device = self.device
        for name, down, rewritten in zip(step.bottoms, downs, rewrites):
            value = self._blob_data(name).to(device)
            if need:  # a leaf of its own; copied if a later layer rewrites the blob in place
                value = (value.clone() if rewritten else value.detach()).requires_grad_(down and
                                                                                        value.is_floating_point())
                leaves.append((name, value))
            bottoms.append(value)
        replaying = None if write_tops else getattr(step.layer, "replaying", None)  # a Python layer's tops
        in_place = self._in_place[index] if write_tops and not need and step is self.steps[index] else None
        if in_place is not None and not torch.is_grad_enabled() and not _hooked(step.layer):
            function, constants, order = in_place  # Caffe's in-place layer: the result written into the blob
            tops = function(*(bottoms[i] for i in order), *constants)
        elif replaying is None and need == torch.is_grad_enabled():  # (no context to enter: small nets)
            tops = step.layer(*bottoms)
        else:
            with torch.set_grad_enabled(need), (replaying([self._blob_data(t) for t in step.tops]) if replaying
                                                else contextlib.nullcontext()):
                tops = step.layer(*bottoms)
        if isinstance(tops, torch.Tensor):
            tops = (tops,)
        if len(tops) != len(step.tops):
            raise RuntimeError(f"layer {step.layer.name!r} returned {len(tops)} tops, expected {len(step.tops)}")
        for name, value in zip(step.tops, tops if write_tops else ()):
            self._write_blob(name, value, copy=need)
        return (index, step, leaves, tops) if need else None

    @_one_thread_if_tiny
    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """pycaffe's backward: from layer `start` (default the last) down to `end` (default the first), each
        layer Caffe would backpropagate through reads its tops' stored diffs and writes its bottoms' diffs
        (a blob read by several layers gets the sum, as Caffe's Split layers give); parameter diffs
        accumulate until cleared. Loss tops' diffs hold their loss_weight. Returns the diffs of the inputs (of
        layer `end`'s bottoms when given) and of the blobs named in `diffs`."""
        self.follow_mode()
        for name, diff in top_diffs.items():
            self._blob_diff(name)[...] = torch.as_tensor(np.asarray(diff))
        names = self._layer_names
        hi = names.index(start) if start is not None else len(self.steps) - 1
        lo = names.index(end) if end is not None else 0
        passes = self.explicit_passes()
        if passes is not None:
            passes.backward(lo, hi)
        else:
            self._autograd_backward(lo, hi)
        first = list(self.inputs) if end is None else list(self.steps[lo].bottoms)  # as pycaffe: `end`'s bottoms
        wanted = first + [b for b in (diffs or []) if b not in first]
        return {name: _numpy_view(self._blob_diff(name)) for name in wanted}

    def _autograd_backward(self, lo, hi):
        """backward's general path: each layer's graph from its last forward (or from its current bottoms)."""
        self._record_missing_graphs(lo, hi)
        written = set()
        for index in sorted(self._graphs, reverse=True):
            _, step, leaves, tops = self._graphs[index]
            if not lo <= index <= hi:
                continue
            outs = [(t, self._blob_diff(n)) for n, t in zip(step.tops, tops) if t.requires_grad]
            wrt = [leaf for _, leaf in leaves if leaf.requires_grad]
            params = [p for p in getattr(step.layer, "conv", step.layer).parameters() if p.requires_grad]
            if not outs or not (wrt or params):
                continue
            for leaf in wrt:
                leaf.grad = None
            torch.autograd.backward([t for t, _ in outs], [d.to(t.dtype) for t, d in outs],
                                    inputs=wrt + params, retain_graph=True)
            with torch.no_grad():
                for name, leaf in leaves:
                    if leaf.grad is None:
                        continue
                    diff = self._blob_diff(name)
                    if name in written and name not in step.tops:  # in place: the layer's own diff is replaced
                        diff.add_(leaf.grad.to(diff.device))
                    else:
                        diff.copy_(leaf.grad)
                        written.add(name)

    def _record_missing_graphs(self, lo, hi):
        """Caffe's Backward runs on the current blobs, forward or not: a layer in lo..hi that Caffe would
        backpropagate through and that has no graph (no forward yet, or a reshape since) gets one from
        its current bottoms; its stored tops are left as they are."""
        covered = set(self._graphs)
        for index, (_, step, _, _) in self._graphs.items():
            if step is not self.steps[index]:  # a fused seg-aware chain stands for its Im2col, Tile, Eltwise
                covered.update(self._step_index[id(m)] for m in (step.layer.im2col, step.layer.tile,
                                                                 step.layer.eltwise))
        for index in range(lo, hi + 1):
            if index not in covered and self._need_backward[index]:
                self._graphs[index] = self._forward_step(index, self.steps[index], write_tops=False)

    def _write_blob(self, name, value, copy):
        """Write `value` into blob `name`'s storage (a view of it stays the blob); where there is none of that
        shape yet, adopt the value itself, or a copy (`copy`: the value belongs to a kept graph)."""
        store = self._data.get(name)
        if store is not None and store.shape == value.shape and store.dtype == value.dtype:
            if store.data_ptr() == value.data_ptr():
                return
            if copy or not self._adoptable(store, value):
                store.copy_(value.detach())  # (detach: cheaper than torch.no_grad; this runs for every top)
                return
        value = value.detach()
        if not value.is_contiguous():  # (a channels-last top: plan.mark_channels_last) blobs are plain
            value, copy = value.contiguous(), False
        self._data[name] = value.clone() if copy else value
        self._explicit = None

    @staticmethod
    def _adoptable(store, value):
        """Whether a fresh top `value` may become the blob's storage in place of a copy into `store`: nothing
        else holds the old storage (no numpy view, no other blob, no caller's tensor), which then no one
        can see change, and nothing but the layer's result holds the new one (no bottom, no layer state)."""
        unreferenced = sys.getrefcount(store) == _UNHELD_REFS  # (no caller holds it)
        return (unreferenced and value.is_contiguous() and value.device == store.device
                and _storage_holders(value) == 1 and _storage_holders(store) == 1)

    def store_values(self, values):
        """Write tensors {blob: value} (a run's result) into the persistent blobs, as a pycaffe forward would."""
        for name, value in values.items():
            self._write_blob(name, value, copy=True)
        self._fused_away = {b for b in self._fused_blobs if b not in values}

    def clear_param_diffs(self):
        for p in self.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def _range(self, start, end):
        names = self._layer_names if start is not None or end is not None else None
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
            self._materialize(name)
        if name not in self._data:
            device = "cpu" if name in self._input_names else self.device
            self._data[name] = torch.zeros(self.blob_shapes[name], dtype=self._dtype(), device=device)
        return self._data[name]

    def _materialize(self, name):
        """Compute a blob a fused forward skipped (inside a seg-aware chain) from the stored x and mask."""
        chain = self._fused_blobs[name]
        self._fused_away -= {t for i in chain for t in self.steps[i].tops}
        with torch.no_grad():
            for i in chain:
                need, self._need_backward[i] = self._need_backward[i], False
                try:
                    self._forward_step(i, self.steps[i])
                finally:
                    self._need_backward[i] = need

    def _blob_diff(self, name):
        if name not in self._diff:
            weight = self.top_loss_weights.get(name, 0.0)  # Caffe sets a loss top's diff to its loss_weight
            self._diff[name] = torch.full(self.blob_shapes[name], float(weight), dtype=self._dtype(),
                                          device=self.device)
        return self._diff[name]

    def _store_input(self, name, value):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(self.blob_shapes[name]):
            self.reshape_blob(name, value.shape)
        self._blob_data(name).detach().copy_(torch.as_tensor(value))

    def reshape_blob(self, name, shape):
        self.reshape_blobs({name: shape})

    def reshape_blobs(self, shapes):
        """Give the blobs {name: shape} new shapes (new storage where a shape changes), then reshape the net."""
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            check_blob_shape(shape, f"blob {name!r}: reshape", ValueError)  # Blob::Reshape's checks, here
            if shape != self.blob_shapes.get(name):
                self.blob_shapes[name] = shape
                self._data.pop(name, None)
                self._diff.pop(name, None)
        self.reshape()

    def reshape(self):
        """Infer the blob shapes again from the current input shapes: only the layers whose bottom shapes
        changed since they were last inferred; a blob whose shape changes gets new storage."""
        seen = self.__dict__.setdefault("_inferred_from", {})
        for i, step in enumerate(self.steps):
            if not step.bottoms:
                continue
            bottom_shapes = [self.blob_shapes[b] for b in step.bottoms]
            if seen.get(i) == bottom_shapes:
                continue
            seen[i] = bottom_shapes
            for name, shape in zip(step.tops, infer_top_shapes(step.layer, bottom_shapes)):
                if self.blob_shapes.get(name) != tuple(shape) and name not in step.bottoms:
                    self._data.pop(name, None)
                    self._diff.pop(name, None)
                self.blob_shapes[name] = tuple(shape)
        self._graphs = {}
        self._explicit = None

    @property
    def blobs(self):
        return OrderedDict((name, Blob(self, name)) for name in self.blob_shapes)

    @property
    def params(self):
        return OrderedDict((layer.name, [ParamBlob(p) for p in layer.blobs])
                           for layer in self.layer_modules if len(layer.blobs))

    @property
    def layers(self):
        """pycaffe's net.layers: one LayerView (.type, .blobs) per layer; `.module` is the torch layer."""
        return [LayerView(m) for m in self.layer_modules]

    @property
    def _layer_names(self):
        return [layer.name for layer in self.layer_modules]

    @property
    def layer_dict(self):
        return OrderedDict((layer.name, layer) for layer in self.layers)

    @property
    def inputs(self):
        return self.plan.inputs

    @property
    def outputs(self):
        return list(self._outputs)

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

    def save_hdf5(self, path):
        """pycaffe's net.save_hdf5: the weights in Caffe's HDF5 layout, whatever the path's suffix."""
        from caffe_layers.formats.weights import net_layers_for_saving, write_hdf5

        write_hdf5(path, net_layers_for_saving(self, hdf5=True))

    def load_hdf5(self, path):
        """pycaffe's net.load_hdf5 (copy_from reads either format)."""
        return self.copy_from(path)

    def share_with(self, other):
        """pycaffe's net.share_with (Caffe's ShareTrainedLayersWith): the layers named as one of `other`'s
        use its parameter data."""
        from caffe_layers.training.solver import share_trained_layers

        share_trained_layers(self, other)

    def close(self):
        """Stop the data layers' prefetch threads and release their files and LMDB environments (done
        too when the net is garbage collected); `with Net(...) as net:` closes on leaving."""
        for layer in self.layer_modules:
            if getattr(layer, "is_data_layer", False):
                layer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._data = {k: fn(v.detach()).cpu() for k, v in self._data.items() if k in self._input_names}
        self._diff = {}
        self._explicit, self._explicit_supported = None, None
        return result
