"""Net-level fusion of the segaware convolution chain (caffe_layers/engine/fusion.py)."""
import numpy as np
import pytest
import torch

from caffe_layers import native
from caffe_layers.engine.fusion import FusedSegawareConv
from caffe_layers.engine.net import Net
from tests.golden import assert_matches, load_case

INTERMEDIATES = ["wdist", "adist", "mask", "maskC", "col", "hit"]


def _net(prototxt, **kwargs):
    return Net(prototxt, **kwargs)


def _fused_layers(net):
    return [s.layer for s in (net.fused_steps or []) if isinstance(s.layer, FusedSegawareConv)]


def _run_golden(net, case):
    for key, value in case.items():
        if key.startswith("param:"):
            _, layer, i = key.split(":")
            net.params[layer][int(i)].data[...] = value
    net.forward(**{k[3:]: v for k, v in case.items() if k.startswith("in:")})
    net.blobs["y"].diff[...] = case["topdiff:y"]
    net.backward()


def test_golden_chain_is_fused_and_matches_caffe():
    case = load_case("segaware_conv_chain")
    net = _net(str(case["prototxt"]))
    assert len(_fused_layers(net)) == 1
    _run_golden(net, case)
    assert_matches(net.blobs["y"].data, case["out:y"], what="y")
    for key in ("grad:x", "grad:emb"):
        assert_matches(net.blobs[key[5:]].diff, case[key], what=key)
    for layer, i in (("lambda", 0), ("conv", 0), ("conv", 1)):
        assert_matches(net.params[layer][i].diff, case[f"pgrad:{layer}:{i}"], what=f"pgrad {layer} {i}")


def _chain_net(extra="", n=2, c=3, h=9, w=8, k=3, pad=1, dil=1, norm="L1"):
    return f"""name: "chain" force_backward: true
layer {{ name: "in" type: "Input" top: "x" top: "emb" input_param {{ shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }}
  shape {{ dim: {n} dim: 4 dim: {h} dim: {w} }} }} }}
layer {{ name: "dist" type: "Im2dist" bottom: "emb" top: "dist" convolution_param {{ kernel_size: {k} pad: {pad} dilation: {dil} }}
  im2dist_param {{ norm: {norm} }} }}
layer {{ name: "lambda" type: "Scale" bottom: "dist" top: "wdist" scale_param {{ num_axes: 0 filler {{ type: "constant" value: 0.3 }} bias_term: false }} }}
layer {{ name: "abs" type: "AbsVal" bottom: "wdist" top: "adist" }}
layer {{ name: "exp" type: "Exp" bottom: "adist" top: "mask" exp_param {{ scale: -1 }} }}
layer {{ name: "tile" type: "Tile" bottom: "mask" top: "maskC" tile_param {{ axis: 1 tiles: {c} }} }}
layer {{ name: "im2col" type: "Im2col" bottom: "x" top: "col" convolution_param {{ kernel_size: {k} pad: {pad} dilation: {dil} }} }}
layer {{ name: "hit" type: "Eltwise" bottom: "col" bottom: "maskC" top: "hit" eltwise_param {{ operation: PROD }} }}
layer {{ name: "conv" type: "Convolution" bottom: "hit" top: "y" convolution_param {{ num_output: 5 kernel_size: {k} pad: {pad}
  bottom_is_im2col: true weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.3 }} }} }}
{extra}"""


def _forward_backward(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = net.blob_shapes
    x = torch.randn(shapes["x"], generator=g, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(shapes["emb"], generator=g, dtype=torch.float64, requires_grad=True)
    out = net(x=x, emb=emb)
    loss = sum((v * torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=v.dtype)).sum()
               for v in out.values())
    params = [p for p in net.parameters()]
    grads = torch.autograd.grad(loss, [x, emb] + params)
    return out, grads


@pytest.mark.parametrize("geometry", [dict(), dict(k=5, pad=4, dil=2, norm="L2"), dict(n=1, c=2, h=7, w=11, k=3, pad=0)])
@pytest.mark.parametrize("use_native", [True, False])
def test_fused_equals_chain(tmp_path, geometry, use_native):
    path = tmp_path / "net.prototxt"
    path.write_text(_chain_net(**geometry))
    fused, plain = _net(str(path)), _net(str(path), fuse=False)
    assert len(_fused_layers(fused)) == 1 and plain.fused_steps is None
    fused.double()
    plain.load_state_dict(fused.state_dict())
    plain.double()
    ctx = native.disabled() if not use_native else torch.enable_grad()
    with ctx:
        (fo, fg), (po, pg) = _forward_backward(fused), _forward_backward(plain)
    assert list(fo) == list(po) == ["y"]
    torch.testing.assert_close(fo["y"], po["y"], rtol=1e-10, atol=1e-10)
    for a, b in zip(fg, pg):  # grads to x, emb, lambda, conv weight and bias
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra,keep,fused", [
    ("", (), True),
    ("", ("maskC",), False),                                                 # requested blob
    ("", ("col",), False),
    ("", ("mask",), True),                                                   # the K-channel mask is made anyway
    ('layer { name: "s" type: "Silence" bottom: "col" }', (), False),        # read by another layer
    ('layer { name: "r" type: "ReLU" bottom: "hit" top: "r" }', (), False),  # read by another layer
    ('layer { name: "p" type: "Power" bottom: "dist" top: "p" }', (), True),  # dist is an input of the fused step
])
def test_fusion_only_when_no_intermediate_is_needed(tmp_path, extra, keep, fused):
    path = tmp_path / "net.prototxt"
    path.write_text(_chain_net(extra))
    assert bool(_fused_layers(Net(str(path), keep_blobs=keep))) == fused


