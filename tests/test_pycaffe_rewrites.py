"""The pycaffe Net's full forward runs Caffe's in-place Convolution -> BatchNorm -> Scale -> ReLU chains folded,
in-place ReLUs in the blob's own storage, and takes a fresh top as the blob's storage where nothing else holds
either: every blob keeps Caffe's value (the golden tolerances) and its pycaffe semantics."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caffe_layers import Net
from caffe_layers.engine.folding import FoldedConvolution
from golden import assert_matches, vary_batchnorm
from test_golden_nets import ATOL, RTOL

# ResNet's pattern (conv, BatchNorm, Scale, ReLU in place on the conv's top; an Eltwise SUM and its in-place
# ReLU), then a chain whose BatchNorm writes a new blob (not folded: the conv's own value stays visible)
RES_NET = """
name: "res" {force}
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 10 dim: 10 }} }} }}
layer {{ name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 bias_term: false
                             weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "s1" type: "Scale" bottom: "c1" top: "c1" scale_param {{ bias_term: true }} }}
layer {{ name: "r1" type: "ReLU" bottom: "c1" top: "c1" }}
layer {{ name: "c2" type: "Convolution" bottom: "c1" top: "c2"
        convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "bn2" type: "BatchNorm" bottom: "c2" top: "c2" }}
layer {{ name: "s2" type: "Scale" bottom: "c2" top: "c2" scale_param {{ bias_term: true }} }}
layer {{ name: "sum" type: "Eltwise" bottom: "c1" bottom: "c2" top: "sum" }}
layer {{ name: "r2" type: "ReLU" bottom: "sum" top: "sum" }}
layer {{ name: "c3" type: "Convolution" bottom: "sum" top: "c3"
        convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "bn3" type: "BatchNorm" bottom: "c3" top: "b3" }}
layer {{ name: "abs" type: "AbsVal" bottom: "b3" top: "a3" }}
{loss}
"""
LOSS = """layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 dim: 4 dim: 10 dim: 10 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "c2" bottom: "label" top: "loss" }"""


def make(fold=None, force=False, loss=False):
    torch.manual_seed(0)
    net = Net(RES_NET.format(force="force_backward: true" if force else "", loss=LOSS if loss else ""), fold=fold)
    vary_batchnorm(net)
    return net


def folded_names(net):
    return [s.layer.name for _, s in net._full_indexed or () if isinstance(s.layer, FoldedConvolution)]


def feed(*nets, seed=0):
    x = np.random.RandomState(seed).randn(2, 3, 10, 10).astype(np.float32)
    for net in nets:
        net.blobs["data"].data[...] = x
        if "label" in net.blobs:
            net.blobs["label"].data[...] = 0.5


def assert_same_blobs(got, expected, what):
    for name in expected.blobs:
        assert_matches(got.blobs[name].data, expected.blobs[name].data, RTOL, ATOL, f"{what}: blob {name!r}")


def test_folded_forward_equals_unfolded_every_blob():
    folded, plain = make(), make(fold=False)
    assert folded_names(folded) == ["c1", "c2"] and not folded_names(plain)  # c3's BatchNorm writes b3
    for seed in (0, 1):
        feed(folded, plain, seed=seed)
        got, expected = folded.forward(), plain.forward()
        assert set(got) == set(expected) == {"a3"}
        assert_same_blobs(folded, plain, f"forward {seed}")
    c1 = folded.blobs["c1"].data.copy()  # the last writer's value: the ReLU's, never the convolution's
    assert (c1 >= 0).all() and (c1 == 0).any()


def test_param_edits_through_pycaffe_are_seen():
    folded, plain = make(), make(fold=False)

    def check(what):
        feed(folded, plain)
        folded.forward()
        plain.forward()
        assert_same_blobs(folded, plain, what)

    check("before")
    for net in (folded, plain):  # pycaffe's net surgery: writes through numpy, past torch's version counter
        net.params["c1"][0].data[...] *= -2
        net.params["bn1"][0].data[...] += 1
        net.params["s1"][1].data[:] = 0.25
        net.layer_dict["s2"].blobs[0].data[...] = 3
    check("edited")
    held = [net.params["bn2"][1].data for net in (folded, plain)]  # a view kept across forwards
    check("view taken")
    for view in held:
        view[...] = 4
    check("held view edited")
    for view in held:
        view *= 0.5
    check("held view edited again")


def test_backward_paths_do_not_fold():
    """Layers Caffe backpropagates through keep their own graphs: with a loss on c2, its chain (and c1's, under
    it) run unfolded and the diffs are the unfolded net's; force_backward folds nothing."""
    assert not folded_names(make(force=True))
    folded, plain = make(loss=True), make(fold=False, loss=True)
    assert folded_names(folded) == []
    feed(folded, plain)
    folded.forward()
    plain.forward()
    assert_same_blobs(folded, plain, "forward")
    folded.backward()
    plain.backward()
    for name in ("c1", "c2", "data"):
        np.testing.assert_array_equal(folded.blobs[name].diff, plain.blobs[name].diff)
    for layer in ("c1", "bn1", "s2"):
        for got, expected in zip(folded.params[layer], plain.params[layer]):
            np.testing.assert_array_equal(got.diff, expected.diff)


