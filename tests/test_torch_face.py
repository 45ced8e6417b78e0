"""The torch face (TorchNet, an fx.GraphModule over the plan): the original's numbers, module behaviour,
torch.export and torch.compile."""
import pytest
import torch
from torch import nn

from caffe_layers import native
from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.reference import fill_net_hash
from golden import assert_matches, load_case, vary_batchnorm
from test_golden_nets import RTOL, compare, load_params

MODELS = "models/segaware"


@pytest.mark.parametrize("name", ["embs_deploy_97", "vgg_deploy_97"])
@pytest.mark.parametrize("fuse", [True, False])
def test_golden_outputs(name, fuse):
    case = load_case(name, "nets")
    net = TorchNet(str(case["prototxt"]), fuse=fuse)
    load_params(net, case)
    inputs = {k[3:]: torch.as_tensor(v) for k, v in case.items() if k.startswith("in:")}
    with torch.no_grad():
        tops = net(**inputs)
    last = {str(k).split(":", 2)[2]: str(k) for k in case["order"]}
    for blob in (b for b in net.outputs if b not in net.inputs):
        compare(f"{name} {blob!r}", tops[blob], case, last[blob])
    for key in case:
        if key.startswith("out:") and key[4:] in tops:
            assert_matches(tops[key[4:]].numpy(), case[key], RTOL, 1e-5, f"{name} {key}")


NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc.1" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_module_citizenship():
    torch.manual_seed(0)
    net = TorchNet(NET)
    assert isinstance(net, torch.fx.GraphModule)
    assert list(net.state_dict()) == ["conv1.0", "conv1.1", "fc.1.0", "fc.1.1"]  # "<layer>.<i>", dots kept
    parent = nn.Sequential(net)
    assert list(parent.state_dict()) == ["0.conv1.0", "0.conv1.1", "0.fc.1.0", "0.fc.1.1"]
    other = TorchNet(NET)
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(other(data=x)["prob"], net(data=x)["prob"])
    torch.testing.assert_close(net(x)["prob"], net(data=x)["prob"])
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({"conv1.0": net.state_dict()["conv1.0"]})


def test_no_filler_draws_with_weights(tmp_path):
    torch.manual_seed(0)
    net = TorchNet(NET)
    path = tmp_path / "w.caffemodel"
    net.save(path)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    loaded = TorchNet(NET, weights=path)
    assert torch.equal(torch.random.get_rng_state(), before)  # the fillers drew nothing
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_multiple_sources_refused():
    bad = NET.replace('top: "pool1" pooling_param', 'top: "conv1" pooling_param')
    bad = bad.replace('bottom: "pool1" top: "fc"', 'bottom: "conv1" top: "fc"')
    TorchNet(bad)  # in place (it reads conv1): allowed
    twice = NET + 'layer { name: "again" type: "Softmax" bottom: "fc" top: "prob" }'
    with pytest.raises(ValueError, match="'again'.*'prob' is produced by multiple sources"):
        TorchNet(twice)


def test_blobs_freed_after_last_reader():
    assert "fc_1 = None" in TorchNet(NET).code  # fx frees each value after its last use
    code = TorchNet(NET, lower=False).code  # (lowered, conv1 to pool1 are one chain: engine/tiny.py)
    assert "conv1 = None" in code or "relu1 = None" in code


def test_export_and_compile():
    torch.manual_seed(0)
    net = TorchNet(NET)
    x = torch.randn(2, 3, 12, 12)
    expected = net(data=x)["prob"]
    exported = torch.export.export(net, (), {"data": x})
    torch.testing.assert_close(exported.module()(data=x)["prob"], expected)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(data=x)["prob"], expected)


DEPLOY = [f"{MODELS}/embs/deploy.prototxt", f"{MODELS}/vgg/deploy.prototxt", f"{MODELS}/res/deploy.prototxt",
          f"{MODELS}/flownet/flownet_segaware_deploy.prototxt", "models/sss/sss_deploy.prototxt"]


