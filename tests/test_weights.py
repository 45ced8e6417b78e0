"""Weights I/O: .caffemodel / .caffemodel.h5 reading and writing, matching, errors, convert."""
import logging

import h5py
import numpy as np
import pytest
import torch
from golden import GOLDEN

from caffe_layers import Net
from caffe_layers.tools.cli import main as cli_main
from caffe_layers.tools.convert import load_pt
from caffe_layers.formats.proto import pb
from caffe_layers.formats.weights import WeightsError, load_weights, read_caffemodel, write_caffemodel

TRAIN_CASES = sorted(p.name for p in (GOLDEN / "train").iterdir())
GOLDEN_FILES = [(c, f) for c in TRAIN_CASES for f in ("init", "final", "snap_iter_12")]

# The learnable layers of the golden train nets (embs_small), as a deploy net of real layers.
EMBS_SMALL = """
name: "embs_small"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "emb" type: "Convolution" bottom: "conv1" top: "emb"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "score" type: "Convolution" bottom: "emb" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
"""

SHARED = """
name: "shared"
layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "y1" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "y1" top: "y2" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 5 } }
layer { name: "ip3" type: "InnerProduct" bottom: "y2" top: "y3"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
"""


def protobuf_reference(path):
    """{layer: [arrays]} through protobuf's own parser: the independent reference."""
    net = pb.NetParameter.FromString(path.read_bytes())
    return {l.name: [np.array(b.double_data or b.data).reshape(tuple(b.shape.dim)) for b in l.blobs]
            for l in net.layer}


