"""The segaware model configs: variables.json fills the original templates, and make_segaware.py
generates configs equal to the originals that build and run."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_layers import Net

from caffe_layers.training import synthetic
from caffe_layers.formats.prototxt import read_net, read_solver
from caffe_layers.engine.folding import FoldedConvolution
from golden import REFERENCE, assert_matches, assert_same_net, vary_batchnorm
from test_golden_nets import ATOL, RTOL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "segaware"))
import make_segaware  # noqa: E402


def variables(net):
    data = json.loads((ROOT / "models/segaware/variables.json").read_text())
    return {**data["common"], **data[net]}


@pytest.mark.parametrize("net", ["embs", "vgg", "res"])
def test_variables_fill_every_template(net):
    folder = REFERENCE / "segaware" / net
    files = sorted(folder.glob("*.prototxt"))
    assert files
    v = variables(net)
    for path in files:
        if path.name.startswith("solver"):
            solver = read_solver(path, v)
            assert solver.base_lr > 0, path
        else:
            param = read_net(path, v)
            assert len(param.layer) > 10, path


def test_mask_pads_follow_coverage():
    v = variables("vgg")
    for m in ("MASK", "MASK2", "MASK3"):
        size, dil = v[f"{m}_SIZE"], v[f"{m}_DILATION"]
        assert v[f"{m}_PAD"] == (size + (size - 1) * (dil - 1)) // 2


# ---- generated configs (models/segaware/make_segaware.py) ----------------------------------------
GENERATED = ["embs", "vgg", "res"]
KINDS = ["train", "test", "deploy"]


_CONFIGS = {}


def _configs():
    """make_segaware.configs(), generated once per session (res is ~22k lines per config)."""
    if not _CONFIGS:
        _CONFIGS.update(make_segaware.configs())
    return _CONFIGS


def distinct_variables(net):
    """Every placeholder a different value, so a placeholder in the wrong field cannot go unnoticed."""
    out = {}
    for i, (key, value) in enumerate(sorted(variables(net).items())):
        out[key] = f"s_{key}" if isinstance(value, str) else 101 + i
    out["SOLVER_MODE"] = "CPU"
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("net", GENERATED)
def test_generated_net_equals_original(net, kind):
    text = _configs()[f"{net}/{kind}.prototxt"]
    orig = REFERENCE / "segaware" / net / f"{kind}.prototxt"
    for v in (variables(net), distinct_variables(net)):
        assert_same_net(read_net(text, v), read_net(orig, v), f"{net}/{kind} with {v['NUM_LABELS']} labels")


@pytest.mark.parametrize("net", GENERATED)
def test_generated_solver_equals_original(net):
    text = _configs()[f"{net}/solver.prototxt"]
    for v in (variables(net), distinct_variables(net)):
        assert read_solver(text, v) == read_solver(REFERENCE / "segaware" / net / "solver.prototxt", v)


def test_committed_configs_are_generated():
    for name, text in make_segaware.configs().items():
        assert (ROOT / "models" / "segaware" / name).read_text() == text, \
            f"run models/segaware/make_segaware.py to regenerate {name}"


def test_templates_keep_placeholders():
    cfg = make_segaware.configs()
    assert "crop_size: ${CROP_SIZE}" in cfg["vgg/train.prototxt"]
    assert "${" not in cfg["vgg/deploy.prototxt"] and "${" not in cfg["embs/deploy.prototxt"]
    with pytest.raises(ValueError, match="CROP_SIZE"):
        read_net(cfg["embs/train.prototxt"], {})


def _deploy_at(net, size):
    """The deploy config with its fixed 321 input size (Input dims, Interp sizes, Tile counts) set to `size`."""
    param = read_net(make_segaware.configs()[f"{net}/deploy.prototxt"])
    for lp in param.layer:
        if lp.type == "Input":
            dims = lp.input_param.shape[0].dim
            if dims[2] == 321:
                dims[2:] = [size, size]
        elif lp.type == "Interp" and lp.interp_param.height == 321:
            lp.interp_param.height = lp.interp_param.width = size
        elif lp.type == "Tile" and lp.tile_param.tiles == 321:
            lp.tile_param.tiles = size
    return text_format.MessageToString(param)


def _image(size):
    rgb, labels = synthetic.make_sample(0, size, size)
    bgr = rgb[..., ::-1].astype(np.float32) - np.array(make_segaware.MEAN, np.float32)
    return bgr.transpose(2, 0, 1)[None], labels.astype(np.float32)[None, None]


def _random_weights(model, every_conv=False):
    """He-scaled conv weights (the originals leave them to a .caffemodel); by default only convs with a bias."""
    rng = np.random.RandomState(0)
    for blobs in model.params.values():
        if (len(blobs) == 2 or every_conv) and len(blobs[0].shape) == 4:
            w = blobs[0]
            w.data[...] = rng.randn(*w.shape) * np.sqrt(2.0 / np.prod(w.shape[1:]))


def test_vgg_deploy_runs_on_an_image():
    torch.manual_seed(0)
    size = 65
    model = Net(_deploy_at("vgg", size))
    assert model.blobs["emb"].shape == (1, 64, size, size)
    assert model.blobs["exp_emb_dist1_1_3chan"].shape == (1, 27, size, size)
    assert model.blobs["fc8_voc12"].shape == (1, 21, 9, 9)
    _random_weights(model)  # the original leaves most conv weights unfilled (zero) for a .caffemodel
    image, labels = _image(size)
    out = model.forward(data=image, label=labels)
    assert out["fc8_interp"].shape == (1, 21, 65, 65) and np.isfinite(out["fc8_interp"]).all()
    assert np.abs(out["fc8_interp"]).max() > 0


def test_embs_deploy_runs_on_an_image():
    torch.manual_seed(0)
    size = 33
    model = Net(_deploy_at("embs", size))
    image, labels = _image(size)
    pos = np.random.RandomState(0).rand(1, 3, 13, 13).astype(np.float32)
    out = model.forward(image_data=np.concatenate([image, labels], 1), pos_data=pos)
    assert model.blobs["weighted_avg"].shape == (1, 64, size, size)
    assert model.blobs["pos_dist_321x321"].shape == (1, 25, size, size)  # 5x5 window, 1x1 positions
    assert np.isfinite(out["loss_avg"]) and out["loss_avg"] > 0


@pytest.mark.parametrize("net", ["embs", "vgg"])
def test_train_config_runs_forward_backward(net, tmp_path):
    root = tmp_path / "VOC"
    synthetic.write_voc(root, 2, 73, 73, list_name="train")
    v = {**variables(net), "EXP": str(root), "TRAIN_SET": "train", "DATA_ROOT": f"{root}/", "CROP_SIZE": 65}
    param = read_net(ROOT / "models" / "segaware" / net / "train.prototxt", v)
    torch.manual_seed(0)
    model = Net(param, phase="train")
    _random_weights(model)
    assert model.blobs["data"].shape == (1, 3, 65, 65) and model.blobs["label"].shape == (1, 1, 65, 65)
    out = model.forward()
    losses = [k for k in out if k.startswith("loss")]
    # vgg's loss has no top: Caffe (and Net) give it an automatic one
    assert losses == (["loss (automatic)"] if net == "vgg" else ["loss_avg", "loss_avg2", "loss_avg3"])
    assert all(np.isfinite(out[k]) and out[k] > 0 for k in losses)
    model.backward()
    first = "emb1_1" if net == "vgg" else "conv1_1"
    grad = model.params[first][0].diff
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
    if net == "vgg":  # the affinity scales learn too
        assert model.params["weighted_emb_dist1_1"][0].diff.shape == ()


# ---- res: three-scale DeepLab-v2 ResNet-101 + NormConvMeanfield CRF ------------------------------
def _res_deploy_at(size):
    """res/deploy with its 513 input scaled down to `size` (= 8k+1): the 0.75/0.5 scale inputs, the
    fed-in 0.75 scores and the CRF's half-size xy grid follow."""
    scores = (size - 1) // 8 + 1
    quarter = (size - 1) // 4 + 1
    sizes = {513: size, 385: quarter + (quarter - 1) * 2, 257: (scores - 1) * 4 + 1, 65: scores}
    param = read_net(_configs()["res/deploy.prototxt"])
    for lp in param.layer:
        shape = lp.input_param.shape or lp.dummy_data_param.shape
        if lp.type in ("Input", "DummyData"):
            dims = shape[0].dim
            dims[2:] = [sizes[dims[2]]] * 2
    return text_format.MessageToString(param), sizes


