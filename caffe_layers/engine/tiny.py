"""Small nets: a run of simple layers as one step, one native call in inference.

The layers whose lowered form is one torch call on one bottom (plain 2-D Convolution, PReLU with one slope a
channel, ReLU, MAX Pooling where torch's windows are Caffe's, Softmax over the channels of a 4-axis blob) are
chained: a run of at least two such steps, each reading the run's input or what an earlier step of the run made,
becomes one step calling `run_chain(spec, x, *blobs)`, with a convolution's ReLU/PReLU folded into it where the
convolution's own top is read by nothing else. `spec` is plain data (tuples of numbers and strings), so the
generated code holds it as a constant.

A chain is made only where every op is tiny (native.DIRECT_CONV_MAX_WORK multiply-adds, or window elements for
the others) at the blob sizes the net is built for. On a float32 CPU input outside autograd and tracing, where that holds at the input's
size, one native call runs the whole chain, its intermediates in one
scratch buffer: on a 12x12 MTCNN stage torch's per-call costs (convolution setup, allocations, dispatch) were
most of the time. Everywhere else (autograd, torch.compile, torch.export, make_fx, larger maps, other dtypes,
native.disabled()) the spec runs as the layers' own torch calls, so gradients, exported graphs and numbers are
those of the unchained layers (at some microseconds more a call than the unchained net: a P-Net built at 12x12
and run at 24x24 about 10%); the native sums run in another order, equal to float rounding.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from caffe_layers import native
from caffe_layers.layers.base import Layer, canonical_axis, leaf_function
from caffe_layers.layers.pooling import caffe_max_pool, torch_pooled_size

_CODES = {"conv": 0, "act": 1, "max_pool": 2, "softmax": 3}
_ACTS = {"": 0, "relu": 1, "prelu": 2}
_PLAIN = (torch.Tensor, nn.Parameter)


class LayerChain:
    """A step's layer: the chained layers, run as run_chain(spec, x, *their blobs in order)."""

    def __init__(self, layers, spec):
        self.layers, self.spec = layers, spec
        self.name, self.param = layers[0].name, layers[0].param

    def __repr__(self):
        return f"LayerChain({' -> '.join(layer.name for layer in self.layers)})"


def _op(step, shapes):
    """The chain op of a step, blobs indexed within its layer: (kind, *settings), or None."""
    layer = step.layer
    if (not isinstance(layer, Layer) or len(step.bottoms) != 1 or len(step.tops) != 1 or any(step.loss_weights)
            or not all(step.propagate_down) or len(shapes.get(step.bottoms[0], ())) != 4 or not layer.lowered()):
        return None
    kind = layer.param.type
    if kind == "Convolution" and layer.nsp == 2:
        window = tuple(layer.kernel + layer.pad + layer.stride + layer.dilation)
        return ("conv", 0, 1 if layer.bias_term else -1, tuple(layer.stride), tuple(layer.pad),
                tuple(layer.dilation), layer.group, window)
    if kind == "PReLU":
        return ("act", "prelu", 0)
    if kind == "ReLU":
        return ("act", "relu", float(layer.negative_slope))
    if kind == "Pooling" and layer.lowered()[0] is caffe_max_pool:
        return ("max_pool", *layer.lowered()[1])
    if kind == "Softmax" and canonical_axis(layer.axis, 4, layer.name) == 1:
        return ("softmax",)
    return None


def _readers_after(steps, j, name):
    return any(name in s.bottoms for s in steps[j:])


