"""The native kernels as torch.library ops (caffe_layers::*): schemas, fake kernels, autograd registrations,
gradcheck, torch.compile(fullgraph=True) and torch.export; the fallbacks to the references; no import circle.

torch.compile runs with the aot_eager backend (autograd and graph capture as inductor sees them, without
inductor's C++ compile, which takes tens of seconds a graph on this machine)."""
import ast
import io
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from caffe_layers import native
from caffe_layers.ops import im2dist as im2dist_ref

pytestmark = [pytest.mark.skipif(not native.available("cpu"), reason="unreachable: the CPU module is always built"),
              pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")]
ops = torch.ops.caffe_layers


def _rand(shape, seed, scale=1.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# a 2 x 3 x 6 x 5 input, 3x3 windows, pad 1, stride (2, 1): outputs 3 x 5
X = _rand((2, 3, 6, 5), 1)
WINDOW = ([3, 3], [1, 1], [2, 1], [1, 1])
LABELS = torch.randint(0, 3, (2, 1, 6, 5), generator=torch.Generator().manual_seed(2)).double()
GATES = [_rand((2, 3, 6, 5), 3 + i, 0.3) for i in range(3)]
MASK, DIST = _rand((2, 9, 3, 5), 6).exp(), _rand((2, 9, 3, 5), 7).abs()
W, B = _rand((4, 3, 3, 3), 8), _rand((4,), 9)
W_GROUPED, B3 = _rand((3, 1, 3, 3), 10), _rand((3,), 11)
SCALE = torch.tensor(0.7, dtype=torch.float64)

# name: (public function, its tensor inputs, the forward op, the backward op)
CASES = {
    "im2dist L1 (Caffe backward)": (lambda x: native.im2dist(x, 3, 1, (2, 1), 1, "L1", True, True), [X],
                                    ops.im2dist, ops.im2dist_backward),
    "im2dist L2": (lambda x: native.im2dist(x, 3, 1, (2, 1), 1, "L2"), [X], ops.im2dist, ops.im2dist_backward),
    "im2parity": (lambda lab: native.im2parity(lab, 3, 1, (2, 1), 1, 2), [LABELS], ops.im2parity, None),
    "scan three-way": (lambda x, *g: native.gate_recurrent(x, *g, True, True), [X, *GATES], ops.gate_recurrent,
                       ops.gate_recurrent_backward),
    "scan one-way": (lambda x, g: native.gate_recurrent(x, g, None, None, False, False, "one"), [X, GATES[0]],
                     ops.gate_recurrent, ops.gate_recurrent_backward),
    "segaware conv": (lambda *t: native.segaware_conv(*t, 3, 1, (2, 1), 1), [X, MASK, W, B], ops.segaware_conv,
                      ops.segaware_conv_backward),
    "norm conv group 1": (lambda *t: native.norm_conv_filter(*t, 1, (2, 1), 1, 1), [X, DIST, W, B, SCALE],
                          ops.segaware_conv, ops.segaware_conv_backward),
    "norm conv grouped": (lambda *t: native.norm_conv_filter(*t, 1, (2, 1), 1, 3), [X, DIST, W_GROUPED, B3, SCALE],
                          ops.norm_filter, ops.norm_filter_backward),
}
TRUE_GRADIENT = [name for name in CASES if name not in ("im2dist L1 (Caffe backward)", "im2parity")]


def _leaves(inputs, grad=True):
    return [t.detach().clone().requires_grad_(grad and t.is_floating_point() and t is not LABELS) for t in inputs]


def _forward_backward(fn, inputs):
    xs = _leaves(inputs)
    y = fn(*xs)
    if not y.requires_grad:
        return [y.detach()]
    y.backward(_rand(y.shape, 99))
    return [y.detach()] + [t.grad for t in xs]


# ---- opcheck: schema, fake kernel, autograd registration, aot dispatch with dynamic shapes ------------------
H = X.new_empty(X.shape).copy_(_rand(X.shape, 12))  # any scan output will do for the backward's check
OPCHECKS = {
    "im2dist L1": (ops.im2dist, (X, *WINDOW, "L1", True, True, False)),
    "im2dist L2": (ops.im2dist, (X, *WINDOW, "L2", False, True, False)),
    "im2dist_backward": (ops.im2dist_backward, (X, _rand((2, 9, 3, 5), 13), *WINDOW, "L1", False)),
    "im2parity": (ops.im2parity, (LABELS, *WINDOW, True, 2.0, 2.0)),
    "gate_recurrent three-way": (ops.gate_recurrent, (X, *GATES, False, True)),
    "gate_recurrent one-way": (ops.gate_recurrent, (X, None, GATES[1], None, True, False)),
    "gate_recurrent_backward": (ops.gate_recurrent_backward, (X, *GATES, H, _rand(X.shape, 14), True, True)),
    "gate_recurrent_backward one-way": (ops.gate_recurrent_backward,
                                        (X, None, GATES[1], None, H, _rand(X.shape, 14), False, False)),
    "segaware_conv": (ops.segaware_conv, (X, MASK, W, B, *WINDOW)),
    "segaware_conv no bias": (ops.segaware_conv, (X, MASK, W.reshape(4, 27), None, *WINDOW)),
    "segaware_conv_backward": (ops.segaware_conv_backward, (_rand((2, 4, 3, 5), 15), X, MASK, W, *WINDOW,
                                                            [True, False, True])),
    "norm_filter": (ops.norm_filter, (X, MASK, W_GROUPED, B3, *WINDOW[1:], 3)),
    "norm_filter_backward": (ops.norm_filter_backward, (_rand((2, 3, 3, 5), 16), X, MASK, W_GROUPED, *WINDOW[1:],
                                                        3, [True, True, False])),
}


@pytest.mark.parametrize("name", OPCHECKS)
def test_opcheck(name):
    op, args = OPCHECKS[name]
    differentiable = "backward" not in name and name != "im2parity"
    args = [t.detach().clone().requires_grad_(differentiable) if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(op, args)


# ---- the public functions run the ops; gradcheck through them -------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_public_functions_run_the_ops(name):
    fn, inputs, op, backward_op = CASES[name]
    y = fn(*_leaves(inputs))
    if backward_op is None:
        assert y.grad_fn is None
    else:
        assert op.default.name().replace("::", "_") + "_default" in y.grad_fn.name()
    with native.disabled():  # the references: the same numbers
        ref = _forward_backward(fn, inputs)
    for a, b in zip(_forward_backward(fn, inputs), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TRUE_GRADIENT)
def test_gradcheck_through_the_ops(name):
    fn, inputs, _, _ = CASES[name]
    assert torch.autograd.gradcheck(fn, _leaves(inputs), fast_mode=True)


def test_gradcheck_im2dist_l1_true_gradient_through_the_op():
    """im2dist's L1 option true_gradient (its default backward is Caffe's quirk, not a gradient)."""
    def fn(x):
        return native.im2dist(x, 3, 1, (2, 1), 1, "L1", True, True, True)

    assert "caffe_layers_im2dist_default" in fn(*_leaves([X])).grad_fn.name()
    assert torch.autograd.gradcheck(fn, _leaves([X]), fast_mode=True)


# ---- torch.compile and torch.export ---------------------------------------------------------------------
def _targets(graphs):
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", CASES)
def test_compile_fullgraph(name):
    fn, inputs, op, backward_op = CASES[name]
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda *t: fn(*t) * 2, fullgraph=True, backend=backend)
    ours = _forward_backward(compiled, inputs)
    for a, b in zip(ours, _forward_backward(lambda *t: fn(*t) * 2, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert str(op.default) in _targets(backend.fw_graphs)
    if backward_op is not None:
        assert str(backward_op.default) in _targets(backend.bw_graphs)


class _Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


@pytest.mark.parametrize("name", CASES)
def test_export(name):
    fn, inputs, op, _ = CASES[name]
    program = torch.export.export(_Module(fn), tuple(inputs))
    assert str(op.default) in _targets([program.graph_module])
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)  # needs caffe_layers.native imported: it registers the ops
    torch.testing.assert_close(loaded.module()(*inputs), fn(*inputs), rtol=0, atol=0)


def test_export_dynamic_shapes():
    """The fake kernels follow symbolic sizes: Caffe's output size rule holds for any batch, height and width."""
    fn, inputs, _, _ = CASES["im2dist L1 (Caffe backward)"]
    dims = {0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=4, max=512),
            3: torch.export.Dim("w", min=4, max=512)}
    program = torch.export.export(_Module(fn), tuple(inputs), dynamic_shapes=((dims,),))
    other = _rand((3, 3, 11, 8), 20)
    torch.testing.assert_close(program.module()(other), fn(other), rtol=0, atol=0)
    fn, inputs, _, _ = CASES["segaware conv"]
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(_Module(fn), tuple(inputs), dynamic_shapes=(({0: batch}, {0: batch}, None, None),))
    bigger = [torch.cat([t, t]) if i < 2 else t for i, t in enumerate(inputs)]
    torch.testing.assert_close(program.module()(*bigger), fn(*bigger), rtol=0, atol=0)


# ---- fallbacks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_run_the_reference(dtype):
    x = X.to(dtype)
    torch.testing.assert_close(native.im2dist(x, 3, 1, 1, 1, "L1"), im2dist_ref.im2dist(x, 3, 1, 1, 1, "L1"),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="caffe_layers::im2dist: the native kernels take float32 or float64"):
        ops.im2dist(x, *WINDOW, "L1", False, False, False)


def test_op_without_its_module_says_so(monkeypatch):
    native.available("cpu")
    monkeypatch.setitem(native._modules, "cpu", None)
    with pytest.raises(RuntimeError, match="caffe_layers::im2dist: the native cpu module is not built"):
        ops.im2dist(X, *WINDOW, "L1", False, False, False)
    y = native.im2dist(X.clone().requires_grad_(), 3, 1, 1, 1, "L1")  # the reference
    assert "caffe_layers" not in y.grad_fn.name()


def test_disabled_runs_the_reference():
    with native.disabled():
        y = native.im2dist(X.clone().requires_grad_(), 3, 1, 1, 1, "L1")
    assert "caffe_layers" not in y.grad_fn.name()


def test_ops_never_import_native():
    """The references (caffe_layers/ops) are the ground truth: they import nothing from caffe_layers.native."""
    for path in (Path(__file__).resolve().parents[1] / "caffe_layers" / "ops").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                else [])
            assert not [n for n in names if n.startswith("caffe_layers.native")], f"{path.name} imports {names}"
            assert not (isinstance(node, ast.ImportFrom) and node.module == "caffe_layers"
                        and "native" in [a.name for a in node.names]), f"{path.name} imports caffe_layers.native"


def test_every_op_has_cpu_cuda_and_meta_kernels():
    """CUDA tensors reach the CUDA module through the same implementation (registered on this CPU-only machine too)."""
    names = ["im2dist", "im2parity", "gate_recurrent", "segaware_conv", "norm_filter"]
    for name in names + [n + "_backward" for n in names if n != "im2parity"]:
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"caffe_layers::{name}", key), (name, key)


