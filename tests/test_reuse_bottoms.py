"""TorchNet's reuse of bottoms: ReLU and Eltwise SUM write into a fresh bottom that no other node reads, only
where autograd records nothing; the numbers, the caller's tensors, kept blobs and gradients are unchanged."""
import pytest
import torch

from caffe_layers import NetSpec, layers as L, params as P
from caffe_layers.engine.graph import TorchNet
from caffe_layers.layers.eltwise import sum_into_first
from caffe_layers.layers.relu import leaky_relu_into_input, relu_into_input

FILLER = dict(type="gaussian", std=0.5)


def residual_net(tmp_path):
    """Maps above engine/tiny.py's chain threshold, so that every layer keeps its own graph node."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 80, 80]))
    n.relu0 = L.ReLU(n.data)  # the caller's input: never overwritten
    n.a = L.Convolution(n.relu0, kernel_size=3, pad=1, num_output=16, weight_filler=FILLER, bias_filler=FILLER)
    n.b = L.Convolution(n.a, kernel_size=1, num_output=16, weight_filler=FILLER)  # a is read twice
    n.relu_a = L.ReLU(n.a, negative_slope=0.2)  # a has another reader: a copy
    n.c = L.Convolution(n.relu_a, kernel_size=1, num_output=16, weight_filler=FILLER)
    n.added = L.Eltwise(n.relu_a, n.c, operation=P.Eltwise.SUM)  # relu_a is read by c too: writes into c
    n.relu_added = L.ReLU(n.added, in_place=True)
    n.scaled = L.Eltwise(n.relu_added, n.b, operation=P.Eltwise.SUM, coeff=[0.5, -2.0])
    n.kept = L.Convolution(n.scaled, kernel_size=1, num_output=16, weight_filler=FILLER)
    n.relu_kept = L.ReLU(n.kept)  # its bottom is kept (keep_blobs): a copy
    path = tmp_path / "residual.prototxt"
    path.write_text(str(n.to_proto()))
    return str(path)


def rewritten(net):
    return {n.name: n.target for n in net.graph.nodes if n.target in (relu_into_input, leaky_relu_into_input,
                                                                        sum_into_first)}


def test_only_sole_readers_of_fresh_tensors_are_reused(tmp_path):
    net = TorchNet(residual_net(tmp_path), keep_blobs=["kept"])
    assert set(rewritten(net)) == {"added", "relu_added", "scaled"}
    added, scaled = net.graph.find_nodes(op="call_function", target=sum_into_first)
    assert added.args[0].name == "c"  # swapped: relu_a is read by c too, c by the sum only
    assert scaled.args[-2:] == ((0.5, -2.0), "scaled")
    assert not rewritten(TorchNet(residual_net(tmp_path), lower=False))


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_reusing_net_gives_the_same_numbers_and_keeps_inputs(tmp_path, mode):
    torch.manual_seed(0)
    net = TorchNet(residual_net(tmp_path), keep_blobs=["kept", "a", "relu_a"])
    plain = TorchNet(residual_net(tmp_path), keep_blobs=["kept", "a", "relu_a"], lower=False)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 80, 80)
    before = x.clone()
    with mode():
        got, want = net(data=x), plain(data=x)
    assert torch.equal(x, before)
    assert got.keys() == want.keys() == {"relu_kept", "kept", "a", "relu_a"}
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_reusing_net_under_autograd_is_unchanged(tmp_path):
    torch.manual_seed(0)
    net = TorchNet(residual_net(tmp_path))
    plain = TorchNet(residual_net(tmp_path), lower=False)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 80, 80)
    for model in (net, plain):
        model(data=x)["relu_kept"].square().sum().backward()
    for (name, a), (_, b) in zip(net.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_hooks_on_reused_layers_are_refused(tmp_path):
    net = TorchNet(residual_net(tmp_path))
    with pytest.raises(ValueError, match="'added'.*lower=False"):
        net.added.register_forward_hook(lambda *args: None)


def test_reused_sum_names_the_layer_on_other_shapes():
    with pytest.raises(ValueError, match="'s' \\(Eltwise\\).*\\[1, 2\\], \\[1, 3\\]"):
        sum_into_first(torch.zeros(1, 2), torch.zeros(1, 3), (1, 1), "s")