@pytest.mark.parametrize("config", DEPLOY)
def test_export_deploy(config):
    net = TorchNet(config, fuse=False)
    fill_net_hash(net)  # deploy configs have no fillers: zero weights would make BatchNorm divide 0 by 0
    inputs = {name: torch.randn(net.blob_shapes[name]) for name in net.inputs}
    with torch.no_grad(), native.disabled():  # the pure-PyTorch references: standard ops only
        expected = net(**inputs)
        exported = torch.export.export(net, (), inputs)
        got = exported.module()(**inputs)
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value)


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" }
layer { name: "s1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false group: 2 weight_filler { type: "gaussian" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "c2" top: "b2" }
layer { name: "c3" type: "Convolution" bottom: "c1" top: "c3"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
layer { name: "bn3" type: "BatchNorm" bottom: "c3" top: "b3" }
layer { name: "other" type: "AbsVal" bottom: "c3" top: "a3" }
"""


def _folded_calls(net):
    return [n for n in net.graph.nodes if n.op == "call_function" and n.target.__name__ == "folded_convolution"]


def _folded_and_plain():
    torch.manual_seed(0)
    folded, plain = TorchNet(BN_NET), TorchNet(BN_NET, fold=False)
    vary_batchnorm(folded)
    plain.load_state_dict(folded.state_dict())
    return folded, plain


def test_batchnorm_folding_equals_unfolded():
    folded, plain = _folded_and_plain()
    # c1+bn1+s1+r1 in place and c2+bn2 (no Scale, no conv bias, groups) fold; c3 does not: AbsVal reads c3 too
    assert len(_folded_calls(folded)) == 2 and not _folded_calls(plain)
    assert [n.args[-1] for n in _folded_calls(folded)] == [True, False]  # the ReLU after s1 runs in the fold
    assert "r1" not in {n.target for n in folded.graph.nodes if n.op == "call_module"}
    x = torch.randn(2, 3, 9, 9)
    got, expected = folded(data=x), plain(data=x)
    assert set(got) == set(expected) == {"b2", "b3", "a3"}
    for blob in expected:
        torch.testing.assert_close(got[blob], expected[blob], rtol=1e-5, atol=1e-5)
    assert not _folded_calls(TorchNet(BN_NET, phase="train"))  # batch statistics in TRAIN: nothing folds


def test_folded_weights_kept_between_inference_calls_follow_every_change(tmp_path):
    from caffe_layers.engine.folding import clear_fold_cache

    folded, plain = _folded_and_plain()
    x = torch.randn(2, 3, 9, 9)

    def check(inference):  # c1 (3x3) runs on oneDNN with kept weights when inferring float32; also at another size
        for data in (x, x[:1, :, 1:, 2:]):
            with torch.inference_mode() if inference else torch.enable_grad():
                got, expected = folded(data=data), plain(data=data)
            for blob in expected:
                assert got[blob].is_contiguous()
                torch.testing.assert_close(got[blob], expected[blob], rtol=1e-5, atol=1e-5)

    check(True)
    check(True)  # the kept folded weights
    for net in (folded, plain):  # in-place writes through torch, on each kind of blob
        with torch.no_grad():
            net.c1.blobs[0].mul_(-2)
            net.bn1.blobs[1].mul_(3)
            net.s1.blobs[1].add_(1)
            net.bn2.blobs[2].fill_(0.5)
    check(True)
    state = {k: torch.randn_like(v) for k, v in plain.state_dict().items() if not k.startswith("bn")}
    folded.load_state_dict(state, strict=False)
    plain.load_state_dict(state, strict=False)
    check(True)
    with torch.no_grad():  # a .caffemodel read straight into the blobs' memory (numpy) is seen too
        plain.c1.blobs[0].mul_(0.5)
        plain.bn1.blobs[0].add_(1)
    plain.save(str(tmp_path / "changed.caffemodel"))
    folded.copy_from(str(tmp_path / "changed.caffemodel"))
    check(True)
    folded.double()
    plain.double()
    x = x.double()
    check(True)
    check(False)  # under autograd the weights are folded in the graph
    for net in (folded, plain):  # a write that bypasses the version counter: seen after clear_fold_cache
        net.c2.blobs[0].data.mul_(0.5)
    clear_fold_cache()
    check(True)


def test_compile_fullgraph_segaware_deploy():
    net = TorchNet(f"{MODELS}/embs/deploy.prototxt")
    inputs = {name: torch.randn(net.blob_shapes[name]) for name in net.inputs}
    with torch.no_grad(), native.disabled():
        expected = net(**inputs)
        got = torch.compile(net, fullgraph=True, backend="eager")(**inputs)
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value)


def test_layer_named_like_a_torchnet_method():
    """A layer called "loss" or "save" (common names) runs as the layer, not as TorchNet's method of that name,
    and keeps its name in the state_dict."""
    net = TorchNet("""
layer { name: "d" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "save" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss" }""")
    out = net(x=torch.rand(2, 3), y=torch.zeros(2))
    torch.testing.assert_close(out["loss"], torch.tensor(3.0).log())  # zero weights: uniform over 3 classes
    assert set(net.state_dict()) == {"save.0", "save.1"}
    assert callable(net.save) and net.loss(out) is not None
