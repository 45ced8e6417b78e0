"""`caffe-layers export`: ONNX that onnxruntime runs with no custom-op library gives our numbers; .pt2 round trip."""
import re

import numpy as np
import onnxruntime
import pytest
import torch

from caffe_layers import native
from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.cli import main
from caffe_layers.tools.export import example_inputs, export_onnx, export_pt2
from caffe_layers.tools.reference import fill_net_hash

STANDARD = """
name: "standard"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "pool1" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

SPN = """
name: "spn"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 7 } } }
layer { name: "g" type: "Input" top: "g" input_param { shape { dim: 1 dim: 6 dim: 6 dim: 7 } } }
layer { name: "gates" type: "Slice" bottom: "g" top: "g1" top: "g2" top: "g3" slice_param { axis: 1 } }
layer { name: "t1" type: "TanH" bottom: "g1" top: "g1" }
layer { name: "rnn" type: "GateRecurrent2dnoind" bottom: "x" bottom: "g1" bottom: "g2" bottom: "g3" top: "h"
        gaterecurrent2dnoind_param { horizontal: true reverse: false } }
layer { name: "rnn2" type: "GateRecurrent2dnoind" bottom: "h" bottom: "g1" bottom: "g2" bottom: "g3" top: "v"
        gaterecurrent2dnoind_param { horizontal: false reverse: true } }
"""


def small(path, sizes):
    """A config's text with its Input dims (and Interp sizes) replaced, in one pass."""
    with open(path) as f:
        return re.sub(r": (\d+)\n", lambda m: f": {sizes.get(m.group(1), m.group(1))}\n", f.read())


def check_onnx(net, path):
    fill_net_hash(net)  # not zeros
    inputs = example_inputs(net)
    export_onnx(net, path, inputs)
    with torch.no_grad(), native.disabled():
        expected = net(**inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert set(names) == {b for b in net.outputs if b not in net.inputs}
    for name, got in zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})):
        want = expected[name].numpy()
        scale = max(float(np.abs(want).max()), 1e-6)
        assert np.abs(got - want).max() <= 1e-4 * scale, f"{name}: {np.abs(got - want).max()} vs scale {scale}"
    return session, expected


@pytest.mark.parametrize("config", ["embs", "vgg"])
def test_onnx_segaware_deploy(config, tmp_path):
    check_onnx(TorchNet(small(f"models/segaware/{config}/deploy.prototxt", {"321": "41"}), fuse=False),
               tmp_path / "net.onnx")


def test_onnx_spn(tmp_path):
    check_onnx(TorchNet(SPN), tmp_path / "net.onnx")


def test_onnx_standard_dynamic_batch_and_refusal(tmp_path):
    path = tmp_path / "net.onnx"
    net = TorchNet(STANDARD)
    session, _ = check_onnx(net, path)
    x = torch.rand(5, 3, 16, 16)  # another batch size (InnerProduct fixes the spatial size)
    got = session.run(None, {"data": x.numpy()})[0]
    with torch.no_grad(), native.disabled():
        np.testing.assert_allclose(got, net(data=x)["prob"].numpy(), rtol=1e-4, atol=1e-6)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(net, path)
    assert path.read_bytes() == before


def test_cli_export_onnx_and_pt2(tmp_path, capsys):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(STANDARD.replace("num_output: 6", "num_output: 6 weight_filler { type: \"gaussian\" }"))
    onnx_path, pt2_path = tmp_path / "net.onnx", tmp_path / "net.pt2"
    assert main(["export", str(prototxt), "-o", str(onnx_path)]) == 0
    assert onnx_path.exists() and "wrote" in capsys.readouterr().out
    assert main(["export", str(prototxt), "-o", str(onnx_path)]) != 0  # exists, no --force
    assert main(["export", str(prototxt), "-o", str(onnx_path), "--force"]) == 0
    assert main(["export", str(prototxt), "--format", "pt2", "-o", str(pt2_path)]) == 0
    assert torch.export.load(str(pt2_path)).module()(data=torch.rand(2, 3, 16, 16))["prob"].shape == (2, 5)


def test_pt2_round_trip(tmp_path):
    net = TorchNet(small("models/segaware/embs/deploy.prototxt", {"321": "41"}), fuse=False)
    fill_net_hash(net)
    path = tmp_path / "net.pt2"
    export_pt2(net, path)
    loaded = torch.export.load(str(path)).module()
    inputs = example_inputs(net, batch=3)  # the batch axis is dynamic
    with torch.no_grad(), native.disabled():
        expected = net(**inputs)
    got = loaded(**inputs)
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value)
