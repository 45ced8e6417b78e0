"""A prototxt compiled into an execution plan: the layers in order, every blob's shape, parameter sharing,
the blobs' last readers, and the fused steps. Both faces run a plan: the torch face (engine/graph.py) as a
torch.fx graph, the pycaffe face (pycaffe/pycaffe.py) step by step with Caffe's persistent blobs.
"""
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from caffe_layers.errors import CaffeLayersError, PrototxtError
from caffe_layers.formats.proto import TEST, check_blob_shape, pb, phase_value
from caffe_layers.formats.prototxt import read_net
from caffe_layers.layers import layer_class
from caffe_layers.layers.base import deferred_fills


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
            raise PrototxtError(f"layer {layer.name!r} specifies both include and exclude rules")
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

    @property
    def is_input(self):
        return not self.bottoms and self.layer.param.type == "Input"


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


class Plan:
    """The compiled net. `steps` run in order; `blob_shapes` holds each blob's shape after the last layer that
    writes it; `param_specs` one (parameter, lr_mult, decay_mult) per learnable blob that owns its data."""

    def __init__(self, net_param, phase):
        self.net_param = net_param
        self.phase = phase
        self.name = net_param.name
        self.steps = []
        self.blob_shapes = {}
        self.param_specs = []
        with deferred_fills():
            self._build()
        mark_channels_last(self.steps, set(self.outputs))

    def _build(self):
        owners = {}  # shared parameter name -> (parameter, layer name)
        written_by = {}  # blob -> the layer that produced it
        for lp in self.net_param.layer:
            for b in lp.bottom:
                if b not in self.blob_shapes:
                    raise PrototxtError(f"layer {lp.name!r} ({lp.type}): unknown bottom blob {b!r}; "
                                        f"known blobs: {list(self.blob_shapes)}")
            for t in lp.top:
                if t in written_by and t not in lp.bottom:
                    raise PrototxtError(f"layer {lp.name!r} ({lp.type}): top blob {t!r} is produced by multiple "
                                        f"sources (layer {written_by[t]!r} already writes it; only a layer that "
                                        f"also reads it may write it again, in place)")
            if len(lp.propagate_down) not in (0, len(lp.bottom)):
                raise PrototxtError(f"layer {lp.name!r}: propagate_down must be given for all "
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
            with naming_layer(lp, bottom_shapes):
                layer = cls(lp, bottom_shapes, self.phase)
            top_shapes = infer_top_shapes(layer, bottom_shapes)
            for name, shape in zip(lp.top, top_shapes):
                self.blob_shapes[name] = shape
                written_by.setdefault(name, lp.name)
            self._share_params(lp, layer, owners)
            self.steps.append(Step(layer, list(lp.bottom), list(lp.top),
                                   list(lp.propagate_down) or [True] * len(lp.bottom),
                                   self._loss_weights(lp, layer)))

    @staticmethod
    def _loss_weights(lp, layer):
        if len(lp.loss_weight):
            if len(lp.loss_weight) != len(lp.top):
                raise PrototxtError(f"layer {lp.name!r}: loss_weight must be given for each of its "
                                    f"{len(lp.top)} tops or none")
            return list(lp.loss_weight)
        return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(len(lp.top))]

    def _share_params(self, lp, layer, owners):
        if len(lp.param) > len(layer.blobs):
            raise PrototxtError(f"layer {lp.name!r} ({lp.type}) has {len(layer.blobs)} parameter blobs "
                                f"but {len(lp.param)} param specs")
        for i, blob in enumerate(layer.blobs):
            spec = lp.param[i] if i < len(lp.param) else pb.ParamSpec()
            if spec.name and spec.name in owners:
                owner, owner_layer = owners[spec.name]
                permissive = spec.share_mode == pb.ParamSpec.PERMISSIVE
                same = owner.numel() == blob.numel() if permissive else owner.shape == blob.shape
                if not same:
                    raise PrototxtError(f"layer {lp.name!r}: shared parameter {spec.name!r} has shape "
                                        f"{list(blob.shape)} here but {list(owner.shape)} in layer {owner_layer!r}")
                layer.shared_blobs.add(i)
                if tuple(owner.shape) == tuple(blob.shape):
                    layer.blobs[i] = owner
                else:  # PERMISSIVE: Caffe shares the owner's data and diff under this layer's shape
                    _share_reshaped(layer.blobs, i, owner, tuple(blob.shape))
                continue
            if spec.name:
                owners[spec.name] = (blob, lp.name)
            self.param_specs.append((blob, spec.lr_mult, spec.decay_mult))

    # ---- derived facts -------------------------------------------------------------------
    @property
    def layers(self):
        return [s.layer for s in self.steps]

    @property
    def inputs(self):
        return [t for s in self.steps if s.is_input for t in s.tops]

    @property
    def outputs(self):
        """Blobs no later layer reads (Caffe's net outputs), in the order they were made."""
        available = []
        for step in self.steps:
            available = [b for b in available if b not in step.bottoms]
            available += [t for t in step.tops if t not in available]
        return available

    def top_weights(self):
        """(top, loss weight) for every step's tops, in step order (a top written in place repeats)."""
        for step in self.steps:
            yield from zip(step.tops, step.loss_weights)

    def fill_blobs(self, loaded=()):
        """Run the fillers of every parameter blob not in `loaded` (ids of blobs given by weights), in layer
        order, as Caffe's layer setup would (shared blobs are filled by their owner only)."""
        for layer in self.layers:
            layer.fill_blobs(loaded)


