"""A Concat's Interp bottoms written into its top (caffe_layers/engine/concat.py) against the plain steps."""
import pytest
import torch

from caffe_layers.engine.concat import ConcatOfInterps, concat_interps
from caffe_layers.engine.graph import TorchNet
from tests.golden import REFERENCE


def _net_text(axis=1, extra="", bottoms=("a_up", "y", "z_up", "w_same")):
    """x (2x3x5x6) zoomed to 9x11, z (2x2x4x4) resized to 9x11, w (2x1x9x11) "resized" to its own size (the
    original's plain copy), w2 cropped by pad_beg/pad_end -1 and resized, y as it is."""
    height = {1: 9, 2: 4, 3: 9}[axis]
    width = {1: 11, 2: 11, 3: 5}[axis]
    return f"""name: "concat_interps"
layer {{ name: "in" type: "Input" top: "x" top: "y" top: "z" top: "w" top: "w2"
  input_param {{ shape {{ dim: 2 dim: 3 dim: 5 dim: 6 }} shape {{ dim: 2 dim: 3 dim: {height} dim: {width} }}
    shape {{ dim: 2 dim: 3 dim: 4 dim: 4 }} shape {{ dim: 2 dim: 3 dim: 9 dim: 11 }}
    shape {{ dim: 2 dim: 3 dim: 7 dim: 8 }} }} }}
layer {{ name: "up_a" type: "Interp" bottom: "x" top: "a_up" interp_param {{ zoom_factor: 2 }} }}
layer {{ name: "up_z" type: "Interp" bottom: "z" top: "z_up" interp_param {{ height: 9 width: 11 }} }}
layer {{ name: "same_w" type: "Interp" bottom: "w" top: "w_same" interp_param {{ height: 9 width: 11 }} }}
layer {{ name: "crop_w2" type: "Interp" bottom: "w2" top: "w2_up"
  interp_param {{ height: 9 width: 11 pad_beg: -1 pad_end: -1 }} }}
{extra}
layer {{ name: "cat" type: "Concat" {" ".join(f'bottom: "{b}"' for b in bottoms)} top: "cat"
  concat_param {{ axis: {axis} }} }}
layer {{ name: "scale" type: "Power" bottom: "cat" top: "out" power_param {{ scale: 2 }} }}
"""


def _inputs(net, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(net.blob_shapes[name], generator=g, dtype=dtype).requires_grad_(requires_grad)
            for name in net.inputs}


def _concat_steps(net):
    return [n for n in net.graph.nodes if n.target is concat_interps]


def _pair(tmp_path, text, **kwargs):
    """The net with the rewrite, and the same net with every Interp top kept (the plain steps)."""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    tops = ["a_up", "z_up", "w_same", "w2_up"]
    return TorchNet(str(path), **kwargs), TorchNet(str(path), keep_blobs=tops, **kwargs)


@pytest.mark.parametrize("axis", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_same_numbers_as_the_plain_steps(tmp_path, axis, dtype, mode):
    bottoms = ("a_up", "y", "z_up", "w_same", "w2_up") if axis == 1 else ("a_up", "y")
    fused, plain = _pair(tmp_path, _net_text(axis, bottoms=bottoms))
    assert len(_concat_steps(fused)) == 1 and not _concat_steps(plain)
    fused, plain = fused.to(dtype), plain.to(dtype)
    inputs = _inputs(fused, dtype)
    with getattr(torch, mode)():
        got, want = fused(**inputs)["out"], plain(**inputs)["out"]
    assert got.shape == want.shape and torch.equal(got, want)


def test_gradients_as_the_plain_steps(tmp_path):
    fused, plain = _pair(tmp_path, _net_text(bottoms=("a_up", "y", "z_up", "w_same", "w2_up")))
    grads = []
    for net in (fused, plain):
        inputs = _inputs(net, torch.float64, requires_grad=True)
        out = net(**inputs)["out"]
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads.append(torch.autograd.grad((out * weights).sum(), list(inputs.values()), allow_unused=True))
    for got, want in zip(*grads):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("extra, keep, rewritten", [
    ("", (), {"up_a", "up_z", "same_w"}),
    ("", ("z_up",), {"up_a", "same_w"}),  # a kept blob keeps its own value
    ('layer { name: "other" type: "Power" bottom: "a_up" top: "other" }', (), {"up_z", "same_w"}),  # another reader
    # the Interp's bottom rewritten in place after it and before the Concat
    ('layer { name: "relu_z" type: "ReLU" bottom: "z" top: "z" }', (), {"up_a", "same_w"}),
    # the Interp's top rewritten in place before the Concat
    ('layer { name: "relu_up" type: "ReLU" bottom: "a_up" top: "a_up" }', (), {"up_z", "same_w"}),
])
def test_only_interps_the_concat_alone_reads(tmp_path, extra, keep, rewritten):
    path = tmp_path / "net.prototxt"
    path.write_text(_net_text(extra=extra))
    net = TorchNet(str(path), keep_blobs=keep)
    steps = [n.args[1] for n in _concat_steps(net)]
    assert len(steps) == 1
    assert {n.target for n in steps[0] if n is not None} == rewritten
    plain = TorchNet(str(path), keep_blobs=("a_up", "z_up", "w_same") + tuple(keep), lower=False)
    inputs = _inputs(net)
    with torch.inference_mode():
        got, want = net(**inputs), plain(**inputs)
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_hooks_refused_and_lower_false_keeps_the_layers(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(_net_text())
    net = TorchNet(str(path))
    with pytest.raises(ValueError, match="'up_a' runs as torch functions"):
        net.up_a.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="'cat' runs as torch functions"):
        net.cat.register_forward_hook(lambda *args: None)
    unlowered = TorchNet(str(path), lower=False)
    assert not _concat_steps(unlowered)
    seen = []
    unlowered.up_a.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        unlowered(**_inputs(unlowered))
    assert seen == [torch.Size([2, 3, 9, 11])]


def test_other_input_sizes_and_bad_sizes(tmp_path):
    fused, plain = _pair(tmp_path, _net_text(bottoms=("a_up", "y")))
    inputs = {"x": torch.randn(1, 3, 4, 6), "y": torch.randn(1, 3, 7, 11), "z": torch.randn(1, 3, 2, 5),
              "w": torch.randn(1, 3, 9, 11), "w2": torch.randn(1, 3, 7, 8)}
    with torch.inference_mode():
        assert torch.equal(fused(**inputs)["out"], plain(**inputs)["out"])
        inputs["y"] = torch.randn(1, 3, 8, 11)
        with pytest.raises(ValueError, match="layer 'cat': bottom 1 has shape"):
            fused(**inputs)


def test_deploy_concat_runs_its_interps(tmp_path):
    net = TorchNet(str(REFERENCE / "segaware" / "vgg" / "deploy.prototxt"))
    (node,) = _concat_steps(net)
    assert [None if n is None else n.target for n in node.args[1]] == [None, None, "emb22_resized", "emb33_resized"]
    assert repr(ConcatOfInterps(net.fused, [None, net.emb22_resized])) == "ConcatOfInterps(emb22_resized -> fused)"


def test_pickled_and_copied_nets_keep_the_step(tmp_path):
    import copy
    import pickle

    path = tmp_path / "net.prototxt"
    path.write_text(_net_text())
    net = TorchNet(str(path))
    inputs = _inputs(net)
    with torch.inference_mode():
        want = net(**inputs)["out"]
        for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
            assert len(_concat_steps(clone)) == 1
            assert torch.equal(clone(**inputs)["out"], want)