def test_shared_mask_is_fused_and_its_other_reader_sees_it(tmp_path):
    """One K-channel mask feeding two convolutions (as in the segaware test configs) and read elsewhere:
    both chains fuse, and every output equals the unfused net's."""
    text = _chain_net() + """layer { name: "tile2" type: "Tile" bottom: "mask" top: "maskC2" tile_param { axis: 1 tiles: 3 } }
layer { name: "im2col2" type: "Im2col" bottom: "x" top: "col2" convolution_param { kernel_size: 3 pad: 1 } }
layer { name: "hit2" type: "Eltwise" bottom: "maskC2" bottom: "col2" top: "hit2" eltwise_param { operation: PROD } }
layer { name: "conv2" type: "Convolution" bottom: "hit2" top: "y2" convolution_param { num_output: 2 kernel_size: 3
  pad: 1 bottom_is_im2col: true weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "mask_sum" type: "Reduction" bottom: "mask" top: "mask_sum" }
"""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    fused, plain = _net(str(path)), _net(str(path), fuse=False)
    assert len(_fused_layers(fused)) == 2
    fused.double()
    plain.load_state_dict(fused.state_dict())
    plain.double()
    (fo, fg), (po, pg) = _forward_backward(fused), _forward_backward(plain)
    assert sorted(fo) == sorted(po) == ["mask_sum", "y", "y2"]
    for name in fo:
        torch.testing.assert_close(fo[name], po[name], rtol=1e-10, atol=1e-10)
    for a, b in zip(fg, pg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mask_rewritten_in_place_after_the_tile_is_not_fused(tmp_path):
    """The fused step reads the mask where the Convolution was: a later in-place write would change it."""
    text = _chain_net().replace('layer { name: "hit"',
                                'layer { name: "late" type: "Power" bottom: "mask" top: "mask" power_param { scale: 2 } }\n'
                                'layer { name: "hit"')
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    assert not _fused_layers(Net(str(path)))


def test_partial_runs_are_unfused(tmp_path):
    """Layer-by-layer runs (start/end) see every intermediate blob."""
    path = tmp_path / "net.prototxt"
    path.write_text(_chain_net())
    net = Net(str(path))
    x = np.random.default_rng(0).standard_normal(net.blob_shapes["x"]).astype(np.float32)
    emb = np.random.default_rng(1).standard_normal(net.blob_shapes["emb"]).astype(np.float32)
    full = net.forward(x=x, emb=emb)["y"].copy()
    values = {}
    for i in range(len(net.steps)):
        values = net.run(values, i, i + 1)
    np.testing.assert_allclose(values["y"].detach().numpy(), full, rtol=1e-5, atol=1e-5)
    assert set(INTERMEDIATES) <= set(values)


def test_deploy_configs_fuse(tmp_path):
    """The original vgg deploy config: all 14 seg-aware convolutions are fused (Im2col, Tile, Eltwise fold in)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "shared/reference/segaware/vgg/deploy.prototxt").read_text()
    text = re.sub(r"dim: (321|513)", "dim: 33", text).replace("height: 321", "height: 33").replace("width: 321", "width: 33")
    path = tmp_path / "deploy.prototxt"
    path.write_text(text)
    net = Net(str(path))
    assert len(_fused_layers(net)) == text.count('type: "Im2col"') == 14
    assert len(net.fused_steps) == len(net.steps) - 14 * 3


def test_fused_away_blob_computed_on_access(tmp_path):
    """pycaffe reads of a blob a fused forward skipped compute it from the stored x and mask: the same
    values as the unfused net's, and a view taken before the next forward is updated by it."""
    path = tmp_path / "net.prototxt"
    path.write_text(_chain_net())
    net, plain = Net(str(path)), Net(str(path), fuse=False)
    plain.load_state_dict(net.state_dict())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(net.blob_shapes["x"]), "emb": rng.standard_normal(net.blob_shapes["emb"])}
             for _ in range(2)]
    net.forward(**feeds[0])
    hit = net.blobs["hit"].data
    for feed in feeds:
        net.forward(**feed)
        plain.forward(**feed)
        for blob in ("hit", "y"):
            np.testing.assert_allclose(net.blobs[blob].data, plain.blobs[blob].data, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(hit, plain.blobs["hit"].data)  # the old view is the blob
