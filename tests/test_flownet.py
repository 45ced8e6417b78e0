"""FlowNet variant: .flo reader, FloData, EPELoss, the segaware FlowNetS config."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_layers import Net
from caffe_layers.formats.flo import read_flo, write_flo
from tests.golden import gradcheck_layer, make_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "segaware" / "flownet"))
from make_flownet import make_net  # noqa: E402


def test_flo_round_trip_and_layout(tmp_path):
    flow = np.random.RandomState(0).randn(2, 3, 5).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    raw = (tmp_path / "a.flo").read_bytes()
    assert raw[:4] == b"PIEH" and np.frombuffer(raw[4:12], "<i4").tolist() == [5, 3]
    # interleaved (u, v) per pixel, row by row
    np.testing.assert_array_equal(np.frombuffer(raw[12:20], "<f4"), flow[:, 0, 0])
    np.testing.assert_array_equal(read_flo(tmp_path / "a.flo"), flow)


def test_flo_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.flo"):
        read_flo(tmp_path / "missing.flo")
    (tmp_path / "bad.flo").write_bytes(np.array([1.0, 0, 0], "<f4").tobytes())
    with pytest.raises(ValueError, match="magic"):
        read_flo(tmp_path / "bad.flo")
    write_flo(tmp_path / "t.flo", np.zeros((2, 4, 4), np.float32))
    (tmp_path / "t.flo").write_bytes((tmp_path / "t.flo").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_flo(tmp_path / "t.flo")
    (tmp_path / "s.flo").write_bytes(b"PIEH")
    with pytest.raises(ValueError, match="too short"):
        read_flo(tmp_path / "s.flo")


def test_flodata_layer(tmp_path):
    flows = [np.full((2, 3, 4), i, np.float32) for i in range(3)]
    for i, f in enumerate(flows):
        write_flo(tmp_path / f"{i}.flo", f)
    (tmp_path / "list.txt").write_text("0.flo 1.flo\n2.flo\n")  # every token is a file, as the original
    (tmp_path / "n.prototxt").write_text(
        f'layer {{ name: "d" type: "FloData" top: "flow" image_data_param {{ source: "{tmp_path}/list.txt" '
        f'root_folder: "{tmp_path}/" batch_size: 2 }} }}')
    n = Net(str(tmp_path / "n.prototxt"), phase="train")
    n.forward()
    np.testing.assert_array_equal(n.blobs["flow"].data, np.stack(flows[:2]))
    n.forward()
    np.testing.assert_array_equal(n.blobs["flow"].data, np.stack([flows[2], flows[0]]))


EPE = 'type: "EPELoss" bottom: "p" bottom: "g" top: "l" l1_loss_param {{ {} }}'


def test_epe_loss_values():
    p = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    g = torch.tensor([[[[3.0, 0]], [[4.0, 0]]], [[[0.0, 6]], [[0.0, 8]]]], dtype=torch.float64)
    assert make_layer(EPE.format("epsilon: 0"), [p.shape, g.shape])(p, g).item() == pytest.approx(15 / 2)
    # default epsilon 0.01 sits inside the root; NaN ground truth counts as 0 difference
    g[1, :, 0, 0] = float("nan")
    eps = float(np.float32(0.01))
    expect = (np.sqrt(25 + eps) + np.sqrt(eps) + np.sqrt(eps) + np.sqrt(100 + eps)) / 2
    assert make_layer(EPE.format(""), [p.shape, g.shape])(p, g).item() == pytest.approx(expect)
    # normalize_by_num_entries: divide by the non-NaN entries / channels (6 / 2) instead of N
    by = make_layer(EPE.format("normalize_by_num_entries: true"), [p.shape, g.shape])(p, g).item()
    assert by == pytest.approx(expect * 2 / 3)
    # plateau: locations with |d| < plateau cost sqrt(eps) only
    g2 = torch.tensor([[[[0.5, 3]], [[0.0, 4]]]], dtype=torch.float64)
    pl = make_layer(EPE.format("plateau: 1 epsilon: 0"), [(1, 2, 1, 2)] * 2)(torch.zeros_like(g2), g2).item()
    assert pl == pytest.approx(5.0)


@pytest.mark.parametrize("extra", ["", "l2_prescale_by_channels: true", "plateau: 0.5"])
def test_epe_loss_gradcheck(extra):
    gradcheck_layer(EPE.format(extra), [(2, 2, 3, 4), (2, 2, 3, 4)])


def test_epe_loss_errors():
    with pytest.raises(ValueError, match="EPELoss"):
        make_layer(EPE.format(""), [(1, 2, 3, 4), (1, 2, 3, 5)])


@pytest.mark.parametrize("train", [False, True])
def test_flownet_config_forward_backward(tmp_path, train):
    write_flo(tmp_path / "a.flo", np.random.RandomState(1).randn(2, 64, 64).astype(np.float32))
    (tmp_path / "flow_list.txt").write_text(f"{tmp_path}/a.flo\n")
    net = make_net(64, 64, train)
    types = [layer.type for layer in net.layer]
    assert types.count("NormConv") == 2
    bil = [layer for layer in net.layer if layer.name == "predict_flow2"][0]
    assert bil.type == "NormConv" and bil.convolution_param.kernel_size == [9]
    for layer in net.layer:
        if layer.type == "FloData":
            layer.image_data_param.source = str(tmp_path / "flow_list.txt")
    net.force_backward = not train  # a deploy net has no loss: Caffe backpropagates only when forced
    (tmp_path / "n.prototxt").write_text(str(net))
    n = Net(str(tmp_path / "n.prototxt"), phase="train" if train else "test")
    rng = np.random.RandomState(0)
    n.forward(img0=rng.rand(1, 3, 64, 64).astype(np.float32), img1=rng.rand(1, 3, 64, 64).astype(np.float32))
    if train:
        assert np.isfinite(n.blobs["flow_loss2"].data) and n.blobs["flow_gt2"].data.shape == (1, 2, 16, 16)
    else:
        assert n.blobs["flow"].data.shape == (1, 2, 64, 64)
        n.blobs["flow"].diff[...] = 1
    n.backward()
    for layer in ("conv1", "emb", "predict_flow2_sa"):
        g = n.params[layer][0].diff
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, layer