@pytest.mark.parametrize("name", CASES)
def test_meta_tensors_take_the_fake_kernels(name):
    """Shape inference on the meta device runs one fake kernel, not the references' many small ops."""
    fn, inputs, op, _ = CASES[name]
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.namespace)
            return func(*args, **(kwargs or {}))

    with Record():
        y = fn(*[t.to("meta") for t in inputs])
    assert y.device.type == "meta" and y.shape == fn(*inputs).shape and "caffe_layers" in calls


SEGAWARE_NET = """name: "small" force_backward: true
layer { name: "in" type: "Input" top: "x" top: "emb" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 8 }
  shape { dim: 2 dim: 4 dim: 9 dim: 8 } } }
layer { name: "dist" type: "Im2dist" bottom: "emb" top: "dist" convolution_param { kernel_size: 3 pad: 1 }
  im2dist_param { norm: L1 } }
layer { name: "exp" type: "Exp" bottom: "dist" top: "mask" exp_param { scale: -1 } }
layer { name: "tile" type: "Tile" bottom: "mask" top: "maskC" tile_param { axis: 1 tiles: 3 } }
layer { name: "im2col" type: "Im2col" bottom: "x" top: "col" convolution_param { kernel_size: 3 pad: 1 } }
layer { name: "hit" type: "Eltwise" bottom: "col" bottom: "maskC" top: "hit" eltwise_param { operation: PROD } }
layer { name: "conv" type: "Convolution" bottom: "hit" top: "y" convolution_param { num_output: 4 kernel_size: 3
  pad: 1 bottom_is_im2col: true weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "normconv" type: "NormConv" bottom: "y" bottom: "emb" top: "z" convolution_param { num_output: 4
  kernel_size: 3 pad: 1 group: 2 weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }
  norm_conv_param { norm: L2 scale_term: true scale_filler { type: "constant" value: 0.8 } } }
"""


