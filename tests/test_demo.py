"""The segmentation-aware demo on the shipped weights, the synthetic data generator, and a short
training run of the embs train config on generated data."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caffe_layers.training import synthetic
from caffe_layers.tools.cli import main as cli_main
from caffe_layers.tools.demo import OUTPUTS, run_demo
from golden import make_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_demo_embs  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    figures = run_demo(out, log=lines.append)
    return out, figures, lines


def test_demo_masks_follow_region_boundaries(demo):
    _, f, lines = demo
    assert f["mask_inside"] > 0.05, f
    assert f["mask_across"] < 0.2 * f["mask_inside"], f
    assert any("same region" in line and "across a boundary" in line for line in lines)


def test_demo_filtering_sharpens_the_blurry_map_at_boundaries(demo):
    _, f, _ = demo
    assert f["boundary_error_filtered"] < 0.9 * f["boundary_error_blurry"], f


def test_demo_writes_the_pictures(demo):
    out, f, _ = demo
    size = Image.open(out / "input.png").size
    for name in OUTPUTS:
        img = Image.open(out / name)
        assert img.mode == "RGB", name
        if name != "masks.png":
            assert img.size == size, name
    assert np.asarray(Image.open(out / "embeddings_pca.png")).std() > 10  # not a flat picture
    assert f["seconds"] < 60


def test_demo_masks_near_and_away_from_boundaries(demo):
    _, f, _ = demo
    labels = np.asarray(Image.open(Path(train_demo_embs.DEMO_DATA) / "sample_labels.png"))
    from caffe_layers.tools.demo import boundary
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~boundary(labels))
    d = [dist[p] for p in f["pixels"]]
    assert min(d[:2]) > 8 and max(d[2:]) <= 2, d


def test_demo_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "masks.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path)
    assert cli_main(["demo", "-o", str(tmp_path)]) == 1
    assert "masks.png" in capsys.readouterr().err
    assert (tmp_path / "masks.png").read_bytes() == b"mine"


def test_demo_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sample.png"):
        run_demo(tmp_path / "out", data=tmp_path)


def test_synthetic_is_deterministic_and_regions_differ():
    a, la = synthetic.make_sample(7, 48, 40)
    b, lb = synthetic.make_sample(7, 48, 40)
    c, _ = synthetic.make_sample(8, 48, 40)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (48, 40, 3) and a.dtype == np.uint8 and la.shape == (48, 40)
    ids = np.unique(la)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # contiguous region ids
    for seed in range(5):
        img, lab = synthetic.make_sample(seed, 64, 64)
        stats = [np.concatenate([img[lab == r].mean(0), img[lab == r].std(0)]) for r in np.unique(lab)]
        for i in range(len(stats)):
            for j in range(i):
                assert np.abs(stats[i] - stats[j]).max() > 5, (seed, i, j)  # colour or texture differs


def test_synthetic_errors():
    with pytest.raises(ValueError, match="at least 8x8"):
        synthetic.make_sample(0, 4, 4)
    with pytest.raises(ValueError, match="regions"):
        synthetic.make_sample(0, 16, 16, regions=(0, 3))


def test_write_voc_feeds_the_data_layers(tmp_path):
    list_file = synthetic.write_voc(tmp_path, 3, 20, 24, seed=5)
    assert list_file.read_text().splitlines()[1] == "JPEGImages/00001.png SegmentationClass/00001.png"
    text = (f'type: "TwoImageData" top: "data" top: "label" image_data_param {{ source: "{list_file}" '
            f'root_folder: "{tmp_path}/" batch_size: 3 }}')
    data, label = make_layer(text, [], "TEST", dtype=torch.float32)()
    for i in range(3):
        img, lab = synthetic.make_sample(5 + i, 20, 24)
        np.testing.assert_array_equal(data[i].numpy(), img[:, :, ::-1].transpose(2, 0, 1))
        np.testing.assert_array_equal(label[i, 0].numpy(), lab)


def test_embs_train_config_trains_with_falling_loss(tmp_path):
    from caffe_layers.training.solver import Solver

    config = train_demo_embs.find_config()
    synthetic.write_voc(tmp_path, 1, 25, 25, seed=0)  # one image, no crop: only the mirror varies
    variables = train_demo_embs.embs_variables(tmp_path, 25)
    solver = Solver(train_demo_embs.solver_param(config, 1e-3, 8, display=0), variables)
    losses = []
    solver.callbacks.append(lambda s, loss: losses.append(loss))
    solver.solve()
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6, losses
    # the demo's deploy net (the embedding part of the same config) takes the trained weights
    deploy = train_demo_embs.deploy_net(config, variables, 25)
    assert deploy.layer[0].type == "Input" and deploy.layer[-1].top[0] == "weighted_avg"
    assert {lp.type for lp in deploy.layer}.isdisjoint({"TwoImageData", "DistLoss", "Im2parity"})
