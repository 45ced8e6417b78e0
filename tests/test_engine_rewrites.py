"""Issue 14's engine promises on every deploy config (test_export.DEPLOY, at small sizes): the inference rewrites
(fused seg-aware chains, folded BatchNorm/Scale, lowered layers, tiny chains, in-place ReLU/Eltwise) give the
plain net's numbers; torch.export keeps the native kernels as custom ops; inference frees each blob after its
last reader; compare/dump run the plain layers."""
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caffe_layers import Net, native
from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.dump import capture
from caffe_layers.tools.export import example_inputs, export_program
from caffe_layers.tools.reference import fill_net_hash
from test_export import DEPLOY

WHOLE_NET_RTOL, ATOL = 1e-3, 1e-5  # the golden README's whole-net rule: max|a - b| <= atol + rtol * max|b|


def assert_close_as_golden(got, want, what):
    bound = ATOL + WHOLE_NET_RTOL * float(want.abs().max())
    error = float((got - want).abs().max())
    assert error <= bound, f"{what}: max error {error:g} over {bound:g}"


def _custom_ops(program):
    return {str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("caffe_layers.")}


NATIVE_OPS = {"Im2dist": "im2dist", "Im2parity": "im2parity", "GateRecurrent2dnoind": "gate_recurrent",
              "NormConv": "norm_filter", "NormConvMeanfield": "norm_filter"}


@pytest.mark.parametrize("config", DEPLOY)
def test_inference_net_equals_the_plain_net_and_exports_with_the_native_ops(config):
    """The default inference net (every rewrite on) against the same net with none (fuse, fold and lower off, the
    pure-PyTorch references); then torch.export of the default net with the native kernels on: one program, the
    kernels in it as torch.ops.caffe_layers.* custom ops, the eager numbers. (sss has no native kernel: its export
    through the references is tests/test_torch_face.py::test_export_deploy.)"""
    text = DEPLOY[config]()
    plain = TorchNet(text, fuse=False, fold=False, lower=False)
    fill_net_hash(plain)
    net = TorchNet(text)
    net.load_state_dict(plain.state_dict())
    inputs = example_inputs(plain)
    with torch.no_grad(), native.disabled():
        want = plain(**inputs)
    with torch.inference_mode():
        got = net(**inputs)
    assert set(got) == set(want)
    for blob, value in want.items():
        assert_close_as_golden(got[blob], value, f"{config} {blob!r}")
    types = {layer.param.type for layer in net.layer_modules}
    expected_ops = {f"caffe_layers.{op}.default" for t, op in NATIVE_OPS.items() if t in types}
    if "caffe_layers_native_segaware_conv" in net.code:  # a fused seg-aware chain
        expected_ops.add("caffe_layers.segaware_conv.default")
    if not expected_ops:
        assert config == "sss"
        return
    program = export_program(net, inputs, dynamic=False, custom_ops=True)
    assert expected_ops <= _custom_ops(program)
    with torch.no_grad():
        exported = program.module()(**inputs)
    for blob, value in got.items():  # (folded weights round as the eager net's cached ones may not)
        assert_close_as_golden(exported[blob], value, f"{config} exported {blob!r}")


class LiveTensors(TorchDispatchMode):
    """The most op results alive at once (weak references: a result freed by the graph is no longer counted)."""

    def __init__(self):
        super().__init__()
        self.alive, self.most = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and id(t) not in self.alive:
                self.alive[id(t)] = weakref.ref(t, lambda _, key=id(t): self.alive.pop(key, None))
        self.most = max(self.most, len(self.alive))
        return out


CHAIN = "".join(  # ten layers, each reading only the previous one's top
    f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"x" if i == 0 else f"r{i - 1}"}" top: "c{i}" '
    f'convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" }} }} }}'
    f'layer {{ name: "r{i}" type: "TanH" bottom: "c{i}" top: "r{i}" }}' for i in range(5))
CHAIN = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 40 dim: 40 } } }' + CHAIN


@pytest.mark.parametrize("lower", [True, False])
def test_inference_frees_each_blob_after_its_last_reader(lower):
    x = torch.rand(1, 3, 40, 40)
    blobs = [f"{k}{i}" for i in range(5) for k in "cr"]
    counts = {}
    for keep in ((), blobs):
        net = TorchNet(CHAIN, lower=lower, keep_blobs=keep)
        with torch.inference_mode(), LiveTensors() as live:
            tops = net(x=x)
        counts[bool(keep)] = live.most
        assert set(tops) == {"r4", *keep}
        assert len(live.alive) == len(tops)  # after the forward: its outputs only, nothing kept by the net
    assert counts[False] <= 3 < len(blobs) <= counts[True]  # a chain holds its current blobs only


BN_CHAIN = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 3 kernel_size: 3 pad: 1
        weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "s" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
"""


def test_dump_sees_every_layer_of_a_folded_net():
    """compare/dump run the plan's own steps (capture): the convolution's top before BatchNorm, BatchNorm's and
    Scale's, none folded, as the original computes them; TorchNet folds the same layers for inference."""
    net = Net(BN_CHAIN, phase="test")
    fill_net_hash(net)
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    entries = capture(net, {"x": x})
    assert [(e.layer, e.top) for e in entries] == [("in", "x"), ("c", "c"), ("bn", "c"), ("s", "c"), ("r", "c")]
    w, b = (torch.from_numpy(p.data) for p in net.params["c"])
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), w, b, padding=1).numpy()
    np.testing.assert_allclose(entries[1].value, conv, rtol=1e-5, atol=1e-6)
    mean, var, factor = (p.data for p in net.params["bn"])
    normed = (conv - (mean / factor[0])[None, :, None, None]) / np.sqrt(var / factor[0] + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(entries[2].value, normed, rtol=1e-4, atol=1e-5)
    folded = TorchNet(BN_CHAIN)
    folded.load_state_dict({k: torch.from_numpy(v) for k, v in _params(net).items()})
    assert any(n.op == "call_function" and n.target.__name__ == "folded_convolution" for n in folded.graph.nodes)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x=torch.from_numpy(x))["c"].numpy(), entries[-1].value, rtol=1e-4, atol=1e-5)


def _params(net):
    return {f"{layer}.{i}": blob.data for layer, blobs in net.params.items() for i, blob in enumerate(blobs)}
