"""Layers the torch face calls as torch functions (Layer.lowered): the same numbers as the module, Caffe's
pooling windows at every input size, state_dict, export and functional_call unchanged, hooks refused."""
import pytest
import torch
from torch import nn

from caffe_layers import NetSpec, layers as L, params as P
from caffe_layers.engine.graph import TorchNet
from caffe_layers.layers.pooling import SEPARABLE_MIN_NUMEL, separable_max_pool
from golden import make_layer

FILLER = dict(type="gaussian", std=0.5)


def pnet(tmp_path):
    """MTCNN P-Net's layers: convolution, PReLU, MAX pooling in ceil mode, softmax; two outputs."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 12]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=10, weight_filler=FILLER, bias_filler=FILLER)
    n.prelu1 = L.PReLU(n.conv1, in_place=True, prelu_param=dict(filler=FILLER))
    n.pool1 = L.Pooling(n.prelu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=3, num_output=16, weight_filler=FILLER)
    n.relu2 = L.ReLU(n.conv2, in_place=True, negative_slope=0.1)
    n.pool2 = L.Pooling(n.relu2, kernel_size=3, stride=1, pad=1, pool=P.Pooling.AVE)
    n.conv4_1 = L.Convolution(n.pool2, kernel_size=1, num_output=2, weight_filler=FILLER, bias_term=False)
    n.conv4_2 = L.Convolution(n.pool2, kernel_size=1, num_output=4, weight_filler=FILLER, bias_filler=FILLER)
    n.prob1 = L.Softmax(n.conv4_1)
    path = tmp_path / "pnet.prototxt"
    path.write_text(str(n.to_proto()))
    return path


def test_lowered_net_equals_module_calls(tmp_path):
    path = pnet(tmp_path)
    torch.manual_seed(0)
    lowered = TorchNet(str(path))
    modules = TorchNet(str(path), lower=False)
    modules.load_state_dict(lowered.state_dict())
    calls = {n.op for n in lowered.graph.nodes}
    assert "call_module" not in calls  # every layer here has a lowered form
    assert sum(n.op == "call_module" for n in modules.graph.nodes) == 9
    assert list(lowered.state_dict()) == list(modules.state_dict())
    for size in (12, 17, 30):  # other input sizes than the build's
        x = torch.randn(2, 3, size, size)
        got, want = lowered(data=x), modules(data=x)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    lowered.double(), modules.double()
    assert torch.equal(lowered(data=x)["conv4_2"], modules(data=x)["conv4_2"])


def test_lowered_net_backward_equals_module_calls(tmp_path):
    path = pnet(tmp_path)
    lowered, modules = TorchNet(str(path)), TorchNet(str(path), lower=False)
    modules.load_state_dict(lowered.state_dict())
    x = torch.randn(1, 3, 14, 14)
    for net in (lowered, modules):
        out = net(data=x)
        (out["prob1"][:, 0].sum() + out["conv4_2"].square().sum()).backward()
    for (name, a), (_, b) in zip(lowered.named_parameters(), modules.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_lowered_net_reads_replaced_and_swapped_parameters(tmp_path):
    net = TorchNet(str(pnet(tmp_path)))
    x = torch.randn(1, 3, 12, 12)
    zeros = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    out = torch.func.functional_call(net, zeros, (), {"data": x})  # parameters swapped for the call
    assert torch.equal(out["conv4_2"], torch.zeros_like(out["conv4_2"]))
    assert net(data=x)["conv4_2"].abs().sum() > 0  # and the own ones back after it
    net.conv4_2.blobs[1] = nn.Parameter(torch.full((4,), 3.0))  # a blob replaced by assignment
    net.conv4_2.blobs[0] = nn.Parameter(torch.zeros(4, 16, 1, 1))
    assert torch.equal(net(data=x)["conv4_2"], torch.full((1, 4, 3, 3), 3.0))


def test_lowered_net_exports(tmp_path):
    net = TorchNet(str(pnet(tmp_path)))
    x = torch.randn(1, 3, 12, 12)
    program = torch.export.export(net, (), {"data": x})
    modules = torch.export.export(TorchNet(str(pnet(tmp_path)), lower=False), (), {"data": x})
    assert set(program.state_dict) == set(modules.state_dict)  # the parameters by their module paths
    want = net(data=x)
    got = program.module()(data=x)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_hooks_on_lowered_layers_are_refused(tmp_path):
    path = pnet(tmp_path)
    net = TorchNet(str(path))
    for register in (net.conv1.register_forward_hook, net.pool1.register_forward_pre_hook,
                     net.prob1.register_full_backward_hook):
        with pytest.raises(ValueError, match="'(conv1|pool1|prob1)'.*lower=False"):
            register(lambda *args: None)
    seen = []
    hooked = TorchNet(str(path), lower=False)
    hooked.conv1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    hooked(data=torch.randn(1, 3, 12, 12))
    assert seen == [(1, 10, 10, 10)]


POOL_SETTINGS = [(method, k, s, p, ceil) for method in ("MAX", "AVE") for k in range(1, 5) for s in range(1, 5)
                 for p in range(k) for ceil in (True, False)]


@pytest.mark.parametrize("method,kernel,stride,pad,ceil", POOL_SETTINGS)
def test_lowered_pooling_keeps_caffe_windows_at_every_size(method, kernel, stride, pad, ceil):
    """Where Pooling runs torch's kernels at every input size (lowered), they give Caffe's windows (the
    windowed reference) and Caffe's refusals at every size; elsewhere the per-size check stays in charge."""
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: {kernel} '
                       f'stride: {stride} pad: {pad} {"" if ceil else "round_mode: FLOOR"} }}', [(1, 2, 9, 9)])
    if layer.lowered() is None:
        assert 2 * pad > kernel or (ceil and pad == 0 and stride > kernel)
        return
    for h in range(1, 10):
        x = torch.randn(1, 2, h, 10 - h, dtype=torch.float64)
        x[0, 0, 0, 0] = float("-inf")
        try:
            kernel_hw, out = layer.out_size(x.shape)
        except ValueError:
            with pytest.raises(ValueError, match="'p'"):
                layer(x)
            continue
        want = layer._max(x, kernel_hw, out) if method == "MAX" else layer._ave(x, kernel_hw, out)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,pad,ceil", [s[1:] for s in POOL_SETTINGS if s[0] == "MAX"])
def test_separable_max_pool_is_caffes_windows(kernel, stride, pad, ceil):
    """The inference path of large MAX poolings (rows, then columns) against the windowed reference, with
    ties, -inf (-FLT_MAX, as Caffe) and NaN (propagated, as torch's kernel)."""
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: MAX kernel_size: {kernel} '
                       f'stride: {stride} pad: {pad} {"" if ceil else "round_mode: FLOOR"} }}', [(1, 2, 9, 9)])
    if layer.lowered() is None:
        return
    for h in range(max(1, kernel - 2 * pad), 11):
        x = torch.randint(-2, 3, (2, 3, h, 11 - h)).double()
        x[0, 0, 0, 0], x[1, 2, -1, -1], x[0, 1] = float("nan"), float("-inf"), float("-inf")
        try:
            kernel_hw, out = layer.out_size(x.shape)
        except ValueError:
            continue
        torch.testing.assert_close(separable_max_pool(x, kernel_hw, layer.stride, layer.pad, ceil),
                                   layer._max(x, kernel_hw, out), rtol=0, atol=0, equal_nan=True)


def test_large_max_pool_runs_separable_in_inference_only():
    x = torch.randint(-3, 4, (1, 16, 96, 96)).float()  # many ties: the gradient must go to the first maximum
    assert x.numel() >= SEPARABLE_MIN_NUMEL
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [x.shape])
    with torch.inference_mode():
        fast = layer(x)
    xg = x.clone().requires_grad_()
    slow = layer(xg)
    assert torch.equal(fast, slow.detach())
    slow.backward(torch.ones_like(slow))
    windows = x.double().requires_grad_()
    layer._max(windows, layer.kernel, tuple(slow.shape[2:])).backward(torch.ones_like(slow, dtype=torch.double))
    assert torch.equal(xg.grad.double(), windows.grad)


@pytest.mark.parametrize("settings,lowered", [
    ("pool: MAX kernel_size: 2 stride: 2", True), ("pool: MAX kernel_size: 3 stride: 2", True),
    ("pool: AVE kernel_size: 3 stride: 1 pad: 1", True), ("pool: MAX kernel_size: 3 stride: 2 pad: 1", True),
    ("pool: AVE global_pooling: true", False), ("pool: MAX kernel_size: 2 stride: 3", False),
    ("pool: STOCHASTIC kernel_size: 2 stride: 2", False)])
def test_which_poolings_are_lowered(settings, lowered):
    layer = make_layer(f'name: "p" type: "Pooling" top: "t" pooling_param {{ {settings} }}', [(1, 2, 9, 9)])
    assert (layer.lowered() is not None) == lowered
    masked = make_layer(f'name: "p" type: "Pooling" top: "t" top: "mask" pooling_param {{ {settings} }}',
                        [(1, 2, 9, 9)]) if "MAX" in settings else None
    assert masked is None or masked.lowered() is None  # MAX's mask top: the module computes it


def test_lowered_net_pickles(tmp_path):
    import pickle

    net = TorchNet(str(pnet(tmp_path)))
    x = torch.randn(1, 3, 12, 12)
    again = pickle.loads(pickle.dumps(net))  # fx traces the code again: the pooling functions stay calls
    assert [n.target for n in again.graph.nodes if n.op == "call_function"] == \
        [n.target for n in net.graph.nodes if n.op == "call_function"]
    for name, value in net(data=x).items():
        assert torch.equal(again(data=x)[name], value)


def test_layers_named_as_torchnet_methods():
    """A layer named "loss" (as in most train nets), "save" or "name" neither hides nor is hidden by TorchNet's methods;
    the state_dict keys keep the layer names."""
    net = TorchNet("""
        name: "n"
        layer { name: "data" type: "Input" top: "data" top: "label"
                input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
        layer { name: "save" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
        layer { name: "name" type: "Sigmoid" bottom: "ip" top: "s" }
    """, phase="train")
    out = net(data=torch.randn(2, 3), label=torch.tensor([0.0, 3.0]))
    assert net.loss(out) == out["loss"] and net.name == "n"
    assert list(net.state_dict()) == ["save.0", "save.1"]