def test_segaware_net_exports_and_compiles_with_the_ops(tmp_path):
    """A fused seg-aware net as a torch module: torch.export and torch.compile(fullgraph=True) keep the native ops."""
    from caffe_layers.engine.graph import TorchNet

    (tmp_path / "net.prototxt").write_text(SEGAWARE_NET)
    torch.manual_seed(0)
    net = TorchNet(str(tmp_path / "net.prototxt"))
    x, emb = _rand((2, 3, 9, 8), 30).float(), _rand((2, 4, 9, 8), 31).float()
    expected = net(x=x, emb=emb)["z"]
    program = torch.export.export(net, (), {"x": x, "emb": emb})
    assert {"caffe_layers.im2dist.default", "caffe_layers.segaware_conv.default",
            "caffe_layers.norm_filter.default"} <= _targets([program.graph_module])
    torch.testing.assert_close(program.module()(x=x, emb=emb)["z"], expected, rtol=0, atol=0)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    emb.requires_grad_(True)
    compiled(x=x, emb=emb)["z"].sum().backward()
    assert {"caffe_layers.im2dist_backward.default", "caffe_layers.segaware_conv_backward.default",
            "caffe_layers.norm_filter_backward.default"} <= _targets(backend.bw_graphs)
    ours = emb.grad
    emb.grad = None
    net(x=x, emb=emb)["z"].sum().backward()
    torch.testing.assert_close(ours, emb.grad, rtol=1e-5, atol=1e-5)


def test_compiled_function_follows_disabled():
    """torch.compile guards on native.disabled(): inside it the compiled function is retraced with the references."""
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda x: native.im2dist(x, 3, 1) * 2, fullgraph=True, backend=backend)
    compiled(X)
    with native.disabled():
        compiled(X)
    assert ["caffe_layers" in str(g.graph) for g in backend.fw_graphs] == [True, False]