def params_of(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- golden files written by the original Caffe ------------------------------------------------
@pytest.mark.parametrize("case,which", GOLDEN_FILES)
def test_golden_caffemodel_loads(case, which):
    path = GOLDEN / "train" / case / f"{which}.caffemodel"
    net = Net(EMBS_SMALL)
    report = net.copy_from(str(path))
    assert report.copied == ["conv1", "emb", "score"]
    assert report.ignored == [] and report.missing == []
    assert "label_data_1_split" in report.ignored_empty and "distloss" in report.ignored_empty
    ref = protobuf_reference(path)
    for layer in ("conv1", "emb", "score"):
        for i, value in enumerate(ref[layer]):
            np.testing.assert_array_equal(net.params[layer][i].data, value)
    if which == "final":  # the trajectory's parameters after the last iteration
        with np.load(GOLDEN / "train" / case / "trajectory.npz") as z:
            for key in z.files:
                if key.startswith("param:"):
                    _, layer, i = key.split(":")
                    np.testing.assert_array_equal(net.params[layer][int(i)].data, z[key])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_golden_rewrite_is_byte_identical(case, tmp_path):
    """Our writer, given the file's layer definitions and values, writes Caffe's exact bytes."""
    path = GOLDEN / "train" / case / "final.caffemodel"
    weights, definition = read_caffemodel(path, with_definition=True)
    assert definition.name == "embs_small"
    out = tmp_path / "rewritten.caffemodel"
    write_caffemodel(out, [(lp, weights[lp.name]) for lp in definition.layer], definition.name)
    assert out.read_bytes() == path.read_bytes()


def test_read_caffemodel_without_net():
    path = GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel"
    weights = read_caffemodel(path)
    ref = protobuf_reference(path)
    assert list(weights) == list(ref)
    for name, arrays in ref.items():
        assert len(weights[name]) == len(arrays)
        for ours, theirs in zip(weights[name], arrays):
            assert ours.dtype == np.float32 and ours.shape == theirs.shape
            np.testing.assert_array_equal(ours, theirs)
    assert read_caffemodel(path.read_bytes()).keys() == weights.keys()  # bytes work too
    net = Net(EMBS_SMALL)
    assert load_weights(net, path.read_bytes()).copied == ["conv1", "emb", "score"]
    np.testing.assert_array_equal(net.params["emb"][0].data, ref["emb"][0])


# ---- writing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".caffemodel", ".caffemodel.h5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, suffix, dtype):
    torch.manual_seed(0)
    net = Net(EMBS_SMALL).to(dtype)
    for p in net.parameters():
        p.data.normal_()
    path = tmp_path / f"m{suffix}"
    net.save(str(path))
    other = Net(EMBS_SMALL).to(dtype)
    report = other.copy_from(str(path))
    assert report.copied == ["conv1", "emb", "score"] and report.complete
    assert_same_params(params_of(net), params_of(other))
    weights = read_caffemodel(path)  # stored dtype: float32 data, or double_data for float64
    assert weights["conv1"][0].dtype == (np.float32 if dtype == torch.float32 else np.float64)
    path2 = tmp_path / f"again{suffix}"
    other.save(str(path2))
    if suffix == ".caffemodel":
        assert path2.read_bytes() == path.read_bytes()
    third = Net(EMBS_SMALL).to(dtype)
    third.copy_from(str(path2))
    assert_same_params(params_of(net), params_of(third))


def test_saved_caffemodel_is_v2_with_definitions(tmp_path):
    net = Net(EMBS_SMALL)
    path = tmp_path / "m.caffemodel"
    net.save(str(path))
    parsed = pb.NetParameter.FromString(path.read_bytes())
    assert parsed.name == "embs_small" and len(parsed.layers) == 0
    assert [(l.name, l.type) for l in parsed.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("emb", "Convolution"),
        ("score", "Convolution")]
    conv1 = parsed.layer[1]
    assert conv1.convolution_param.num_output == 8 and list(conv1.bottom) == ["data"]
    assert conv1.phase == pb.TEST
    assert list(conv1.blobs[0].shape.dim) == [8, 3, 3, 3] and len(conv1.blobs[0].data) == 216
    np.testing.assert_array_equal(np.array(conv1.blobs[1].data, np.float32), net.params["conv1"][1].data)


def test_hdf5_layout_and_shared_params(tmp_path):
    torch.manual_seed(1)
    net = Net(SHARED)
    path = tmp_path / "s.caffemodel.h5"
    net.save(str(path))
    with h5py.File(path, "r") as f:
        assert sorted(f["data"]) == ["input", "ip1", "ip2", "ip3"]
        assert sorted(f["data/ip1"]) == ["0", "1"] and len(f["data/ip2"]) == 0  # owner writes shared
        np.testing.assert_array_equal(f["data/ip1/0"][()], net.params["ip1"][0].data)
    other = Net(SHARED)
    report = other.copy_from(str(path))
    assert report.complete and report.copied == ["ip1", "ip3"]
    assert_same_params(params_of(net), params_of(other))
    # in a binary .caffemodel every layer carries its blobs, shared ones included (Net::ToProto)
    binary = tmp_path / "s.caffemodel"
    net.save(str(binary))
    weights = read_caffemodel(binary)
    np.testing.assert_array_equal(weights["ip2"][0], weights["ip1"][0])


def test_hdf5_missing_owned_blob_is_an_error(tmp_path):
    path = tmp_path / "bad.caffemodel.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip3/0", data=np.zeros((3, 5), np.float32))
    with pytest.raises(WeightsError, match=r"ip3.*blob 1 is missing"):
        Net(SHARED).copy_from(str(path))
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip3/0", data=np.zeros((3, 4), np.float32))
        f.create_dataset("data/ip3/1", data=np.zeros(3, np.float32))
    with pytest.raises(WeightsError, match=r"param 0 of layer 'ip3'.*\[3, 5\].*\[3, 4\]"):
        Net(SHARED).copy_from(str(path))


# ---- legacy formats through the upgrade path ---------------------------------------------------
def v1_file(net, path, legacy_dims=True, double=False):
    """A V1 (`layers`, enum types, blobs_lr) binary with the net's values and 4-D legacy dims."""
    v1 = pb.NetParameter(name=net.name)
    v1.input.append("data")  # legacy caffemodels kept the input name without its shape
    for layer in net.layer_modules:
        if layer.param.type == "Input":
            continue
        entry = v1.layers.add(name=layer.name, bottom=layer.param.bottom, top=layer.param.top)
        entry.type = {"Convolution": pb.V1LayerParameter.CONVOLUTION, "ReLU": pb.V1LayerParameter.RELU,
                      "InnerProduct": pb.V1LayerParameter.INNER_PRODUCT}[layer.param.type]
        entry.blobs_lr.extend([1, 2][:len(layer.blobs)])
        for p in layer.blobs:
            b = entry.blobs.add()
            value = p.detach().numpy()
            if legacy_dims:
                b.num, b.channels, b.height, b.width = (1,) * (4 - value.ndim) + value.shape
            else:
                b.shape.dim.extend(value.shape)
            (b.double_data if double else b.data).extend(value.reshape(-1).tolist())
    path.write_bytes(v1.SerializeToString())


@pytest.mark.parametrize("double", [False, True])
def test_v1_caffemodel_loads_through_upgrade(tmp_path, double):
    torch.manual_seed(2)
    source = Net(EMBS_SMALL)
    v1_file(source, tmp_path / "v1.caffemodel", double=double)
    net = Net(EMBS_SMALL)
    report = net.copy_from(str(tmp_path / "v1.caffemodel"))
    assert report.copied == ["conv1", "emb", "score"] and report.complete and not report.ignored_empty
    assert_same_params(params_of(source), params_of(net))


def test_legacy_4d_inner_product_weight(tmp_path):
    torch.manual_seed(3)
    source = Net(SHARED)
    v1_file(source, tmp_path / "v1.caffemodel")  # ip weights stored as (1, 1, M, N)
    assert read_caffemodel(tmp_path / "v1.caffemodel")["ip3"][0].shape == (1, 1, 3, 5)
    net = Net(SHARED)
    net.copy_from(str(tmp_path / "v1.caffemodel"))
    assert_same_params(params_of(source), params_of(net))
    # a 4-D *shape* (not legacy dims) is compared as it is, as in Caffe
    v1 = pb.NetParameter.FromString((tmp_path / "v1.caffemodel").read_bytes())
    blob = v1.layers[2].blobs[0]
    for f in ("num", "channels", "height", "width"):
        blob.ClearField(f)
    blob.shape.dim.extend([3, 5, 1, 1])
    (tmp_path / "bad.caffemodel").write_bytes(v1.SerializeToString())
    with pytest.raises(WeightsError, match=r"param 0 of layer 'ip3'.*\[3, 5\].*\[3, 5, 1, 1\]"):
        Net(SHARED).copy_from(str(tmp_path / "bad.caffemodel"))


def test_v0_caffemodel_with_padding_layer(tmp_path):
    torch.manual_seed(4)
    source = Net(EMBS_SMALL)
    v0 = pb.NetParameter(name="old")
    v0.input.append("data")
    v0.input_dim.extend([2, 3, 6, 6])
    pad = v0.layers.add(bottom=["data"], top=["data_pad"])
    pad.layer.name, pad.layer.type, pad.layer.pad = "pad1", "padding", 1
    conv = v0.layers.add(bottom=["data_pad"], top=["conv1"])
    conv.layer.name, conv.layer.type, conv.layer.num_output, conv.layer.kernelsize = "conv1", "conv", 8, 3
    for p in source.layer_dict["conv1"].module.blobs:
        b = conv.layer.blobs.add()
        b.shape.dim.extend(p.shape)
        b.data.extend(p.detach().numpy().reshape(-1).tolist())
    (tmp_path / "v0.caffemodel").write_bytes(v0.SerializeToString())
    _, definition = read_caffemodel(tmp_path / "v0.caffemodel", with_definition=True)
    assert [(l.name, l.type) for l in definition.layer] == [("input", "Input"), ("conv1", "Convolution")]
    assert list(definition.layer[1].convolution_param.pad) == [1]
    net = Net(EMBS_SMALL)
    report = net.copy_from(str(tmp_path / "v0.caffemodel"))
    assert report.copied == ["conv1"] and report.missing == ["emb", "score"]
    np.testing.assert_array_equal(net.params["conv1"][0].data, source.params["conv1"][0].data)


