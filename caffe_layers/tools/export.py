"""`caffe-layers export`: a net as ONNX (onnxruntime runs it with no custom-op library) or as a torch.export
ExportedProgram (.pt2).

  caffe-layers export MODEL.prototxt [WEIGHTS.caffemodel] -o net.onnx
  caffe-layers export MODEL.prototxt [WEIGHTS.caffemodel] --format pt2 [--custom-ops] -o net.pt2

The net is built as TorchNet builds it (segaware chains fused, BatchNorm folded in a TEST net) and traced under
`native.disabled()`, so every layer, a fused step included, is its pure-PyTorch reference: standard aten ops,
which torch.onnx's exporter lowers to standard ONNX operators. Inputs and outputs are the net's input and
output blobs, by name. The batch axis is dynamic, and the spatial axes too where the net runs at another size.
Such a .pt2 holds only aten ops (plain `torch.export.load` runs it, without this package); with --custom-ops
the native kernels stay in it as torch.ops.caffe_layers.* ops, and its loader needs `import caffe_layers.native`.
"""

import contextlib

import torch
from torch import nn

from caffe_layers import native
from caffe_layers.errors import atomic_path, check_overwrite


class _Positional(nn.Module):
    """The net with positional inputs and a tuple of outputs, in the order of net.inputs / net.outputs."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.outputs = [name for name in net.outputs if name not in net.inputs]  # an input passed through: not an output

    def forward(self, *inputs):
        tops = self.net(*inputs)
        return tuple(tops[name] for name in self.outputs)


def example_inputs(net, batch=None):
    """Random inputs at the net's Input shapes (batch replaced when given)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name in net.inputs:
        shape = list(net.blob_shapes[name])
        if batch is not None and shape:
            shape[0] = batch
        out[name] = torch.rand(shape, generator=generator)
    return out


def _trace_inputs(net, dynamic):
    """Example inputs to trace with: batch 2 for a dynamic export where the net runs at it (torch.export fixes
    an axis traced at size 1), else the net's own sizes."""
    if dynamic:
        doubled = example_inputs(net, batch=2)
        if _runs_at(net, doubled):
            return doubled
    return example_inputs(net)


def _runs_at(net, inputs):
    try:
        with torch.no_grad(), native.disabled():
            net(**inputs)
        return True
    except Exception:
        return False


def dynamic_axes_for(net, inputs):
    """{blob: {axis: name}}: batch where the net runs at another batch, H and W where it runs at another size."""
    def grown(spatial):
        out = {}
        for name, x in inputs.items():
            shape = list(x.shape)
            if shape:
                shape[0] += 1
            if spatial:
                shape[2:] = [s + 8 for s in shape[2:]]
            out[name] = torch.rand(shape)
        return out

    axes = {}
    spatial = _runs_at(net, grown(True))
    if spatial or _runs_at(net, grown(False)):
        for name, x in inputs.items():
            if x.dim():
                axes[name] = {0: "batch"}
                if spatial:
                    axes[name].update({d: f"{name}_{'hw'[d - 2] if d < 4 else d}" for d in range(2, x.dim())})
    return axes


def _write_atomic(path, write, force):
    """write(tmp) through a temporary file renamed to `path`; an existing `path` only with force."""
    check_overwrite(path, force)
    with atomic_path(path) as tmp:
        write(tmp)


def _dynamic_shapes(net, inputs, dynamic):
    """torch.export's dynamic_shapes ({blob: {axis: Dim}}) and the axes they stand for."""
    axes = dynamic_axes_for(net, inputs) if dynamic else {}
    return {name: {axis: torch.export.Dim.AUTO for axis in axes.get(name, {})} for name in net.inputs}, axes


OPTIMIZE = ("fold", "full", "none")


def _stable_sort(self, stable=None, dim=-1, descending=False):
    """ONNX for aten.sort.stable, which torch.onnx does not translate (it does sort.default, as this): TopK over
    the whole axis, whose ties keep the lower index first, as a stable sort does (ArgMax's top_k > 1)."""
    from onnxscript import opset18 as op

    axis = dim % len(self.shape)
    count = op.Shape(self, start=axis, end=axis + 1)
    return op.TopK(self, count, axis=axis, largest=int(descending), sorted=1)