@contextmanager
def naming_layer(lp, bottom_shapes):
    """An exception raised inside a layer's setup or shape inference, said again with the layer, its type and
    its bottoms, of the same type where it is one of the project's or an OSError (the cause chained): a
    PrototxtError otherwise. A Python layer's exception keeps its type, as Caffe lets it through."""
    try:
        yield
    except Exception as err:
        shapes = ", ".join(f"{b} {list(s)}" for b, s in zip(lp.bottom, bottom_shapes))
        said = str(err).removeprefix(f"layer {lp.name!r}: ")
        message = f"layer {lp.name!r} ({lp.type}) with bottoms [{shapes}]: {said}"
        if lp.type == "Python" or isinstance(err, (CaffeLayersError, OSError)):
            raise _same_type(err, message) from err
        raise PrototxtError(message) from err


def infer_top_shapes(layer, bottom_shapes):
    """The layer's top shapes for these bottoms (Caffe's Reshape), checked as Blob::Reshape does."""
    lp = layer.param
    with naming_layer(lp, bottom_shapes):
        top_shapes = [tuple(s) for s in layer.top_shapes(bottom_shapes)]
    if len(top_shapes) != len(lp.top):
        raise PrototxtError(f"layer {lp.name!r} ({lp.type}) produces {len(top_shapes)} tops, "
                            f"but the prototxt names {len(lp.top)}")
    for name, shape in zip(lp.top, top_shapes):
        check_blob_shape(shape, f"layer {lp.name!r} ({lp.type}): top {name!r}", PrototxtError)
    return top_shapes


def _same_type(err, message):
    """An exception of err's type saying `message`; err itself, with the message as a note, where the type
    cannot be built from one string."""
    try:
        return type(err)(message)
    except Exception:
        err.add_note(message)
        return err


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector off inside the block. A build makes hundreds of thousands of objects
    (messages, modules, fx nodes) and none of them garbage; each full collection on the way walks every live
    object of the process (torch's included): a third of a large net's build time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compile_plan(prototxt, phase=TEST, variables=None, level=0, stages=()):
    """Parse, upgrade and filter a net (path, prototxt text or NetParameter) and compile its Plan."""
    from caffe_layers.layers.python_layer import module_search_path

    phase = phase_value(phase)
    state = pb.NetState(phase=phase, level=level)
    state.stage.extend(stages)
    with paused_gc():
        net_param = filter_net(read_net(prototxt, variables), state)
        with module_search_path(prototxt):  # Python layers may import modules beside the prototxt
            return Plan(net_param, phase)


def need_backward(plan):
    """(per step, whether Caffe's Net::Init would backpropagate through it: it has a bottom that needs a
    gradient or a parameter with lr_mult != 0, and it contributes to a loss, or force_backward is set;
    per step and bottom, whether that bottom gets a diff: its blob needs one and propagate_down allows)."""
    force = plan.net_param.force_backward
    blob_needs, needs, bottom_needs = {}, [], []
    for step in plan.steps:
        bottom_needs.append([blob_needs.get(b, False) and down for b, down in zip(step.bottoms, step.propagate_down)])
        lp = step.layer.param
        learns = any((lp.param[i].lr_mult if i < len(lp.param) else 1.0) != 0 for i in range(len(step.layer.blobs)))
        need = force or learns or any(blob_needs.get(b, False) and down
                                      for b, down in zip(step.bottoms, step.propagate_down))
        for t in step.tops:
            blob_needs[t] = need or (force and step.is_input)
        needs.append(need and not step.is_input)
    under_loss = set()
    for i in reversed(range(len(plan.steps))):
        step = plan.steps[i]
        if any(step.loss_weights) or any(t in under_loss for t in step.tops):
            under_loss.update(step.bottoms)
        elif not force:
            needs[i] = False
    return needs, bottom_needs


def mark_channels_last(steps, outputs):
    """Let a layer hand its top on in the channels-last layout (layer.keep_channels_last(): TRAIN-phase
    Convolution and MAX Pooling under autograd on the CPU) where every reader takes that layout
    (layer.takes_channels_last) and the top is no net output and never written in place: LeNet's conv1 ->
    pool1 -> conv2 -> pool2 run without layout copies between them."""
    readers = {}
    for step in steps:
        for b in step.bottoms:
            readers.setdefault(b, []).append(step)
    for step in steps:
        keep = getattr(step.layer, "keep_channels_last", None)
        if keep is None or len(step.tops) != 1 or step.tops[0] in outputs or step.tops[0] in step.bottoms:
            continue
        top = step.tops[0]
        if all(getattr(r.layer, "takes_channels_last", False) and top not in r.tops for r in readers[top]):
            step.layer.hands_channels_last = keep()


def rewritten_later(steps):
    """Per step, per bottom: whether a later step writes that blob in place (so a saved input must be a copy)."""
    last_in_place = {}
    for i, step in enumerate(steps):
        for t in step.tops:
            if t in step.bottoms:
                last_in_place[t] = i
    return [[last_in_place.get(b, -1) >= i for b in step.bottoms] for i, step in enumerate(steps)]


def fused_layout(steps, fused_steps):
    """([(index of the step in `steps`, step)] of a fused forward, {blob a fused step skips: indices of the
    chain's steps that make it}); ([], {}) without fusion."""
    if fused_steps is None:
        return [], {}
    index = {id(s.layer): i for i, s in enumerate(steps)}
    order, skipped = [], {}
    for step in fused_steps:
        layer = getattr(step.layer, "conv", step.layer)
        order.append((index[id(layer)], step))
        if layer is not step.layer:  # a FusedSegawareConv: its Im2col, Tile and Eltwise steps were skipped
            chain = [index[id(m)] for m in (step.layer.im2col, step.layer.tile, step.layer.eltwise)]
            for i in chain:
                for t in steps[i].tops:
                    skipped[t] = sorted(chain)
    return order, skipped
