"""The train configs under models/ as torch modules in TRAIN: torch.compile(fullgraph=True) captures the whole
training forward (losses included) and autograd through it gives the eager net's losses and gradients. A data
layer that reads files (TwoImageData, FloData, SPN's Python layer) becomes an Input layer of its tops, at small
sizes; the deploy configs are tests/test_export.py::test_compile_fullgraph_deploy."""
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_layers.engine.graph import TorchNet
from caffe_layers.formats.prototxt import read_net
from caffe_layers.formats.proto import pb
from caffe_layers.tools.reference import fill_net_hash
from test_export import small
from test_segaware_models import variables

ROOT = Path(__file__).resolve().parents[1]
CROP = 33


def with_inputs(param, layer_name, shapes):
    """`param` with its layer `layer_name` replaced by an Input layer of the same tops at `shapes`."""
    index = [lp.name for lp in param.layer].index(layer_name)
    replacement = pb.LayerParameter(name=layer_name, type="Input", top=param.layer[index].top)
    for dims in shapes:
        replacement.input_param.shape.add(dim=dims)
    param.layer[index].CopyFrom(replacement)
    return text_format.MessageToString(param)


def segaware_train(net):
    param = read_net(ROOT / "models" / "segaware" / net / "train.prototxt",
                     {**variables(net), "CROP_SIZE": CROP, "HALF_SIZE": (CROP - 1) // 2 + 1})
    assert param.layer[0].type == "TwoImageData" and list(param.layer[0].top) == ["data", "label"]
    return with_inputs(param, "data", [[1, 3, CROP, CROP], [1, 1, CROP, CROP]])


def parsed(text):
    return text_format.Parse(text, pb.NetParameter())


TRAIN = {  # name: (the net's text, the label count of its "label" input)
    "embs": (lambda: segaware_train("embs"), 21),
    "vgg": (lambda: segaware_train("vgg"), 21),
    "flownet": (lambda: with_inputs(parsed(small("models/segaware/flownet/flownet_segaware_train.prototxt",
                                                 {"384": "64", "512": "128"})), "flow_gt", [[1, 2, 64, 128]]), 0),
    "spn_voc": (lambda: with_inputs(parsed((ROOT / "models/spn/voc_rnn_vgg_v3.prototxt").read_text()), "data",
                                    [[1, 24, 32, 32], [1, 1, 32, 32]]), 21),
}  # (sss_train is not here: SSSMetricLoss samples a data-dependent number of pixels, which fullgraph refuses)


@pytest.mark.parametrize("net", TRAIN)
def test_train_config_compiles_fullgraph_with_the_eager_gradients(net):
    text, labels = TRAIN[net]
    model = TorchNet(text(), phase="train")
    fill_net_hash(model)
    rng = np.random.default_rng(0)
    inputs = {name: torch.from_numpy((rng.integers(0, labels, shape) if name == "label" else
                                      rng.standard_normal(shape)).astype(np.float32))
              for name, shape in ((name, model.blob_shapes[name]) for name in model.inputs)}
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
    for key, grad in eager_grads.items():  # the golden whole-net rule: summation orders differ in deep nets
        error, scale = float((compiled_grads[key] - grad).abs().max()), float(grad.abs().max())
        assert error <= 1e-5 + 1e-3 * scale, f"{net} {key}: gradient error {error:g}, largest {scale:g}"
