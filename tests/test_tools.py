"""dump / compare / draw subcommands and the golden-net reference (caffe_layers.tools.reference)."""
import json
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import caffe_layers
from caffe_layers import Net
from caffe_layers.tools.cli import main
from caffe_layers.tools.compare import Tolerances, compare_entries
from caffe_layers.tools.dump import caffe_splits, capture
from caffe_layers.formats.matio import write_blob_mat
from caffe_layers.formats.prototxt import read_net
from caffe_layers.tools.reference import golden_net, hashfill, load_reference
from golden import GOLDEN

NET = """name: "tools"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv1" top: "sum" }
layer { name: "drop" type: "Dropout" bottom: "conv2" top: "conv2" include { phase: TRAIN } }
"""


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    torch.manual_seed(0)
    net = Net(str(model))
    with torch.no_grad():
        net.params["bn1"][0].data[...] = np.linspace(-0.2, 0.2, 4)
        net.params["bn1"][1].data[...] = np.linspace(0.5, 1.5, 4)
        net.params["bn1"][2].data[...] = 1.0
        net.params["scale1"][0].data[...] = np.linspace(0.8, 1.2, 4)
        net.params["scale1"][1].data[...] = np.linspace(-0.1, 0.1, 4)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, model, weights, x


def dump(setup, name, *extra):
    tmp, model, weights, _ = setup
    out = tmp / name
    assert main(["dump", str(model), str(weights), "--input", f"data={tmp / 'x.npy'}", "-o", str(out), *extra]) == 0
    return out


def test_dump_in_place_chain_and_formats(setup):
    tmp, model, weights, x = setup
    npz, h5 = dump(setup, "b.npz"), dump(setup, "b.h5")
    ref = load_reference(npz)
    keys = [(e.layer, e.top) for e in ref.entries]
    # conv -> BatchNorm -> Scale -> ReLU in place: four entries for blob conv1, in net order
    assert keys == [("data", "data"), ("conv1", "conv1"), ("bn1", "conv1"), ("scale1", "conv1"),
                    ("relu1", "conv1"), ("conv2", "conv2"), ("sum", "sum")]
    net = Net(str(model), str(weights))
    c = torch.nn.functional.conv2d(torch.as_tensor(x), torch.as_tensor(net.params["conv1"][0].data),
                                   torch.as_tensor(net.params["conv1"][1].data), padding=1).numpy()
    np.testing.assert_allclose(ref.entries[1].value, c, rtol=1e-5, atol=1e-6)
    bn = (c - np.linspace(-0.2, 0.2, 4)[:, None, None]) / np.sqrt(np.linspace(0.5, 1.5, 4)[:, None, None] + 1e-5)
    np.testing.assert_allclose(ref.entries[2].value, bn, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.entries[4].value, np.maximum(ref.entries[3].value, 0))
    np.testing.assert_array_equal(ref.inputs["data"], x)
    np.testing.assert_array_equal(ref.params["conv2:0"], net.params["conv2"][0].data)
    h = load_reference(h5)
    assert [(e.layer, e.top) for e in h.entries] == keys
    for a, b in zip(ref.entries, h.entries):
        np.testing.assert_array_equal(a.value, b.value)
    assert "Dropout" not in h.prototxt  # TEST phase net
    with h5py.File(h5) as f:
        assert "blob:004:relu1:conv1" in f
    # --splits lists Caffe's Split layer for conv1, read twice by Eltwise (and once by conv2)
    s = load_reference(dump(setup, "s.npz", "--splits"))
    split = [e for e in s.entries if e.layer == "conv1_relu1_0_split"]
    assert [e.top for e in split] == [f"conv1_relu1_0_split_{k}" for k in range(3)]
    np.testing.assert_array_equal(split[0].value, ref.entries[4].value)


