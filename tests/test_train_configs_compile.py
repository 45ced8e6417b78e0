"""The segaware train configs under models/ (embs, vgg: the ones the project trains) as torch modules in TRAIN:
torch.compile(fullgraph=True) captures the whole training forward (losses included) and autograd through it
gives the eager net's gradients. The data layer (TwoImageData, which reads VOC files) becomes an Input layer of
its tops at a small crop; the deploy configs are tests/test_export.py::test_compile_fullgraph_deploy."""
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_layers.engine.graph import TorchNet
from caffe_layers.formats.prototxt import read_net
from caffe_layers.formats.proto import pb
from caffe_layers.tools.reference import fill_net_hash
from test_segaware_models import variables

ROOT = Path(__file__).resolve().parents[1]
CROP = 33


def train_net_text(net):
    param = read_net(ROOT / "models" / "segaware" / net / "train.prototxt",
                     {**variables(net), "CROP_SIZE": CROP, "HALF_SIZE": (CROP - 1) // 2 + 1})
    data = param.layer[0]
    assert data.type == "TwoImageData" and list(data.top) == ["data", "label"]
    replacement = pb.LayerParameter(name="data", type="Input", top=["data", "label"])
    replacement.input_param.shape.add(dim=[1, 3, CROP, CROP])
    replacement.input_param.shape.add(dim=[1, 1, CROP, CROP])
    data.CopyFrom(replacement)
    return text_format.MessageToString(param)


@pytest.mark.parametrize("net", ["embs", "vgg"])
def test_train_config_compiles_fullgraph_with_the_eager_gradients(net):
    model = TorchNet(train_net_text(net), phase="train")
    fill_net_hash(model)
    rng = np.random.default_rng(0)
    inputs = {"data": torch.from_numpy(rng.standard_normal((1, 3, CROP, CROP)).astype(np.float32)),
              "label": torch.from_numpy(rng.integers(0, 21, (1, 1, CROP, CROP)).astype(np.float32))}
    losses = [b for b, w in model.plan.top_weights() if w]
    assert losses

    def run(module):
        model.zero_grad()
        torch.manual_seed(0)  # vgg's Dropout draws the same masks in both runs
        tops = module(**inputs)
        total = sum(tops[b] * w for b, w in model.plan.top_weights() if w)
        total.backward()
        return {b: tops[b].detach() for b in losses}, {k: p.grad.clone() for k, p in model.named_parameters()
                                                       if p.grad is not None}

    eager_tops, eager_grads = run(model)
    compiled_tops, compiled_grads = run(torch.compile(model, fullgraph=True, backend="eager"))
    assert eager_grads and compiled_grads.keys() == eager_grads.keys()
    for blob, value in eager_tops.items():
        torch.testing.assert_close(compiled_tops[blob], value, rtol=1e-5, atol=1e-6)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[key], grad, rtol=1e-4, atol=1e-6)