# ---- matching, mismatches, strict --------------------------------------------------------------
def golden_path():
    return str(GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel")


def test_shape_mismatch_names_layer_blob_and_shapes():
    net = Net(EMBS_SMALL.replace("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 5"))
    before = params_of(net)
    with pytest.raises(WeightsError, match=r"param 0 of layer 'emb'.*expects \[4, 8, 5, 5\].*has \[4, 8, 3, 3\]"):
        net.copy_from(golden_path())
    assert_same_params(before, params_of(net))  # nothing half-loaded (conv1 comes first in the file)


def test_blob_count_mismatch():
    net = Net(EMBS_SMALL.replace("num_output: 3 kernel_size: 1", "num_output: 3 kernel_size: 1 bias_term: false"))
    with pytest.raises(WeightsError, match=r"number of blobs for layer 'score': the net has 1, the file has 2"):
        net.copy_from(golden_path())


def test_unmatched_layers_reported_and_strict(caplog):
    text = EMBS_SMALL.replace('name: "score"', 'name: "score_new"')
    net = Net(text)
    with caplog.at_level(logging.INFO, logger="caffe_layers.formats.weights"):
        report = net.copy_from(golden_path())
    assert report.copied == ["conv1", "emb"]
    assert report.ignored == ["score"] and report.missing == ["score_new"] and not report.complete
    assert "score_new" in caplog.text and "ignoring source layer score" in caplog.text
    fresh = Net(text)
    before = params_of(fresh)
    with pytest.raises(WeightsError, match=r"strict.*\['score'\].*\['score_new'\]"):
        fresh.copy_from(golden_path(), strict=True)
    assert_same_params(before, params_of(fresh))
    with pytest.raises(WeightsError, match="strict"):
        Net(text, weights=golden_path(), strict_weights=True)
    assert Net(EMBS_SMALL, weights=golden_path(), strict_weights=True)  # exact match passes strict


def test_diff_is_loaded(tmp_path):
    net = Net(SHARED)
    model = pb.NetParameter()
    lp = model.layer.add(name="ip3")
    for p in net.layer_dict["ip3"].module.blobs:
        b = lp.blobs.add()
        b.shape.dim.extend(p.shape)
        b.data.extend([0.5] * p.numel())
        b.diff.extend([0.25] * p.numel())
    (tmp_path / "d.caffemodel").write_bytes(model.SerializeToString())
    net.copy_from(str(tmp_path / "d.caffemodel"))
    assert np.all(net.params["ip3"][0].data == 0.5) and np.all(net.params["ip3"][0].diff == 0.25)


# ---- bad files ---------------------------------------------------------------------------------
def test_truncated_files_fail_cleanly(tmp_path):
    data = (GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel").read_bytes()
    net = Net(EMBS_SMALL)
    before = params_of(net)
    for cut in sorted({1, 5, 13, 60, 200, 500, 1000, len(data) // 2, len(data) - 30, len(data) - 1}):
        path = tmp_path / f"cut{cut}.caffemodel"
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=str(path)):
            net.copy_from(str(path))
        with pytest.raises(WeightsError):
            read_caffemodel(path)
        assert_same_params(before, params_of(net))


def test_not_a_caffemodel(tmp_path):
    net = Net(EMBS_SMALL)
    (tmp_path / "text.caffemodel").write_text(EMBS_SMALL)
    with pytest.raises(WeightsError, match="text prototxt"):
        net.copy_from(str(tmp_path / "text.caffemodel"))
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        net.copy_from(str(tmp_path / "empty.caffemodel"))
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"noise{i}.caffemodel"
        path.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
        with pytest.raises(WeightsError):
            net.copy_from(str(path))
    (tmp_path / "x.caffemodel.h5").write_bytes(b"")
    with h5py.File(tmp_path / "x.caffemodel.h5", "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(WeightsError, match="/data group"):
        net.copy_from(str(tmp_path / "x.caffemodel.h5"))
    with pytest.raises(FileNotFoundError, match="nowhere.caffemodel"):
        net.copy_from(str(tmp_path / "nowhere.caffemodel"))


def test_corrupt_blob_count(tmp_path):
    model = pb.NetParameter.FromString((GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel").read_bytes())
    del model.layer[2].blobs[1].data[-1]
    (tmp_path / "c.caffemodel").write_bytes(model.SerializeToString())
    with pytest.raises(WeightsError, match=r"layer 'conv1' blob 1: shape \[8\] needs 8 values, the file holds 7"):
        Net(EMBS_SMALL).copy_from(str(tmp_path / "c.caffemodel"))


def test_file_over_64_mb(tmp_path):
    text = """layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4100 } } }
              layer { name: "big" type: "InnerProduct" bottom: "x" top: "y"
                      inner_product_param { num_output: 4100 bias_term: false } }"""
    net = Net(text)
    value = np.arange(4100 * 4100, dtype=np.float32).reshape(4100, 4100) / 7
    path = tmp_path / "big.caffemodel"
    write_caffemodel(path, {"big": [value]})
    assert path.stat().st_size > 64 << 20
    net.copy_from(str(path))
    np.testing.assert_array_equal(net.params["big"][0].data, value)


# ---- convert -----------------------------------------------------------------------------------
def test_convert_cli_round_trip(tmp_path, capsys):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(EMBS_SMALL)
    pt = tmp_path / "out.pt"
    assert cli_main(["convert", str(prototxt), golden_path(), "-o", str(pt)]) == 0
    net = load_pt(pt)  # the .pt alone rebuilds the net
    reference = Net(EMBS_SMALL, weights=golden_path())
    assert_same_params(params_of(reference), params_of(net))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(net(data=x)["score"], reference(data=x)["score"], rtol=0, atol=0)

    back = tmp_path / "back.caffemodel"
    assert cli_main(["convert", str(pt), "-o", str(back)]) == 0
    ref = protobuf_reference(GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel")
    ours = read_caffemodel(back)
    for layer in ("conv1", "emb", "score"):
        for a, b in zip(ours[layer], ref[layer]):
            np.testing.assert_array_equal(a, b)
    assert cli_main(["convert", str(pt), "-o", str(tmp_path / "back.caffemodel.h5")]) == 0
    assert read_caffemodel(tmp_path / "back.caffemodel.h5")["score"][1].shape == (3,)

    # existing outputs are never overwritten without --force
    stamp = back.read_bytes()
    assert cli_main(["convert", str(pt), "-o", str(back)]) == 2
    assert "--force" in capsys.readouterr().out and back.read_bytes() == stamp
    assert cli_main(["convert", str(prototxt), golden_path(), "-o", str(pt)]) == 2
    assert cli_main(["convert", str(pt), "-o", str(back), "--force"]) == 0
    # strict and bad inputs
    assert cli_main(["convert", str(prototxt), golden_path(), "-o", str(tmp_path / "x.pt"), "--strict"]) == 0
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert cli_main(["convert", str(tmp_path / "junk.pt"), "-o", str(tmp_path / "j.caffemodel")]) == 2
    assert "cannot read a .pt file" in capsys.readouterr().out


def test_convert_rejects_foreign_pt(tmp_path, capsys):
    torch.save({"a": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert cli_main(["convert", str(tmp_path / "foreign.pt"), "-o", str(tmp_path / "o.caffemodel")]) == 2
    assert "not a caffe_layers .pt" in capsys.readouterr().out
    assert not (tmp_path / "o.caffemodel").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_into_cuda_net():
    net = Net(EMBS_SMALL).cuda()
    net.copy_from(golden_path())
    ref = protobuf_reference(GOLDEN / "train" / TRAIN_CASES[0] / "init.caffemodel")
    np.testing.assert_array_equal(net.params["emb"][0].data, ref["emb"][0])


# ---- the golden train nets themselves (HDF5Data, Im2dist, DistLoss, ...) -----------------------
@pytest.mark.parametrize("case", TRAIN_CASES)
def test_golden_train_net_strict_load_and_save(case, tmp_path, monkeypatch):
    folder = GOLDEN / "train" / case
    monkeypatch.chdir(folder)  # the HDF5Data source is relative, as Caffe ran it
    net = Net("net.prototxt", phase="train")
    report = net.copy_from("final.caffemodel", strict=True)
    assert report.copied == ["conv1", "emb", "score"]
    assert report.ignored_empty == ["label_data_1_split", "emb_big_emb_big_0_split"]  # Caffe's splits
    with np.load(folder / "trajectory.npz") as z:
        for key in (k for k in z.files if k.startswith("param:")):
            _, layer, i = key.split(":")
            np.testing.assert_array_equal(net.params[layer][int(i)].data, z[key])
    out = tmp_path / "saved.caffemodel"
    net.save(str(out))
    ours = pb.NetParameter.FromString(out.read_bytes())
    theirs = {l.name: l for l in pb.NetParameter.FromString((folder / "final.caffemodel").read_bytes()).layer}
    assert ours.name == "embs_small"
    for layer in ours.layer:  # the same definitions and values as the original's net.save,
        expected = theirs[layer.name]  # except the bottoms Caffe renames to its Split tops
        if any("_split_" in b for b in expected.bottom):
            layer.ClearField("bottom")
            expected.ClearField("bottom")
        assert layer == expected, layer.name