def test_ranged_forward_runs_each_layer():
    folded, plain = make(), make(fold=False)
    feed(folded, plain)
    for net in (folded, plain):
        net.forward(end="bn1")  # Caffe's value of c1 after its BatchNorm, before the Scale
    np.testing.assert_array_equal(folded.blobs["c1"].data, plain.blobs["c1"].data)
    assert (folded.blobs["c1"].data < 0).any()
    for net in (folded, plain):
        net.forward(start="s1", end="sum")
    np.testing.assert_array_equal(folded.blobs["sum"].data, plain.blobs["sum"].data)


class CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


PLAIN_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "abs" type: "AbsVal" bottom: "conv" top: "abs" }
"""


def test_fresh_tops_become_the_blobs_unless_held():
    torch.manual_seed(0)
    net = Net(PLAIN_NET)
    rng = np.random.RandomState(0)
    net.forward(data=rng.randn(2, 3, 8, 8))

    def forward(seed):
        x = np.random.RandomState(seed).randn(2, 3, 8, 8).astype(np.float32)
        counter = CountCopies()
        with counter:
            net.forward(data=x)
        conv = torch.nn.functional.conv2d(torch.from_numpy(x), *(p.detach() for p in net.layer_modules[1].blobs))
        return counter.copies, conv.relu().numpy()

    copies, expected = forward(1)  # (conv and abs may take their fresh tops: no view of them is alive)
    np.testing.assert_allclose(net.blobs["conv"].data, expected, rtol=1e-6)
    conv_view, abs_tensor = net.blobs["conv"].data, torch.from_numpy(net.blobs["abs"].data)
    out = net.forward()  # as pycaffe: the returned arrays are the output blobs' views
    copies, expected = forward(2)
    assert copies == 3  # the input, then into conv's and abs's storage: views of both are held
    np.testing.assert_allclose(conv_view, expected, rtol=1e-6)  # held views see the new values
    np.testing.assert_allclose(abs_tensor.numpy(), np.abs(expected), rtol=1e-6)
    np.testing.assert_allclose(out["abs"], np.abs(expected), rtol=1e-6)
    assert np.shares_memory(conv_view, net.blobs["conv"].data)


def test_module_hooks_still_run():
    torch.manual_seed(0)
    net = Net(PLAIN_NET)
    seen = []
    net.layer_modules[2].register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    net.forward(data=np.ones((2, 3, 8, 8)))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0].numpy(), net.blobs["conv"].data)


@pytest.mark.parametrize("fold", [True, False])
def test_batch_statistics_never_fold(fold):
    torch.manual_seed(0)
    net = Net(RES_NET.format(force="", loss="").replace(" batch_norm_param { use_global_stats: true }", ""),
              phase="train", fold=fold)
    assert folded_names(net) == []
