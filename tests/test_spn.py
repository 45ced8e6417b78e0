"""Spatial propagation networks: GateRecurrent2dnoind, Divide, Resize, the SPN configs and data layer."""
import ast
import contextlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from golden import REFERENCE, assert_same_net, gradcheck_layer, make_layer  # noqa: E402

from caffe_layers import Net  # noqa: E402

from caffe_layers import native
from caffe_layers.native import gate_recurrent  # noqa: E402  (the references inside native.disabled())
from caffe_layers.ops.spn import gate_recurrent_loop, propagation_matrix  # noqa: E402
from caffe_layers.formats.proto import pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPN_MODELS = ROOT / "models" / "spn"
sys.path.insert(0, str(SPN_MODELS))
import make_spn  # noqa: E402
import spn_data  # noqa: E402

DIRS = [(True, False), (True, True), (False, False), (False, True)]
DIR_IDS = ["left-right", "right-left", "top-bottom", "bottom-top"]


def _inputs(shape=(2, 3, 5, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    gates = [0.5 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(3)]
    return x, gates


def _gr_text(horizontal, reverse):
    return (f'type: "GateRecurrent2dnoind" gaterecurrent2dnoind_param {{ horizontal: {str(horizontal).lower()} '
            f'reverse: {str(reverse).lower()} }}')


# ---- GateRecurrent2dnoind ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("direction", DIRS, ids=DIR_IDS)
def test_scan_matches_loop_reference(name, direction):
    """The pure-PyTorch scan and the native kernels (which gate_recurrent uses when built) against the loop."""
    x, gates = _inputs()
    x.requires_grad_(True)
    for g in gates:
        g.requires_grad_(True)
    with native.disabled() if name == "torch" else contextlib.nullcontext():
        h = gate_recurrent(x, *gates, *direction)
        dtop = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
        h.backward(dtop)
    ref = gate_recurrent_loop(x.detach().numpy(), *[g.detach().numpy() for g in gates], *direction,
                              dtop=dtop.numpy())
    ours = [h.detach(), x.grad] + [g.grad for g in gates]
    for what, a, b in zip(["h", "dx", "dg1", "dg2", "dg3"], ours, ref):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12, err_msg=f"{name} {direction} {what}")


def test_scan_quirks_pinned():
    """First column is x; gates of missing neighbours get no gradient; a gate read at the pixel."""
    x, gates = _inputs((1, 1, 3, 4))
    for g in gates:
        g.requires_grad_(True)
    h = gate_recurrent(x, *gates, True, False)
    torch.testing.assert_close(h[..., 0], x[..., 0], rtol=0, atol=0)
    h.sum().backward()
    assert torch.all(gates[0].grad[..., 0, :] == 0) and torch.all(gates[2].grad[..., -1, :] == 0)
    assert all(torch.all(g.grad[..., 0] == 0) for g in gates)
    # one interior pixel by hand
    y, z = 1, 2
    g1, g2, g3 = (g.detach()[0, 0, y, z] for g in gates)
    hp = h.detach()[0, 0, :, z - 1]
    expect = (1 - g1 - g2 - g3) * x[0, 0, y, z] + g1 * hp[y - 1] + g2 * hp[y] + g3 * hp[y + 1]
    torch.testing.assert_close(h[0, 0, y, z].detach(), expect)


@pytest.mark.parametrize("direction", DIRS, ids=DIR_IDS)
def test_layer_float32_and_one_way(direction):
    x, gates = _inputs((1, 2, 4, 5), seed=3)
    layer = make_layer(_gr_text(*direction), [x.shape] * 4, dtype=torch.float32)
    out = layer(x.float(), *[g.float() for g in gates])
    ref = gate_recurrent_loop(x.numpy(), *[g.numpy() for g in gates], *direction)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    # one-way connection (paper eq. 9): 2 bottoms, the straight neighbour only
    one = make_layer(_gr_text(*direction), [x.shape] * 2)
    assert one.connection == "one"
    zero = np.zeros(x.shape)
    ref1 = gate_recurrent_loop(x.numpy(), zero, gates[1].numpy(), zero, *direction)
    np.testing.assert_allclose(one(x, gates[1]).numpy(), ref1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", DIRS, ids=DIR_IDS)
def test_gaterecurrent_gradcheck(direction):
    gradcheck_layer(_gr_text(*direction), [(1, 2, 4, 3)] * 4)


def test_gaterecurrent_one_way_gradcheck():
    gradcheck_layer(_gr_text(False, True), [(1, 2, 3, 4)] * 2)


def test_gaterecurrent_connection_option():
    x, gates = _inputs((1, 2, 3, 4), seed=7)
    text = 'type: "GateRecurrent2dnoind" name: "L" gaterecurrent2dnoind_param { horizontal: false connection: %s }'
    one = make_layer(text % "ONE", [x.shape] * 2)
    assert one.connection == "one"
    zero = np.zeros(x.shape)
    ref = gate_recurrent_loop(x.numpy(), zero, gates[0].numpy(), zero, False, False)
    np.testing.assert_allclose(one(x, gates[0]).numpy(), ref, rtol=1e-12, atol=1e-12)
    three = make_layer(text % "THREE", [x.shape] * 4)
    assert three.connection == "three"
    ref = gate_recurrent_loop(x.numpy(), *[g.numpy() for g in gates], False, False)
    np.testing.assert_allclose(three(x, *gates).numpy(), ref, rtol=1e-12, atol=1e-12)
    # an explicit connection must match the bottoms
    with pytest.raises(ValueError, match="'L'.*three-way connection takes 4 bottoms"):
        make_layer(text % "THREE", [x.shape] * 2)
    with pytest.raises(ValueError, match="'L'.*one-way connection takes 2 bottoms"):
        make_layer(text % "ONE", [x.shape] * 4)


def test_gaterecurrent_bad_bottoms():
    with pytest.raises(ValueError, match="'L'.*4 bottoms"):
        make_layer(_gr_text(True, False) + ' name: "L"', [(1, 2, 3, 3)] * 3)
    with pytest.raises(ValueError, match="one \\(N, C, H, W\\) shape"):
        make_layer(_gr_text(True, False), [(1, 2, 3, 3)] * 3 + [(1, 2, 3, 4)])


@pytest.mark.parametrize("direction", DIRS, ids=DIR_IDS)
def test_dense_propagation_matrix(direction):
    """Paper eq. 3: vec(H) = G vec(X); with positive gates normalised to sum 1, G is row-stochastic."""
    x, gates = _inputs((1, 1, 4, 5), seed=5)
    h = gate_recurrent(x, *gates, *direction)
    G = propagation_matrix(*[g[0, 0].numpy() for g in gates], *direction)
    np.testing.assert_allclose(G @ x[0, 0].numpy().ravel(), h[0, 0].numpy().ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(G.sum(1), 1, atol=1e-12)  # rows sum to 1 for any gates
    pos = [g.abs() for g in gates]
    total = sum(pos)
    G = propagation_matrix(*[(g / total)[0, 0].numpy() for g in pos], *direction)
    assert G.min() >= -1e-12  # 1 - sum g rounds to about -1e-16 at interior pixels
    np.testing.assert_allclose(G.sum(1), 1, atol=1e-12)  # Theorem 1: stable (||G||_inf = 1)
    assert np.abs(G).sum(1).max() <= 1 + 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", DIRS, ids=DIR_IDS)
def test_scan_cuda_matches_cpu(direction):
    x, gates = _inputs((2, 3, 6, 5), dtype=torch.float32)
    ins = [t.requires_grad_(True) for t in [x] + gates]
    h = gate_recurrent(*ins, *direction)
    h.sum().backward()
    cuda = [t.detach().cuda().requires_grad_(True) for t in ins]
    hc = gate_recurrent(*cuda, *direction)
    hc.sum().backward()
    torch.testing.assert_close(hc.cpu(), h, rtol=1e-5, atol=1e-5)
    for a, b in zip(cuda, ins):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-5)


# ---- Divide ------------------------------------------------------------------------------------
def test_divide_cpu_clamp_and_backward():
    layer = make_layer('type: "Divide"', [(5,)], dtype=torch.float32)
    x = torch.tensor([0.0, 1e-7, -2.0, 4.0, 0.5], requires_grad=True)
    y = layer(x)
    exp_clamped = np.float32(1e-4)
    np.testing.assert_array_equal(y.detach().numpy(),
                                  np.float32(1) / np.array([exp_clamped, 1e-7, -2, 4, 0.5], np.float32))
    assert x.detach()[0] == exp_clamped  # the original writes the clamped value into the bottom
    y.backward(torch.ones(5))
    xc = np.array([exp_clamped, 1e-7, -2, 4, 0.5], np.float32)
    np.testing.assert_array_equal(x.grad.numpy(), np.float32(-1) / (xc * xc))  # also where clamped


def test_divide_gpu_rule_and_options():
    text = 'type: "Divide" divide_param { clamp: GPU modify_bottom: false true_gradient: true }'
    layer = make_layer(text, [(4,)], dtype=torch.float32)
    x = torch.tensor([0.0, -5e-7, 2e-6, -3.0], requires_grad=True)
    y = layer(x)
    np.testing.assert_array_equal(y.detach().numpy(), np.float32(1) / np.array([1e-6, 1e-6, 2e-6, -3], np.float32))
    assert x.detach()[0] == 0  # bottom untouched with modify_bottom=False
    y.sum().backward()
    assert x.grad[0] == 0 and x.grad[1] == 0 and x.grad[3] == pytest.approx(-1 / 9)


def _divide(options, x):
    layer = make_layer(f'type: "Divide" divide_param {{ {options} }}', [x.shape], dtype=torch.float32)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    return layer, x, y.detach()


def test_divide_clamp_option():
    x = torch.tensor([0.0, -5e-7, 3e-7, 2.0])
    for options in ("", "clamp: DEVICE", "clamp: CPU"):  # on CPU tensors: Forward_cpu's rule
        layer, _, y = _divide(options, x)
        assert layer.clamp in ("device", "cpu")
        np.testing.assert_array_equal(y.numpy(), np.float32(1) / np.array([1e-4, -5e-7, 3e-7, 2], np.float32))
    layer, _, y = _divide("clamp: GPU", x)  # the CUDA kernel's rule, forced on CPU
    assert layer.clamp == "gpu"
    np.testing.assert_array_equal(y.numpy(), np.float32(1) / np.array([1e-6, 1e-6, 1e-6, 2], np.float32))


def test_divide_modify_bottom_option():
    x = torch.tensor([0.0, 2.0])
    _, bottom, _ = _divide("modify_bottom: true", x)
    assert bottom.detach().tolist() == [np.float32(1e-4), 2.0]  # as the original
    _, bottom, y = _divide("modify_bottom: false", x)
    assert bottom.detach().tolist() == [0.0, 2.0] and y.tolist() == [np.float32(1e4), 0.5]


def test_divide_true_gradient_option():
    x = torch.tensor([0.0, 2.0])
    _, quirk, _ = _divide("", x)
    eps = np.float32(1e-4)
    assert quirk.grad.tolist() == [np.float32(-1) / (eps * eps), -0.25]  # also at the clamped entry
    _, fixed, _ = _divide("true_gradient: true", x)
    assert fixed.grad.tolist() == [0.0, -0.25]


def test_divide_gradcheck():
    x = torch.rand(2, 3, 4, dtype=torch.float64) + 0.5
    gradcheck_layer('type: "Divide"', [(2, 3, 4)], inputs=[x * torch.sign(torch.randn(2, 3, 4, dtype=torch.float64))])


# ---- Resize ------------------------------------------------------------------------------------
def _resize_loop(x, out_h, out_w):
    """The densebox BiLinearResizeMat_cpu, pixel by pixel (float32)."""
    N, C, H, W = x.shape
    out = np.zeros((N, C, out_h, out_w), np.float32)
    sh, sw = np.float32(H) / np.float32(out_h), np.float32(W) / np.float32(out_w)
    for i in range(out_h):
        fh = np.float32(i) * sh
        y = int(np.floor(fh))
        fh = np.float32(fh - y)
        for j in range(out_w):
            fw = np.float32(j) * sw
            z = int(np.floor(fw))
            fw = np.float32(fw - z)
            v = (abs(1 - fh) * abs(1 - fw)) * x[..., y, z]
            if z + 1 < W:
                v = v + (abs(1 - fh) * fw) * x[..., y, z + 1]
            if y + 1 < H:
                v = v + (fh * abs(1 - fw)) * x[..., y + 1, z]
            if z + 1 < W and y + 1 < H:
                v = v + (fh * fw) * x[..., y + 1, z + 1]
            out[..., i, j] = v
    return out


@pytest.mark.parametrize("params,in_hw,out_hw", [
    ("is_pyramid_test: true out_height_scale: 2 out_width_scale: 2 type: BILINEAR", (3, 4), (6, 8)),
    ("is_pyramid_test: true out_height_scale: 1.5 out_width_scale: 0.7", (5, 7), (7, 4)),
    ("height: 4 width: 9", (6, 5), (4, 9)),
])
def test_resize_matches_original_loop(params, in_hw, out_hw):
    x = torch.randn((2, 3) + in_hw, generator=torch.Generator().manual_seed(0))
    layer = make_layer(f'type: "Resize" resize_param {{ {params} }}', [x.shape], dtype=torch.float32)
    assert layer.top_shapes([tuple(x.shape)]) == [(2, 3) + out_hw]
    out = layer(x)
    np.testing.assert_allclose(out.numpy(), _resize_loop(x.numpy(), *out_hw), rtol=1e-6, atol=1e-6)


def test_resize_border_quirk_and_fix():
    x = torch.ones(1, 1, 3, 3)
    text = 'type: "Resize" resize_param { is_pyramid_test: true out_height_scale: 2 out_width_scale: 2 }'
    out = make_layer(text, [x.shape], dtype=torch.float32)(x)
    assert out[0, 0, 2, 5] == 0.5 and out[0, 0, 5, 5] == 0.25 and out[0, 0, 2, 2] == 1  # dropped weights
    drop = make_layer(text.replace("}", "border: DROP }"), [x.shape], dtype=torch.float32)
    torch.testing.assert_close(drop(x), out, rtol=0, atol=0)
    fixed = make_layer(text.replace("}", "border: REPLICATE }"), [x.shape], dtype=torch.float32)
    assert fixed.border == "replicate"
    torch.testing.assert_close(fixed(x), torch.ones(1, 1, 6, 6))
    y = torch.arange(9.0).reshape(1, 1, 3, 3)
    np.testing.assert_allclose(fixed(y)[0, 0, -1].numpy(), [6, 6.5, 7, 7.5, 8, 8])  # the edge is repeated
    gradcheck_layer(text.replace("}", "border: REPLICATE }"), [(1, 2, 3, 3)])


def test_resize_gradcheck_and_errors():
    gradcheck_layer('type: "Resize" resize_param { height: 5 width: 4 }', [(2, 2, 3, 7)])
    gradcheck_layer('type: "Resize" resize_param { is_pyramid_test: true out_height_scale: 2 out_width_scale: 2 }',
                    [(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="height and width are required"):
        make_layer('type: "Resize" resize_param { height: 5 }', [(1, 1, 3, 3)])
    with pytest.raises(ValueError, match="out_height_scale"):
        make_layer('type: "Resize" resize_param { is_pyramid_test: true out_width_scale: 2 }', [(1, 1, 3, 3)])


# ---- configs -----------------------------------------------------------------------------------
CONFIGS = ["voc_rnn_vgg_v3.prototxt", "voc_rnn_deploy_vgg_v3.prototxt", "parsing_rnn_strd2_v4.prototxt"]


def _parse(path, msg):
    return text_format.Parse(Path(path).read_text(), msg)


def _same_data_layer(a, b):
    """The Python data layer we replaced: same tops, batch shape and mean (other layers: False)."""
    if b.type != "Python":
        return False
    assert (a.type, a.name, list(a.top), list(a.bottom)) == (b.type, b.name, list(b.top), list(b.bottom))
    pa, pb_ = (ast.literal_eval(layer.python_param.param_str) for layer in (a, b))
    assert tuple(pa["shape"]) == tuple(pb_["shape"]) and tuple(pa["mean"]) == tuple(pb_["mean"])
    assert pa["split"] == pb_["split"] and pa.get("seed", 1464) == pb_.get("seed", 1464)
    return True


@pytest.mark.parametrize("name", CONFIGS)
def test_generated_config_equals_original(name):
    ours = make_spn.configs()[name]
    orig = _parse(REFERENCE / "spn" / name, pb.NetParameter())
    assert_same_net(ours, orig, name, same_layer=_same_data_layer)


def test_generated_solver_equals_original():
    ours = make_spn.configs()["solver_v3.prototxt"]
    orig = _parse(REFERENCE / "spn" / "solver_v3.prototxt", pb.SolverParameter())
    assert ours.train_net == Path(orig.train_net).name and list(ours.test_net) == [Path(orig.test_net[0]).name]
    for m in (ours, orig):
        for f in ("train_net", "test_net", "snapshot_prefix"):
            m.ClearField(f)
    assert ours == orig


@pytest.mark.parametrize("name", CONFIGS + ["solver_v3.prototxt"])
def test_committed_configs_are_generated(name):
    msg = make_spn.configs()[name]
    assert _parse(SPN_MODELS / name, type(msg)()) == msg, f"run models/spn/make_spn.py to regenerate {name}"


# ---- end to end --------------------------------------------------------------------------------
def test_data_layer_sample(tmp_path):
    root = spn_data.make_sample(tmp_path / "VOC", n_images=2, size=(40, 48), classes=21)
    from caffe_layers.layers.python_layer import PyBlob
    layer = spn_data.SPNDataLayer()
    layer.param_str = str({"voc_dir": str(root), "split": "train", "mean": (104.0, 117.0, 123.0),
                           "shape": (4, 24, 16, 20), "patch_num": 2, "seed": 3})
    top = [PyBlob(), PyBlob()]
    layer.setup([], top)
    layer.reshape([], top)
    layer.forward([], top)
    data, label = top[0].data, top[1].data
    assert data.shape == (4, 24, 16, 20) and label.shape == (4, 1, 16, 20)
    assert np.all((data[:, 3:] >= 0) & (data[:, 3:] <= 1)) and np.all(data[:, :3] < 256 - 104)
    assert set(np.unique(label)) <= set(range(21)) | {255}
    np.testing.assert_allclose(data[:, 3:].sum(1), 1, rtol=1e-5)  # the coarse probabilities
    with pytest.raises(ValueError, match="3 \\+ 21 channels"):
        layer.shape = (4, 5, 16, 20)
        layer.forward([], [PyBlob(np.zeros((4, 5, 16, 20), np.float32)), PyBlob(np.zeros((4, 1, 16, 20)))])


def test_voc_net_runs_end_to_end(tmp_path):
    root = spn_data.make_sample(tmp_path / "VOC", n_images=2, size=(40, 48))
    net = make_spn.voc_net(train=True)
    net.layer[0].python_param.param_str = str({"voc_dir": str(root), "split": "train", "mean": (104.0, 117.0, 123.0),
                                               "shape": (2, 24, 32, 32), "patch_num": 1, "seed": 0})
    path = tmp_path / "voc.prototxt"
    path.write_text(text_format.MessageToString(net))
    shutil.copy(SPN_MODELS / "spn_data.py", tmp_path)
    torch.manual_seed(0)
    model = Net(str(path), phase="train")
    loss = model.forward()["loss"]
    assert np.isfinite(loss) and loss > 0
    model.backward()
    grad = model.params["guide_conv2"][0].diff
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
    assert model.blobs["gate1_rnn1"].shape == (2, 32, 16, 16)


def test_helen_net_runs_end_to_end():
    net = make_spn.helen_net()
    net.layer[0].input_param.shape[0].dim[:] = [1, 14, 32, 32]
    net.force_backward = True
    torch.manual_seed(0)
    model = Net(text_format.MessageToString(net), phase="train")
    out = model.forward(data=np.random.RandomState(0).randn(1, 14, 32, 32).astype(np.float32))
    assert out["deconv0"].shape == (1, 11, 32, 32) and np.isfinite(out["deconv0"]).all()
    model.backward()
    assert np.abs(model.blobs["data"].diff).sum() > 0
    # the normalised gates: sum |g| = 1 at every pixel where the sum was not clamped
    g = [model.blobs[f"gate1_x1_g{k}_cmb"].data for k in (1, 2, 3)]
    np.testing.assert_allclose(sum(np.abs(t) for t in g), 1, rtol=1e-4)