def test_compare_self_passes_and_outputs(setup, capsys):
    tmp, model, weights, _ = setup
    ref = dump(setup, "ref.h5")
    js, png = tmp / "r.json", tmp / "r.png"
    assert main(["compare", str(model), str(weights), "--reference", str(ref), "--json", str(js),
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "all within tolerance" in out and "relu1" in out
    report = json.loads(js.read_text())
    assert report["ok"] and report["first_divergence"] is None and not report["unmatched"]
    rows = [r for r in report["rows"] if r["kind"] != "absent"]
    assert [r["layer"] for r in rows] == ["data", "conv1", "bn1", "scale1", "relu1", "conv2", "sum"]
    assert all(r["max_abs"] == 0 and r["cosine"] == pytest.approx(1) for r in rows)
    assert Image.open(png).format == "PNG"
    # --json - : stdout is pure JSON
    assert main(["compare", str(model), str(weights), "--reference", str(ref), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    # no WEIGHTS: the parameters come from the dump's param: keys
    assert main(["compare", str(model), "--reference", str(ref)]) == 0


def test_perturbed_weight_named_as_first_divergence(setup, capsys):
    tmp, model, weights, _ = setup
    ref = dump(setup, "ref.npz")
    net = Net(str(model), str(weights))
    net.params["scale1"][0].data[2] += 0.01
    bad = tmp / "bad.caffemodel"
    net.save(str(bad))
    js = tmp / "r.json"
    assert main(["compare", str(model), str(bad), "--reference", str(ref), "--json", str(js),
                 "--plot", str(tmp / "p.png")]) == 1
    out = capsys.readouterr().out
    assert "first divergence at layer 'scale1' (Scale)" in out
    assert "<<< FIRST DIVERGENCE" in [line for line in out.splitlines() if line.split()[1:2] == ["scale1"]][0]
    report = json.loads(js.read_text())
    assert report["first_divergence"]["layer"] == "scale1"
    assert {r["layer"] for r in report["rows"] if not r["ok"]} >= {"scale1", "relu1"}
    assert [r["ok"] for r in report["rows"] if r["layer"] in ("data", "conv1", "bn1")] == [True] * 3
    # per-layer tolerances: loosen scale1 and relu1, the divergence moves on to conv2
    assert main(["compare", str(model), str(bad), "--reference", str(ref), "--tol", "scale1=0.1",
                 "--tol", "relu*=0.1"]) == 1
    assert "first divergence at layer 'conv2'" in capsys.readouterr().out
    assert main(["compare", str(model), str(bad), "--reference", str(ref), "--rtol", "0.1"]) == 0


def test_reference_directory_npy_and_mat(setup, capsys):
    tmp, model, weights, x = setup
    net = Net(str(model), str(weights))
    out = net.forward(data=x, blobs=["conv1", "conv2", "sum"])
    d = tmp / "refdir"
    d.mkdir()
    np.save(d / "data.npy", x)
    np.save(d / "conv1.npy", out["conv1"])
    write_blob_mat(d / "sum.mat", out["sum"])
    bad = out["conv2"].copy()
    bad[0, 1, 2, 3] += 1
    write_blob_mat(d / "conv2.mat", bad)
    # inputs come from the directory's blob; plain blob names match the last layer writing them
    assert main(["compare", str(model), str(weights), "--reference", str(d)]) == 1
    text = capsys.readouterr().out
    assert "first divergence at layer 'conv2'" in text and "relu1" in text
    write_blob_mat(d / "conv2.mat", out["conv2"])
    assert main(["compare", str(model), str(weights), "--reference", str(d)]) == 0


def test_compare_live_pycaffe(setup, monkeypatch, capsys):
    """--caffe drives a pycaffe module layer by layer; this package's own pycaffe facade stands in."""
    tmp, model, weights, _ = setup
    monkeypatch.setitem(sys.modules, "caffe", caffe_layers)
    assert main(["compare", str(model), str(weights), "--caffe", "--input", f"data={tmp / 'x.npy'}"]) == 0
    assert "compared 7 tops of 7 layers: all within tolerance" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "caffe", None)
    assert main(["compare", str(model), str(weights), "--caffe"]) == 2
    assert "pycaffe is not importable" in capsys.readouterr().err


def test_image_input_preprocessed_like_pycaffe(setup):
    tmp, model, weights, _ = setup
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp / "im.png")
    out = dump(setup, "im.npz", "--input", f"data={tmp / 'im.png'}", "--mean", "104,117,123")
    ref = load_reference(out)
    t = caffe_layers.pycaffe.io.Transformer({"data": (1, 3, 6, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([104, 117, 123.0]))
    expected = t.preprocess("data", caffe_layers.pycaffe.io.load_image(str(tmp / "im.png")))
    np.testing.assert_array_equal(ref.inputs["data"][0], expected)
    np.testing.assert_array_equal(ref.entries[0].value[0], expected)


def test_bad_inputs(setup, capsys):
    tmp, model, weights, _ = setup
    assert main(["dump", str(model), "--input", "nosuch=x.npy", "-o", str(tmp / "a.npz")]) == 2
    assert "'nosuch' is not a blob" in capsys.readouterr().err
    assert main(["dump", str(model), "--input", f"data={tmp / 'x.npy'}", "-o", str(tmp / "a.txt")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert main(["compare", str(model), "--reference", str(tmp / "missing.npz")]) == 2
    assert "reference not found" in capsys.readouterr().err
    assert main(["compare", str(model), str(weights), "--reference", str(dump(setup, "r.npz")),
                 "--tol", "conv1"]) == 2
    assert "expected LAYER=RTOL" in capsys.readouterr().err


# ---- golden nets ------------------------------------------------------------------------------------------
def test_hashfill_rule():
    v = hashfill((3, 2), 5, 0.5)
    i = 4
    expected = np.float32((((i * 2654435761 + 5 * 97531) % 2 ** 31) / 2 ** 31 * 2 - 1) * 0.5)
    assert v.dtype == np.float32 and v.reshape(-1)[i] == expected


def test_caffe_split_names_match_golden():
    for name in ("embs_deploy_97", "vgg_deploy_97"):
        ref = load_reference(GOLDEN / "nets" / f"{name}.npz")
        golden = {e.layer: [] for e in ref.entries if e.layer.endswith("_split")}
        for e in ref.entries:
            if e.layer in golden:
                golden[e.layer].append(e.top)
        ours = {}
        param = read_net(ref.prototxt)
        for s in caffe_splits(param):
            for n in [s.name] + s.aliases:
                ours[n] = [t.replace(s.name, n) for t in s.tops]
        for layer, tops in golden.items():
            assert ours[layer] == tops, layer


@pytest.fixture(scope="module")
def embs():
    net, ref = golden_net(GOLDEN / "nets" / "embs_deploy_97.npz")
    return net, ref


def test_golden_embs_compare_and_perturbation(embs):
    net, ref = embs
    report = compare_entries(capture(net, ref.inputs, splits=True), ref, net.net_param, Tolerances())
    assert report.ok and not report.unmatched
    assert sum(r.kind == "sampled" for r in report.rows) == len(ref.entries)
    # one weight: the golden file keeps only stats and 64 samples per top, so the change must move the
    # stats past rtol 1e-3 (a 0.05 change of this weight stays within them)
    weight = net.params["conv2_1"][0].data
    original = weight[3, 5, 1, 1].copy()
    weight[3, 5, 1, 1] += 0.3
    try:
        report = compare_entries(capture(net, ref.inputs, splits=True), ref, net.net_param, Tolerances())
    finally:
        weight[3, 5, 1, 1] = original  # the module-scoped fixture goes back as it was
    assert report.first.layer == "conv2_1" and report.first.kind == "sampled" and "sum" in report.first.note
    assert all(r.ok for r in report.rows if r.index < report.first.index)


def test_golden_vgg_cli(tmp_path, capsys):
    """The whole golden vgg net through the command: prototxt, inputs and parameters from the npz."""
    js = tmp_path / "vgg.json"
    assert main(["compare", "--reference", str(GOLDEN / "nets" / "vgg_deploy_97.npz"), "--json", str(js)]) == 0
    assert "compared 174 tops of 157 layers: all within tolerance" in capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    full = [r for r in rows if r["kind"] == "full"]
    assert [r["top"] for r in full] == ["fc8_voc12"]  # the golden `out:` blob is compared in full


# ---- draw -------------------------------------------------------------------------------------------------
def test_draw_dot_source(setup):
    tmp, model, _, _ = setup
    out = tmp / "n.dot"
    assert main(["draw", str(model), "-o", str(out)]) == 0
    dot = out.read_text()
    assert '"relu1_ReLU" [label="relu1\\n(ReLU)", shape=record, style=filled, fillcolor="#90EE90"]' in dot
    assert '"conv1_Convolution" [label="conv1\\n(Convolution)\\nkernel size: 3\\nstride: 1\\npad: 1", ' \
           'shape=record, style=filled, fillcolor="#FF5050"]' in dot
    # in place: the layer reads and writes the same blob node; edge labels carry num_output
    assert '"conv1_blob" -> "relu1_ReLU"' in dot and '"relu1_ReLU" -> "conv1_blob"' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="4"]' in dot
    assert '"data_blob" [label="data", shape=octagon' in dot
    assert '"sum_blob" [label="sum"];' in dot  # draw_net leaves blobs last seen as a top unstyled
    assert "drop_Dropout" in dot  # ALL phases by default
    assert main(["draw", str(model), "-o", str(out), "--phase", "TEST", "--force"]) == 0
    assert "drop_Dropout" not in out.read_text()
    assert main(["draw", str(model), "-o", str(out), "--style-tops", "--rankdir", "TB", "--force"]) == 0
    text = out.read_text()
    assert '"sum_blob" [label="sum", shape=octagon' in text and "kernel size: 3 stride: 1 pad: 1" in text


def test_draw_png_and_svg(setup):
    tmp, model, _, _ = setup
    assert main(["draw", str(model), "-o", str(tmp / "n.png"), "--engine", "matplotlib"]) == 0
    im = Image.open(tmp / "n.png")
    assert im.format == "PNG" and im.size[0] > 200
    assert main(["draw", str(model), "-o", str(tmp / "n.svg"), "--phase", "TRAIN"]) == 0
    svg = (tmp / "n.svg").read_text()
    assert "<svg" in svg
    assert main(["draw", str(model), "-o", str(tmp / "n.gif")]) == 2


# ---- no silent overwrite, atomic writes -------------------------------------------------------------
@pytest.mark.parametrize("command,name", [("dump", "b.npz"), ("dump", "b.h5"), ("draw", "n.dot"), ("draw", "n.svg")])
def test_dump_and_draw_refuse_to_overwrite_without_force(setup, capsys, command, name):
    tmp, model, weights, _ = setup
    out = tmp / name
    out.write_bytes(b"the user's file")
    args = [command, str(model)] + ([str(weights), "--input", f"data={tmp / 'x.npy'}"] if command == "dump" else [])
    assert main(args + ["-o", str(out)]) == 2
    assert f"{out} exists; pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"
    assert main(args + ["-o", str(out), "--force"]) == 0
    assert out.read_bytes() != b"the user's file"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_failed_writes_leave_the_old_file(setup, monkeypatch):
    from caffe_layers.tools import dump as dump_module
    from caffe_layers.tools.convert import save_pt

    tmp, model, _, _ = setup
    out = tmp / "b.npz"
    out.write_bytes(b"old")

    def broken_savez(f, **data):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(dump_module.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        dump_module.write_dump(out, {"a": np.zeros(2)})
    monkeypatch.setattr(torch, "save", lambda obj, f: (open(f, "wb").write(b"partial"), 1 / 0))
    pt = tmp / "n.pt"
    pt.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        save_pt(Net(str(model)), pt)
    assert out.read_bytes() == b"old" and pt.read_bytes() == b"old"
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []
