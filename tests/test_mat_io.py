"""MatRead / MatWrite: the original's file layout (variable "data", W x H x C x N single), naming and counters."""
import numpy as np
import pytest
import scipy.io
import torch

from caffe_layers import Net
from caffe_layers.formats.matio import read_blob_mat, write_blob_mat


def test_layout_matches_matlab_column_major(tmp_path):
    blob = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    write_blob_mat(tmp_path / "a.mat", blob)
    mat = scipy.io.loadmat(tmp_path / "a.mat")["data"]
    assert mat.dtype == np.float32 and mat.shape == (5, 4, 3, 2)  # W, H, C, N
    assert mat[4, 1, 2, 1] == blob[1, 2, 1, 4]
    np.testing.assert_array_equal(read_blob_mat(tmp_path / "a.mat"), blob)


def test_read_errors(tmp_path):
    scipy.io.savemat(tmp_path / "d.mat", {"data": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="single"):
        read_blob_mat(tmp_path / "d.mat")
    scipy.io.savemat(tmp_path / "x.mat", {"other": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="'data' not present"):
        read_blob_mat(tmp_path / "x.mat")
    with pytest.raises(FileNotFoundError, match="missing.mat"):
        read_blob_mat(tmp_path / "missing.mat")


def _net(tmp_path, layer):
    return Net(f'name: "m" input: "x" input_shape {{ dim: 1 dim: 2 dim: 3 dim: 4 }} {layer}')


def test_write_names_period_and_no_overwrite(tmp_path):
    (tmp_path / "list.txt").write_text("img_a.jpg lab_a.png\nimg_b.jpg lab_b.png\nimg_c.jpg x\n")
    prefix = str(tmp_path / "out_")
    net = _net(tmp_path, f'layer {{ name: "w" type: "MatWrite" bottom: "x" mat_write_param {{ '
                         f'prefix: "{prefix}" source: "{tmp_path / "list.txt"}" strip: 4 period: 2 }} }}')
    (tmp_path / "out_img_c_blob_0.mat").write_bytes(b"keep")  # exists: the original skips it
    values = [np.full((1, 2, 3, 4), k, np.float32) for k in range(3)]
    for v in values:
        net.forward(x=v)
    np.testing.assert_array_equal(read_blob_mat(tmp_path / "out_img_a_blob_0.mat"), values[0])
    assert not (tmp_path / "out_img_b_blob_0.mat").exists()  # period 2
    assert (tmp_path / "out_img_c_blob_0.mat").read_bytes() == b"keep"
    net.forward(x=values[0])  # iteration 3: not a writing one, so no check (as the original)
    with pytest.raises(RuntimeError, match="lists only 3"):
        net.forward(x=values[0])


def test_write_without_source_uses_iter_names(tmp_path):
    prefix = str(tmp_path / "f_")
    net = _net(tmp_path, f'layer {{ name: "w" type: "MatWrite" bottom: "x" bottom: "x" '
                         f'mat_write_param {{ prefix: "{prefix}" }} }}')
    x = np.random.RandomState(0).randn(1, 2, 3, 4).astype(np.float32)
    net.forward(x=x)
    net.forward(x=x)
    for name in ("iter_0_blob_0", "iter_0_blob_1", "iter_1_blob_1"):
        np.testing.assert_array_equal(read_blob_mat(tmp_path / f"f_{name}.mat"), x)


def test_read_batches_and_wraps(tmp_path):
    rng = np.random.RandomState(1)
    blobs = {n: rng.randn(1, 3, 2, 5).astype(np.float32) for n in ("a", "b", "c")}
    for n, b in blobs.items():
        write_blob_mat(tmp_path / f"p_{n}_blob_0.mat", b)
    (tmp_path / "list.txt").write_text("a.png\nb.png\nc.png\n")
    net = Net(f'name: "r" layer {{ name: "r" type: "MatRead" top: "y" mat_read_param {{ '
              f'prefix: "{tmp_path}/p_" source: "{tmp_path / "list.txt"}" strip: 4 batch_size: 2 }} }}')
    assert net.blobs["y"].shape == (2, 3, 2, 5)
    y1 = net.forward()["y"].copy()
    y2 = net.forward()["y"].copy()
    np.testing.assert_array_equal(y1, np.concatenate([blobs["a"], blobs["b"]]))
    np.testing.assert_array_equal(y2, np.concatenate([blobs["c"], blobs["a"]]))  # wraps around


def test_read_shape_mismatch_is_an_error(tmp_path):
    write_blob_mat(tmp_path / "iter_0_blob_0.mat", np.zeros((1, 1, 2, 2), np.float32))
    write_blob_mat(tmp_path / "iter_1_blob_0.mat", np.zeros((1, 1, 3, 2), np.float32))
    net = Net(f'name: "r" layer {{ name: "r" type: "MatRead" top: "y" mat_read_param {{ prefix: "{tmp_path}/" }} }}')
    net.forward()
    with pytest.raises(ValueError, match="MatRead layer 'r'.*expected"):
        net.forward()


def test_roundtrip_through_nets_keeps_values_float64(tmp_path):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    write_blob_mat(tmp_path / "iter_0_blob_0.mat", x.numpy())
    net = Net(f'name: "r" layer {{ name: "r" type: "MatRead" top: "y" mat_read_param {{ prefix: "{tmp_path}/" }} }}')
    np.testing.assert_array_equal(net.forward()["y"], x.numpy().astype(np.float32))