def _chain_at(steps, i, shapes, needed):
    """(LayerChain step, index after it) for the longest chain starting at step i, or None."""
    from caffe_layers.engine.plan import Step

    x_name = steps[i].bottoms[0]
    value_of = {x_name: 0}  # blob -> its current value (0: the chain's input, k + 1: op k's top)
    ops, layers, bases, names, j = [], [], [], [], i
    while j < len(steps):
        op = _op(steps[j], shapes)
        if op is None or steps[j].bottoms[0] not in value_of:
            break
        bases.append(sum(len(layer.blobs) for layer in layers))
        layers.append(steps[j].layer)
        ops.append([op[0], value_of[steps[j].bottoms[0]], *op[1:]])
        names.append(steps[j].tops[0])
        value_of[steps[j].tops[0]] = len(ops)
        j += 1
    if len(ops) < 2:
        return None
    outputs = [(name, v) for name, v in value_of.items() if v and (name in needed or _readers_after(steps, j, name))]
    if not outputs:
        return None
    out_values = {v for _, v in outputs}
    # a convolution's ReLU/PReLU into it, where the convolution's top has no other reader
    readers = {}
    for k, op in enumerate(ops):
        readers.setdefault(op[1], []).append(k)
    alias = {}
    for k, op in enumerate(ops):
        src = op[1]
        if op[0] == "act" and src and ops[src - 1][0] == "conv" and len(ops[src - 1]) == 9 \
                and readers[src] == [k] and src not in out_values:
            kind, slope = op[2], op[3]
            ops[src - 1] += [kind, bases[k] + slope if kind == "prelu" else slope]
            alias[k + 1] = src
            op[0] = None
    # renumber: the kept ops' tops are values 1, 2, ... in order; blobs indexed in the chain's blob list
    new_value, spec_ops = {0: 0}, []
    for k, op in enumerate(ops):
        if op[0] is None:
            new_value[k + 1] = new_value[alias[k + 1]]
            continue
        op[1] = new_value[op[1]]
        if op[0] == "conv":
            op[2] += bases[k]
            op[3] = op[3] + bases[k] if op[3] >= 0 else -1
            if len(op) == 9:
                op += ["", 0.0]
        elif op[0] == "act" and op[2] == "prelu":
            op[3] += bases[k]
        spec_ops.append(tuple(op))
        new_value[k + 1] = len(spec_ops)
    spec = (tuple(spec_ops), tuple(new_value[v] for _, v in outputs))
    blobs = [blob for layer in layers for blob in layer.blobs]
    if _plan(spec, shapes[x_name], blobs) is None:
        return None  # too large for the native program at the net's own size: the layers as they are
    tops = [name for name, _ in outputs]
    return Step(LayerChain(layers, spec), [x_name], tops, [True]), j


def chain_tiny_layers(steps, shapes, needed):
    """`steps` with each chain of simple layers (see the module's doc) that the native program runs at the net's
    own blob sizes as one LayerChain step; `shapes`: the plan's blob shapes, `needed`: the blobs that must keep
    their own values (outputs, kept blobs)."""
    out, i = [], 0
    while i < len(steps):
        found = _chain_at(steps, i, shapes, needed) if steps[i].bottoms else None
        if found is None:
            out.append(steps[i])
            i += 1
        else:
            out.append(found[0])
            i = found[1]
    return out


def _activate(y, kind, slope, blobs):
    if kind == "prelu":
        return F.prelu(y, blobs[slope])
    if kind == "relu":
        return torch.relu(y) if slope == 0 else F.leaky_relu(y, slope)
    return y


def _drops(spec):
    """Per op, the values its step no longer needs after it (their last reader; not outputs)."""
    ops, outputs = spec
    last = {op[1]: k for k, op in enumerate(ops)}
    drops = [[] for _ in ops]
    for v, k in last.items():
        if v not in outputs:
            drops[k].append(v)
    return drops


_MAX_PROGRAMS = 1024  # entries of the caches below (an image pyramid runs a stage at a dozen sizes)
_dropped = {}  # id(spec) -> (spec, _drops(spec))


def _run_torch(spec, x, blobs):
    """The chain as its layers' torch calls, each value freed after its last reader (as the graph frees blobs)."""
    if torch.compiler.is_compiling():  # (dynamo traces _drops on the constant spec; an id() would break it)
        drops_after = _drops(spec)
    else:
        entry = _dropped.get(id(spec))
        if entry is None or entry[0] is not spec:
            if len(_dropped) >= _MAX_PROGRAMS:
                _dropped.clear()
            entry = _dropped[id(spec)] = (spec, _drops(spec))
        drops_after = entry[1]
    ops, outputs = spec
    values = [x]
    for op, drops in zip(ops, drops_after):
        kind, src = op[0], values[op[1]]
        if kind == "conv":
            _, _, w, b, stride, pad, dilation, group, _, act, slope = op
            y = _activate(F.conv2d(src, blobs[w], blobs[b] if b >= 0 else None, stride, pad, dilation, group),
                          act, slope, blobs)
        elif kind == "act":
            y = _activate(src, op[2], op[3], blobs)
        elif kind == "max_pool":
            y = caffe_max_pool(src, *op[2:])
        else:
            y = torch.softmax(src, 1)
        del src
        for v in drops:
            values[v] = None
        values.append(y)
    return tuple(values[v] for v in outputs)


def _plan(spec, shape, blobs):
    """(ops, negative slopes, places, scratch size, output shapes) of the native program for an input of `shape`,
    or None where an op is not tiny (DIRECT_CONV_MAX_WORK multiply-adds or compared window elements) or a shape
    does not fit (the torch calls then run, and give the
    errors)."""
    ops, outputs = spec
    shapes, flat, slopes = [tuple(shape)], [], []
    for op in ops:
        N, C, H, W = shapes[op[1]]
        kh = kw = ph = pw = sh = sw = dh = dw = 1
        O, group, act, w, b, slope, negative = C, 1, 0, -1, -1, -1, 0.0
        if op[0] == "conv":
            _, _, w, b, _, _, _, group, window, kind, s = op
            kh, kw, ph, pw, sh, sw, dh, dw = window
            O = blobs[w].shape[0]
            if C != blobs[w].shape[1] * group or (b >= 0 and blobs[b].numel() != O):
                return None
            Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            if min(Ho, Wo) <= 0 or N * O * Ho * Wo * C // group * kh * kw > native.DIRECT_CONV_MAX_WORK:
                return None
            act = _ACTS[kind]
            slope, negative = (s, 0.0) if kind == "prelu" else (-1, float(s))
        elif op[0] == "act":
            act = _ACTS[op[2]]
            slope, negative = (op[3], 0.0) if op[2] == "prelu" else (-1, float(op[3]))
            Ho, Wo = H, W
        elif op[0] == "max_pool":
            (kh, kw), (sh, sw), (ph, pw), ceil_mode, smallest = op[2:7]
            if H < smallest[0] or W < smallest[1]:
                return None
            Ho, Wo = torch_pooled_size(H, kh, ph, sh, ceil_mode), torch_pooled_size(W, kw, pw, sw, ceil_mode)
        else:
            Ho, Wo = H, W
        if act == 2 and blobs[slope].numel() != O:
            return None
        if op[0] != "conv" and N * C * Ho * Wo * kh * kw > native.DIRECT_CONV_MAX_WORK:
            return None  # (the native pooling and activations are plain loops on one thread: tiny maps only)
        blob_ptrs = (i + 1 if i >= 0 else i for i in (w, b, slope))  # the blobs are ptrs[1:1 + B] (below)
        flat += [_CODES[op[0]], op[1], len(shapes), *blob_ptrs, act, O, group, N, C, H, W, kh, kw, ph, pw, sh, sw,
                 dh, dw, Ho, Wo]
        slopes.append(negative)
        shapes.append((N, O, Ho, Wo))
    # the input is ptrs[0], the blobs ptrs[1:1 + B], the outputs after them
    out_index = {v: 1 + len(blobs) + m for m, v in enumerate(outputs)}
    places, scratch = [-1], 0
    for v in range(1, len(shapes)):
        if v in out_index:
            places.append(-1 - out_index[v])
        else:
            places.append(scratch)
            scratch += shapes[v][0] * shapes[v][1] * shapes[v][2] * shapes[v][3]
    return flat, slopes, places, scratch, [shapes[v] for v in outputs]


def _compile(spec, shape, blobs):
    """[native program, output shapes, the blobs' addresses last checked] for an input of `shape`, or None (_plan)."""
    plan = _plan(spec, shape, blobs)
    if plan is None:
        return None
    flat, slopes, places, scratch, out_shapes = plan
    program = native.tiny_chain_program(flat, slopes, places, 1 + len(blobs) + len(spec[1]), scratch)
    return [program, out_shapes, None]


_programs = {}  # (id(spec), input shape) -> (spec, _compile's entry or None)


def _native_applies(x):
    return (type(x) is torch.Tensor and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.dim() == 4 and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active()
            and native.tiny_chain_ready())


@leaf_function
def run_chain(spec, x, *blobs):
    """A LayerChain's step: its outputs (a tuple) from input x and the chained layers' blobs."""
    if _native_applies(x):
        key = (id(spec), x.shape)
        entry = _programs.get(key)
        if entry is None or entry[0] is not spec:
            if len(_programs) >= _MAX_PROGRAMS:
                _programs.clear()
            entry = _programs[key] = (spec, _compile(spec, x.shape, blobs))
        program = entry[1]
        if program is not None:
            x = x.contiguous()
            ptrs = [b.data_ptr() for b in blobs]
            if ptrs != program[2]:  # blobs at new addresses (first call, loaded, moved): their kind checked again
                if not all(type(b) in _PLAIN and b.dtype == torch.float32 and b.is_contiguous() for b in blobs):
                    return _run_torch(spec, x, blobs)
                program[2] = ptrs
            tops = [torch.empty(s) for s in program[1]]
            program[0].run([x.data_ptr(), *ptrs, *[t.data_ptr() for t in tops]])
            return tuple(tops)
    return _run_torch(spec, x, blobs)
