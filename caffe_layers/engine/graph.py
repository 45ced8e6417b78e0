"""The torch face: a plan as a torch.fx GraphModule, one submodule per layer.

`TorchNet(prototxt, weights)` is a plain nn.Module (an fx.GraphModule): `net(data=x)` returns {output blob:
tensor}; parameters are the layers' blobs, state_dict keys "<layer>.<i>"; the generated forward frees each
blob after its last reader, so inference holds only the blobs still needed; torch.compile and torch.export
see one graph.
"""
import keyword
import operator
import re

from torch import fx, nn

from caffe_layers.engine.concat import ConcatOfInterps, concat_interps, run_interps_in_concats
from caffe_layers.engine.folding import FoldedConvolution, fold_batchnorm, folded_convolution
from caffe_layers.engine.fusion import FusedSegawareConv, fuse_steps
from caffe_layers.engine.plan import compile_plan, paused_gc
from caffe_layers.engine.tiny import LayerChain, chain_tiny_layers, run_chain
from caffe_layers.formats.proto import TEST, TRAIN
from caffe_layers.layers.base import LEAF_FUNCTIONS, Layer, stored_attribute
from caffe_layers.native import segaware_conv


def only_top(tops):
    """A layer's single top, whether its forward returned the tensor or a one-element tuple."""
    return tops[0] if isinstance(tops, (tuple, list)) else tops


def _identifier(name, taken):
    """A Python identifier for blob or layer `name`, unique among `taken`."""
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit() or keyword.iskeyword(ident):
        ident = "_" + ident
    base, k = ident, 1
    while ident in taken:
        ident, k = f"{base}_{k}", k + 1
    taken.add(ident)
    return ident


