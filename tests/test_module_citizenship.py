"""TorchNet as an nn.Module: pickle, torch.save(module), deepcopy at any time, train()/eval() as Caffe's
TRAIN/TEST phase, forward at a new input size."""
import copy
import io
import pickle

import pytest
import torch

from caffe_layers.engine.graph import TorchNet
from caffe_layers.formats.proto import TEST, TRAIN
from test_export import STANDARD

PHASED = """
name: "phased"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" }
layer { name: "drop" type: "Dropout" bottom: "bn" top: "drop" dropout_param { dropout_ratio: 0.5 } }
"""


def _round_trips(net):
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    return [pickle.loads(pickle.dumps(net)), copy.deepcopy(net), torch.load(buffer, weights_only=False)]


def test_pickle_save_and_deepcopy_after_a_grad_forward():
    torch.manual_seed(0)
    net = TorchNet(STANDARD.replace("num_output: 6", 'num_output: 6 weight_filler { type: "gaussian" }'))
    x = torch.rand(2, 3, 16, 16)
    net(data=x)["prob"].sum().backward()  # grads on the parameters, autograd state in the layers
    expected = net(data=x)["prob"]
    for other in _round_trips(net):
        torch.testing.assert_close(other(data=x)["prob"], expected)
        assert list(other.state_dict()) == list(net.state_dict())


def test_train_eval_drive_caffe_phase():
    torch.manual_seed(0)
    net = TorchNet(PHASED, fold=False, keep_blobs=("bn",))
    with torch.no_grad():
        net.bn.blobs[0].fill_(0.5)  # mean sum, variance sum and scale factor 1: global mean 0.5, var 2
        net.bn.blobs[1].fill_(2.0)
        net.bn.blobs[2].fill_(1.0)
    x = torch.rand(4, 3, 6, 6)
    assert not net.training and net.phase == TEST
    test_out = net(data=x)
    conv = test_out["bn"] * (2.0 + net.bn.eps) ** 0.5 + 0.5
    torch.testing.assert_close(test_out["drop"], test_out["bn"])  # TEST: Dropout passes through (scale_train)
    saved = copy.deepcopy(net.state_dict())
    net.train()
    assert net.phase == TRAIN and all(layer.phase == TRAIN for layer in net.layer_modules)
    out = net(data=x)
    batch = (conv - conv.mean((0, 2, 3), keepdim=True))
    torch.testing.assert_close(out["bn"], batch / (batch.pow(2).mean((0, 2, 3), keepdim=True) + net.bn.eps).sqrt(),
                               rtol=1e-4, atol=1e-4)
    dropped = out["drop"] == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(out["drop"][~dropped], out["bn"][~dropped] * 2)
    assert not torch.equal(net.bn.blobs[2], saved["bn.2"])  # a TRAIN forward updates the moving averages
    net.eval()
    net.load_state_dict(saved)
    torch.testing.assert_close(net(data=x)["drop"], test_out["drop"])


def test_train_of_a_folded_net_refused():
    net = TorchNet(PHASED.replace('top: "bn" }', 'top: "bn" }\nlayer { name: "s" type: "Scale" bottom: "bn" top: "bn" }'))
    net.eval()
    assert any(n.target.__name__ == "folded_convolution" for n in net.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="fold=False"):
        net.train()
    TorchNet(PHASED, fold=False).train()  # unfolded: fine


FULLY_CONV = """
name: "fc"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "up" type: "Interp" bottom: "pool" top: "up" interp_param { zoom_factor: 2 } }
layer { name: "cat" type: "Concat" bottom: "conv" bottom: "data" top: "cat" }
"""


def test_forward_at_a_new_input_size():
    net = TorchNet(FULLY_CONV)
    for size in (12, 17, 30):
        x = torch.rand(2, 3, size, size + 3)
        tops = net(data=x)
        assert tops["cat"].shape == (2, 5, size, size + 3)
        torch.testing.assert_close(tops["cat"][:, 2:], x)
        pooled = [(s - 3 + 1) // 2 + 1 for s in (size, size + 3)]  # Caffe's ceil((s - 3) / 2) + 1
        assert tops["up"].shape == (2, 2) + tuple(2 * p - 1 for p in pooled)