def test_res_parameters_are_shared_across_scales():
    param = read_net(_configs()["res/deploy.prototxt"])
    names = {}
    for lp in param.layer:
        for spec in lp.param:
            if spec.name:
                names.setdefault(spec.name, []).append(lp.name)
    assert names["res4b22_branch2b_0"] == ["res4b22_branch2b", "res4b22_branch2b_res05", "res4b22_branch2b_res075"]
    assert names["fc1_voc12_c3_w"] == ["fc1_voc12_c3", "fc1_voc12_res05_c3", "fc1_voc12_res075_c3"]
    assert sum(lp.type == "Convolution" and not lp.convolution_param.bias_term for lp in param.layer) == 3 * 104


def test_res_deploy_runs_on_an_image():
    torch.manual_seed(0)
    size = 33
    text, sizes = _res_deploy_at(size)
    model = Net(text)
    scores, half = sizes[65], sizes[257]
    assert model.blobs["emb"].shape == (1, 64, size, size)
    assert model.blobs["res5c"].shape == (1, 2048, scores, scores)
    assert model.blobs["res5c_res05"].shape == (1, 2048, 3, 3)
    assert model.blobs["fc_fusion"].shape == (1, 21, scores, scores)
    assert model.blobs["crf"].shape == (1, 21, half, half)
    # shared weights: one blob object per name across the three scales
    assert np.shares_memory(model.params["conv1_res05"][0].data, model.params["conv1"][0].data)
    _random_weights(model, every_conv=True)
    vary_batchnorm(model)
    image, _ = _image(size)
    small = image[:, :, ::2, ::2].copy()
    r75 = sizes[385]
    mid = torch.nn.functional.interpolate(torch.from_numpy(image), size=(r75, r75), mode="bilinear",
                                          align_corners=True).numpy()
    out = model.forward(data=image, data_res05=small, data_res075=mid,
                        fc1_voc12_res075_interp=np.zeros((1, 21, scores, scores), np.float32))
    crf = out["crf_interp"]
    assert crf.shape == (1, 21, 2 * half - 1, 2 * half - 1) and np.isfinite(crf).all()
    assert np.abs(crf).max() > 0
    # the full forward ran its 312 Convolution -> BatchNorm -> Scale [-> ReLU] chains folded; a ranged one runs
    # every layer: each blob holds the same value (its last writer's) at the golden tolerances
    assert sum(isinstance(s.layer, FoldedConvolution) for _, s in model._full_indexed) == 312
    folded = {name: blob.data.copy() for name, blob in model.blobs.items()}
    model.forward(start=next(s.layer.name for s in model.steps if not s.is_input))
    for name, blob in model.blobs.items():
        assert_matches(folded[name], blob.data, RTOL, ATOL, f"res deploy blob {name!r}")


@pytest.fixture(scope="module")
def res_train(tmp_path_factory):
    """The res train net at crop 33 on a one-image synthetic VOC folder."""
    root = tmp_path_factory.mktemp("res") / "VOC"
    synthetic.write_voc(root, 1, 41, 41, list_name="train")
    v = {**variables("res"), "EXP": str(root), "TRAIN_SET": "train", "DATA_ROOT": f"{root}/", "CROP_SIZE": 33,
         "HALF_SIZE": 17}
    param = read_net(ROOT / "models" / "segaware" / "res" / "train.prototxt", v)
    torch.manual_seed(0)
    return Net(param, phase="train")


def test_res_train_builds(res_train):
    model = res_train
    assert model.blobs["data"].shape == (1, 3, 33, 33)
    assert model.blobs["data_res075"].shape == (1, 3, 25, 25)
    assert model.blobs["fc1_voc12_res075_interp"].shape == model.blobs["fc_fusion"].shape == (1, 21, 5, 5)
    assert model.blobs["fc1_voc12_res05"].shape == model.blobs["label_shrink16"].shape[:1] + (21, 3, 3)
    assert model.blobs["crf"].shape == (1, 21, 17, 17) and model.blobs["label_shrink2"].shape == (1, 1, 17, 17)
    assert np.shares_memory(model.params["res5c_branch2c_res075"][0].data, model.params["res5c_branch2c"][0].data)


def test_res_train_runs_forward_backward(res_train):
    """Three ResNet-101 trunks, the CRF and the losses at three label sizes, end to end (about 15 s)."""
    model = res_train
    _random_weights(model, every_conv=True)
    for layer in model.layer_modules:
        if layer.param.type == "BatchNorm":  # unit variance and scale factor instead of the unset zeros
            layer.blobs[1].data.fill_(1.0)
            layer.blobs[2].data.fill_(1.0)
    out = model.forward()
    losses = [k for k in out if k.startswith("loss")]
    # two layers are named "loss" in the original (on crf and on fc_fusion), plus one per scale
    assert len(losses) == 5 and all(np.isfinite(out[k]) and out[k] > 0 for k in losses)
    model.backward()
    grad = model.params["conv1"][0].diff
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