def export_onnx(net, path, inputs=None, dynamic=True, opset=18, force=False, optimize="fold"):
    """Write `net` (a TorchNet) as ONNX at `path` through the torch.export-based exporter (needs onnxscript);
    returns the dynamic axes ({blob: {axis: name}}).

    optimize: "fold" folds constants and removes unused nodes (onnxruntime applies its own graph optimisations
    when it loads the file); "full" runs onnxscript's whole optimizer, whose pattern rewriter grows faster than
    the graph (four fifths of the res deploy's four-minute export); "none" writes the exporter's graph as is."""
    try:
        import onnxscript.optimizer
    except ImportError:
        raise ImportError("ONNX export needs onnxscript: pip install 'caffe_layers[onnx]' (or onnxscript)") from None
    if optimize not in OPTIMIZE:
        raise ValueError(f"export_onnx: optimize={optimize!r}: expected one of {', '.join(OPTIMIZE)}")
    inputs = inputs if inputs is not None else _trace_inputs(net, dynamic)
    shapes, axes = _dynamic_shapes(net, inputs, dynamic)
    wrapper = _Positional(net)
    wrapper.training = net.training  # the net's own mode (set without recursing into it)

    def write(tmp):
        with torch.no_grad(), native.disabled():
            program = torch.onnx.export(wrapper, tuple(inputs[name] for name in net.inputs), dynamo=True,
                                        input_names=list(net.inputs), output_names=wrapper.outputs,
                                        dynamic_shapes=(tuple(shapes[name] for name in net.inputs),),
                                        opset_version=opset, optimize=optimize == "full", verbose=False,
                                        custom_translation_table={torch.ops.aten.sort.stable: _stable_sort})
        if optimize == "fold":
            onnxscript.optimizer.fold_constants(program.model)
            onnxscript.optimizer.remove_unused_nodes(program.model)
        program.save(tmp)

    _write_atomic(path, write, force)
    return axes


def export_program(net, inputs=None, dynamic=True, custom_ops=False):
    """torch.export of `net`: under native.disabled() an ExportedProgram of aten ops only; with custom_ops the
    native kernels stay in it as torch.ops.caffe_layers.* (its loader needs `import caffe_layers.native`)."""
    inputs = inputs if inputs is not None else _trace_inputs(net, dynamic)
    shapes, _ = _dynamic_shapes(net, inputs, dynamic)
    with torch.no_grad(), (contextlib.nullcontext() if custom_ops else native.disabled()):
        return torch.export.export(net, (), inputs, dynamic_shapes=shapes)


def export_pt2(net, path, inputs=None, dynamic=True, force=False, custom_ops=False):
    """Write `net` as a .pt2 (torch.export.save of export_program); load it with torch.export.load."""
    program = export_program(net, inputs, dynamic, custom_ops)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns about a name not ending in .pt2
            torch.export.save(program, f)

    _write_atomic(path, write, force)
    return program


def add_arguments(parser, command):
    parser.add_argument("model", help="net prototxt")
    parser.add_argument("weights", nargs="?", help=".caffemodel / .caffemodel.h5 (default: the fillers)")
    parser.add_argument("-o", "--output", required=True, help="net.onnx or net.pt2")
    parser.add_argument("--format", default=None, choices=["onnx", "pt2"],
                        help="output format (default: from the output's extension, else onnx)")
    parser.add_argument("--phase", default="test", type=str.lower, choices=["train", "test"])
    parser.add_argument("--static", action="store_true", help="fixed input sizes (no dynamic batch or spatial axes)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--optimize", default="fold", choices=OPTIMIZE,
                        help="ONNX graph clean-up: fold (constant folding, unused nodes; the default), full "
                             "(onnxscript's optimizer: slow on large nets), none")
    parser.add_argument("--custom-ops", action="store_true",
                        help="pt2 only: keep the native kernels as torch.ops.caffe_layers.* custom ops (faster; "
                             "the loader needs `import caffe_layers.native`) instead of their pure-PyTorch "
                             "references")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args):
    from caffe_layers.engine.graph import TorchNet

    fmt = args.format or ("pt2" if args.output.endswith(".pt2") else "onnx")
    if args.custom_ops and fmt != "pt2":
        raise ValueError("--custom-ops is for --format pt2: an ONNX file holds standard operators only")
    check_overwrite(args.output, args.force)  # before the (slow) build
    net = TorchNet(args.model, weights=args.weights, phase=args.phase)
    if fmt == "onnx":
        axes = export_onnx(net, args.output, dynamic=not args.static, opset=args.opset, force=args.force,
                           optimize=args.optimize)
    else:
        export_pt2(net, args.output, dynamic=not args.static, force=args.force, custom_ops=args.custom_ops)
        axes = None
    print(f"wrote {args.output} ({fmt}; inputs {list(net.inputs)}, outputs {list(net.outputs)}"
          + (f"; dynamic {axes}" if axes else "") + ")")
    return 0