class _LeafTracer(fx.Tracer):
    """The tracer fx uses to rebuild a TorchNet's graph from its code (unpickling): the lowered layers'
    functions with control flow (base.leaf_function) stay calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(autowrap_functions=tuple(LEAF_FUNCTIONS))


# Steps whose single top is a new tensor that nothing else holds (never a view of a bottom or a blob)
FRESH_TOP_TYPES = {"Convolution", "ReLU", "Eltwise", "Pooling", "Interp"}
# Steps that read channels-last bottoms as they read plain ones (torch's kernels follow the strides) and may
# hand the layout on; before any other step (and at the outputs) a possibly channels-last blob (a folded
# convolution's top, engine/folding.py) is made contiguous
CHANNELS_LAST_READERS = {"Convolution", "ReLU", "Eltwise", "Pooling"}


def _reads_channels_last(layer):
    if isinstance(layer, FoldedConvolution):
        return True
    return (isinstance(layer, Layer) and layer.param.type in CHANNELS_LAST_READERS
            and (layer.param.type != "Convolution" or layer.lowered() is not None))


def build_graph(plan, steps, attr_of, keep=(), lowered=(), reuse=None):
    """An fx.Graph running `steps`: placeholders for the plan's inputs, a dict of outputs (and `keep`).
    The layers in `lowered` (ids) are called as their lowered form (Layer.lowered), the others as modules.
    `reuse` (a set, or None: off): see reuse_bottoms; the ids of the layers it rewrote are added to it."""
    graph = fx.Graph(tracer_cls=_LeafTracer)
    taken = set()
    env = {name: graph.placeholder(_identifier(name, taken)) for name in plan.inputs}
    fresh, candidates, channels_last = set(), [], set()

    def plain(node):
        return graph.call_method("contiguous", (node,)) if node in channels_last else node

    for step in steps:
        if step.is_input:
            continue
        reads_channels_last = _reads_channels_last(step.layer)
        sources = [env[b] if reads_channels_last else plain(env[b]) for b in step.bottoms]
        args = [src if down else graph.call_method("detach", (src,))
                for src, down in zip(sources, step.propagate_down)]
        def blob(layer, i):
            return graph.get_attr(f"{attr_of[id(layer)]}.blobs.{i}")

        if isinstance(step.layer, FusedSegawareConv):
            conv, im2col = step.layer.conv, step.layer.im2col
            bias = blob(conv, 1) if conv.bias_term else None
            node = graph.call_function(segaware_conv, (*args, blob(conv, 0), bias, tuple(im2col.kernel),
                                                      tuple(im2col.pad), tuple(im2col.stride), tuple(im2col.dilation)))
        elif isinstance(step.layer, FoldedConvolution):
            node = graph.call_function(folded_convolution, (*args, *step.layer.arguments(blob)))
        elif isinstance(step.layer, ConcatOfInterps):
            interps = tuple(None if m is None else graph.get_attr(attr_of[id(m)]) for m in step.layer.interps)
            node = graph.call_function(concat_interps, (graph.get_attr(attr_of[id(step.layer.concat)]), interps,
                                                        *args))
        elif isinstance(step.layer, LayerChain):
            blobs = tuple(blob(layer, i) for layer in step.layer.layers for i in range(len(layer.blobs)))
            node = graph.call_function(run_chain, (step.layer.spec, *args, *blobs))
        elif id(step.layer) in lowered:
            function, constants = step.layer.lowered()
            blobs = tuple(blob(step.layer, i) for i in range(len(step.layer.blobs)))
            node = graph.create_node("call_function", function, (*args, *blobs, *constants),
                                     name=attr_of[id(step.layer)])
        else:
            node = graph.call_module(attr_of[id(step.layer)], tuple(args))
        if reuse is not None and hasattr(step.layer, "in_place_form") and len(step.tops) == 1:
            candidates.append((node, step.layer, list(node.args[:len(step.bottoms)])))  # (detached ones too)
        if len(step.tops) == 1 and not isinstance(step.layer, LayerChain):  # (a chain returns a tuple)
            env[step.tops[0]] = node if node.op == "call_function" else graph.call_function(only_top, (node,))
            if isinstance(step.layer, (FusedSegawareConv, FoldedConvolution, ConcatOfInterps)) or (
                    isinstance(step.layer, Layer) and step.layer.param.type in FRESH_TOP_TYPES):
                fresh.add(env[step.tops[0]])
        else:
            for i, top in enumerate(step.tops):
                env[top] = graph.call_function(operator.getitem, (node, i))
        if isinstance(step.layer, FoldedConvolution) or getattr(step.layer, "hands_channels_last", False) or (
                reads_channels_last and any(src in channels_last for src in sources)):
            channels_last.update(env[top] for top in step.tops)
    wanted = list(plan.outputs) + [b for b in keep if b not in plan.outputs]
    missing = [b for b in wanted if b not in env]
    if missing:
        raise ValueError(f"net {plan.name!r}: blobs {missing} are not computed by the graph")
    graph.output({name: plain(env[name]) for name in wanted})
    if reuse is not None:
        reuse.update(reuse_bottoms(candidates, fresh))
    return graph


def reuse_bottoms(candidates, fresh):
    """Let the steps that can (a layer's in_place_form: ReLU, Eltwise SUM) write their result into a bottom
    that is a fresh tensor (`fresh`) read by no other node (not an output, kept, detached or read later): the
    functions do so only where autograd records nothing (no_grad, inference_mode), else they compute as
    before. Returns the ids of the layers rewritten (their module calls are gone: hooks are refused)."""
    rewritten = set()
    for node, layer, bottoms in candidates:
        form = layer.in_place_form([b in fresh and len(b.users) == 1 for b in bottoms])
        if form is None:
            continue
        function, constants, order = form
        node.op, node.target = "call_function", function
        node.args = tuple(bottoms[i] for i in order) + tuple(constants)
        rewritten.add(id(layer))
    return rewritten


class TorchNet(fx.GraphModule):
    """A Caffe net as a plain torch module (the torch face; caffe_layers.Net is the pycaffe face).

    TorchNet(prototxt, weights=None, phase="test", variables=None, *, level=0, stages=(), fuse=True,
    fold=None, keep_blobs=(), strict_weights=False, lower=True). Call it with the input blobs by name (`net(data=x)`, or
    positionally in the order of `net.inputs`); it returns {blob: tensor} for the net's outputs and the
    blobs named in keep_blobs. `fuse` runs each segmentation-aware convolution chain as one native step (its
    C*K*H*W intermediates are never made; name one in keep_blobs to get it); `fold` (default: in a TEST net)
    folds each Convolution -> BatchNorm -> Scale into one convolution (engine/folding.py). `lower` calls the
    simple layers (Layer.lowered: plain Convolution, Pooling, PReLU, ReLU, Softmax) as torch functions in the
    graph rather than as modules, which matters on small nets, and runs each chain of them as one step
    (engine/tiny.py: one native call in float32 CPU inference on tiny maps) and the Interps that only a Concat
    reads inside it (engine/concat.py); module hooks on them are refused (lower=False to hook layers).
    """

    def __init__(self, prototxt, weights=None, phase=TEST, variables=None, *, level=0, stages=(), fuse=True,
                 fold=None, keep_blobs=(), strict_weights=False, lower=True):
        with paused_gc():
            self._build(prototxt, weights, phase, variables, level, stages, fuse, fold, keep_blobs, strict_weights,
                        lower)

    def _build(self, prototxt, weights, phase, variables, level, stages, fuse, fold, keep_blobs, strict_weights,
               lower):
        plan = compile_plan(prototxt, phase, variables, level, stages)
        steps = (fuse_steps(plan, keep_blobs) if fuse else None) or plan.steps
        if fold if fold is not None else plan.phase == TEST:
            steps = fold_batchnorm(steps, set(plan.outputs) | set(keep_blobs))
        if lower:
            steps = run_interps_in_concats(steps, set(plan.outputs) | set(keep_blobs))
            steps = chain_tiny_layers(steps, plan.blob_shapes, set(plan.outputs) | set(keep_blobs))
        # layer attributes: not TorchNet's own names (a layer "loss" or "save" would hide or be hidden by them)
        root, attr_of, renamed = nn.Module(), {}, {}
        taken = set(dir(TorchNet)) | {"plan", "name", "phase", "_renamed"}
        for layer in plan.layers:
            attr = layer.name if layer.name.isidentifier() and layer.name not in taken else None
            if attr is None:
                attr = _identifier(layer.name, taken)
                renamed[attr] = layer.name
            taken.add(attr)
            attr_of[id(layer)] = attr
            root.add_module(attr, layer)
        lowered = {id(s.layer) for s in steps if lower and isinstance(s.layer, Layer) and s.layer.lowered()}
        lowered |= {id(layer) for s in steps if isinstance(s.layer, (LayerChain, ConcatOfInterps))
                    for layer in s.layer.layers}
        reuse = set() if lower else None
        graph = build_graph(plan, steps, attr_of, keep_blobs, lowered, reuse)
        lowered |= reuse or set()
        super().__init__(root, graph, class_name="TorchNet")
        for layer in plan.layers:  # every layer is a submodule, also those a fused step reads only blobs of
            setattr(self, attr_of[id(layer)], layer)
            # (this instance's own class) the generated forward reads its layers without a failed lookup
            setattr(type(self), attr_of[id(layer)], stored_attribute("_modules", attr_of[id(layer)]))
            if id(layer) in lowered:
                layer.lowered_in = plan.name
        self.plan = plan
        self.name = plan.name
        self.phase = plan.phase
        self._renamed = renamed
        if renamed:
            self._register_state_dict_hook(_state_dict_names)
            self._register_load_state_dict_pre_hook(_load_state_dict_names, with_module=True)
        loaded = self.copy_from(weights, strict=strict_weights).loaded if weights is not None else ()
        plan.fill_blobs(loaded)
        self.train(plan.phase != TEST)

    def train(self, mode=True):
        """nn.Module's train()/eval(), driving Caffe's phase: every layer runs as in TRAIN (Dropout drops,
        BatchNorm without an explicit use_global_stats uses the batch's statistics) or in TEST."""
        super().train(mode)
        if "plan" not in self.__dict__:
            return self
        if mode and any(n.target is folded_convolution for n in self.graph.nodes):
            raise ValueError(f"net {self.name!r}: BatchNorm is folded into the convolutions (a TEST net); "
                             f"build it with fold=False to train it")
        for layer in self.plan.layers:
            layer.phase = TRAIN if mode else TEST
            if layer.param.type == "BatchNorm" and not layer.param.batch_norm_param.HasField("use_global_stats"):
                layer.use_global_stats = not mode
        self.phase = TRAIN if mode else TEST
        return self

    # ---- what the plan knows --------------------------------------------------------------
    @property
    def layer_modules(self):
        return self.plan.layers

    @property
    def inputs(self):
        return self.plan.inputs

    @property
    def outputs(self):
        return list(self.graph.output_node().args[0])

    @property
    def blob_shapes(self):
        """Every blob's shape at the sizes the net was built for."""
        return dict(self.plan.blob_shapes)

    def loss(self, tops):
        """The weighted sum of the loss tops in `tops` (a forward's result), as Caffe reports it."""
        terms = [w * tops[name].sum() for name, w in self.plan.top_weights() if w and name in tops]
        return sum(terms[1:], terms[0]) if terms else None

    # ---- weights --------------------------------------------------------------------------
    def copy_from(self, weights, strict=False):
        """Load a .caffemodel / .caffemodel.h5, matched by layer name as Caffe does; returns a LoadReport."""
        from caffe_layers.formats.weights import load_weights

        return load_weights(self, weights, strict=strict)

    def save(self, path):
        """Write the weights as a .caffemodel (or .caffemodel.h5 for a path ending in .h5)."""
        from caffe_layers.formats.weights import save_weights

        save_weights(self, path)


def _state_dict_names(module, state_dict, prefix, local_metadata):
    for attr, name in module._renamed.items():
        for key in [k for k in state_dict if k.startswith(f"{prefix}{attr}.")]:
            state_dict[f"{prefix}{name}.{key[len(prefix) + len(attr) + 1:]}"] = state_dict.pop(key)


def _load_state_dict_names(module, state_dict, prefix, *args):
    for attr, name in module._renamed.items():
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            state_dict[f"{prefix}{attr}.{key[len(prefix) + len(name) + 1:]}"] = state_dict.pop(key)
