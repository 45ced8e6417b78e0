"""The explicit passes (engine/explicit.py): Caffe's Forward/Backward without autograd for nets whose every
layer has one, checked against the autograd path (the reference) blob for blob and weight for weight."""
import h5py
import numpy as np
import pytest
import torch

from caffe_layers.engine import explicit
from caffe_layers.engine.net import Net
from caffe_layers.formats.proto import TRAIN, pb
from caffe_layers.layers import register
from caffe_layers.training.data import DataLayer
from caffe_layers.training.solver import Solver


def write_data(folder, rows=30, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    y = rng.integers(0, classes, rows).astype(np.float32)
    with h5py.File(folder / "d.h5", "w") as f:
        f["data"], f["label"] = x, y
    (folder / "list.txt").write_text(f"{folder / 'd.h5'}\n" * 2)
    return x, y


def logreg(folder, extra="", ip="", loss=""):
    return f"""name: "logreg" force_backward: false
    layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
             hdf5_data_param {{ source: "{folder / 'list.txt'}" batch_size: 7 }} }}
    layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
             inner_product_param {{ num_output: 5 weight_filler {{ type: "xavier" }}
                                    bias_filler {{ type: "uniform" min: -1 max: 1 }} {ip} }} }}
    layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
             inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
    layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" {loss} }}
    {extra}"""


def autograd_only(monkeypatch):
    monkeypatch.setattr(explicit, "supports", lambda net: False)


def pycaffe_pass(net, times=2):
    """forward + backward `times` times; every blob's data and diff and every parameter diff after it."""
    for _ in range(times):
        net.forward()
        net.backward()
    blobs = {n: (b.data.copy(), b.diff.copy()) for n, b in net.blobs.items()}
    params = {n: [(p.data.copy(), p.diff.copy()) for p in ps] for n, ps in net.params.items()}
    return blobs, params


def assert_same(ours, reference, rtol=1e-6, atol=1e-7):
    if isinstance(reference, dict):
        assert ours.keys() == reference.keys()
        for k in reference:
            assert_same(ours[k], reference[k], rtol, atol)
    elif isinstance(reference, (list, tuple)):
        for a, b in zip(ours, reference):
            assert_same(a, b, rtol, atol)
    else:
        np.testing.assert_allclose(ours, reference, rtol=rtol, atol=atol)


VARIANTS = [
    {},
    {"ip": "transpose: true"},
    {"ip": "bias_term: false"},
    {"loss": 'loss_weight: 0.5 loss_param { ignore_label: 1 normalization: BATCH_SIZE }'},
    {"extra": 'layer { name: "loss2" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss2" '
              'top: "prob2" loss_weight: 2 loss_weight: 0 }'},  # ip1 read by two layers
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "transpose", "no-bias", "ignore-label", "shared-blob"])
def test_pycaffe_forward_backward_equal_autograd(tmp_path, monkeypatch, variant):
    write_data(tmp_path)
    text = logreg(tmp_path, **variant)
    torch.manual_seed(0)
    net = Net(text, phase=TRAIN)
    assert net.explicit_passes() is not None
    ours = pycaffe_pass(net)
    monkeypatch.setattr(explicit, "supports", lambda net: False)
    torch.manual_seed(0)
    reference = Net(text, phase=TRAIN)
    assert reference.explicit_passes() is None
    assert_same(ours, pycaffe_pass(reference))


def test_ranged_backward_and_force_backward(tmp_path, monkeypatch):
    write_data(tmp_path)
    text = logreg(tmp_path).replace("force_backward: false", "force_backward: true")

    def run():
        torch.manual_seed(1)
        net = Net(text, phase=TRAIN)
        net.forward()
        net.backward(start="loss", end="ip2")  # ip1's diff comes from ip2 only; ip1's parameters get none
        return {n: b.diff.copy() for n, b in net.blobs.items()}, [p.diff.copy() for p in net.params["ip1"]]

    ours = run()
    autograd_only(monkeypatch)
    assert_same(ours, run())
    assert not ours[1][0].any()


def test_solver_equals_autograd_after_seeded_iterations(tmp_path, monkeypatch):
    write_data(tmp_path)
    (tmp_path / "net.prototxt").write_text(logreg(tmp_path))
    text = (f'train_net: "{tmp_path / "net.prototxt"}" test_net: "{tmp_path / "net.prototxt"}" test_iter: 3 '
            f'test_interval: 4 base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 '
            f'stepsize: 5 max_iter: 11 display: 3 random_seed: 7 snapshot_after_train: false')

    def solve():
        from google.protobuf import text_format

        solver = Solver(text_format.Parse(text, pb.SolverParameter()))
        losses = []
        solver.callbacks.append(lambda s, loss: losses.append(loss))
        solver.solve()
        blobs = {n: solver.net.blobs[n].data.copy() for n in ("data", "ip2", "loss", "accuracy")}
        return (losses, blobs, {n: [(p.data.copy(), p.diff.copy()) for p in ps]
                                for n, ps in solver.net.params.items()})

    ours = solve()
    autograd_only(monkeypatch)
    reference = solve()
    assert_same(ours[0], reference[0])
    assert_same(ours[2], reference[2])
    # the blobs hold the last iteration's values (the autograd path writes them back at the end); the
    # explicit path's final display forward leaves the batch after it, as Caffe's does
    assert ours[1]["data"].shape == reference[1]["data"].shape


def test_test_nets_run_explicitly_and_share_weights(tmp_path):
    write_data(tmp_path)
    (tmp_path / "net.prototxt").write_text(logreg(tmp_path))
    param = pb.SolverParameter(train_net=str(tmp_path / "net.prototxt"), test_net=[str(tmp_path / "net.prototxt")],
                               test_iter=[2], test_interval=100, base_lr=0.1, lr_policy="fixed", max_iter=3)
    solver = Solver(param)
    solver.step(3)
    net = solver.test_nets[0]
    means = solver.test(0)
    assert net.explicit_passes() is not None
    assert net.params["ip1"][0].data.ctypes.data == solver.net.params["ip1"][0].data.ctypes.data
    # the test net's blobs hold its last batch: the fourth (two at iteration 0, two here)
    x, _ = write_data(tmp_path)
    np.testing.assert_array_equal(net.blobs["data"].data, x[21:28])
    assert 0 <= means["accuracy"][0] <= 1


def test_nets_the_explicit_passes_do_not_cover_use_autograd(tmp_path):
    write_data(tmp_path)
    in_place = logreg(tmp_path).replace('layer { name: "accuracy"',
                                        'layer { name: "relu" type: "ReLU" bottom: "ip2" top: "ip2" }\n'
                                        '    layer { name: "accuracy"')
    net = Net(in_place, phase=TRAIN)
    assert net.explicit_passes() is None
    net.forward()
    net.backward()
    assert net.params["ip1"][0].diff.any()


_SHAPES = [(3, 4), (5, 4), (5, 4), (2, 4)]


@register("_ExplicitTestData")
class VaryingBatches(DataLayer):
    """Test-only data layer whose batches change size: 3, 5, 5, 2, 3, ... rows of 4 features, labels 0/1."""

    prefetch = 0

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        self.shapes, self.count = [_SHAPES[0], _SHAPES[0][:1]], 0

    def load_batch(self):
        shape = _SHAPES[self.count % len(_SHAPES)]
        self.count += 1
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 10 - self.count
        return x, (np.arange(shape[0]) % 2).astype(np.float32)


def test_a_batch_of_another_shape_reshapes_the_blobs():
    text = """layer { name: "data" type: "_ExplicitTestData" top: "data" top: "label" }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""

    net = Net(text, phase=TRAIN)
    assert net.explicit_passes() is not None
    w, b = (torch.from_numpy(p.data.copy()) for p in net.params["ip"])
    for shape in _SHAPES:
        net.forward()
        net.backward()
        assert net.blobs["data"].shape == shape and net.blobs["ip"].shape == (shape[0], 2)
        x = torch.from_numpy(net.blobs["data"].data.copy())
        ip = (x @ w.T + b).requires_grad_()
        loss = torch.nn.functional.cross_entropy(ip, torch.from_numpy(net.blobs["label"].data).long())
        loss.backward()
        np.testing.assert_allclose(net.blobs["ip"].data, ip.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(float(net.blobs["loss"].data), loss.item(), rtol=1e-6)
        np.testing.assert_allclose(net.blobs["ip"].diff, ip.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", ["Accuracy", "SoftmaxWithLoss"])
def test_labels_out_of_range_are_one_clear_error(tmp_path, layer):
    x, y = write_data(tmp_path, classes=3)
    with h5py.File(tmp_path / "d.h5", "a") as f:
        f["label"][3] = 3.0
    text = f"""layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
               hdf5_data_param {{ source: "{tmp_path / 'list.txt'}" batch_size: 7 }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "check" type: "{layer}" bottom: "ip" bottom: "label" top: "out" }}"""
    net = Net(text, phase=TRAIN)
    with pytest.raises(ValueError, match=r"layer 'check': labels must lie in \[0, 3\)"):
        net.forward()


@pytest.mark.parametrize("path", ["explicit", "autograd"])
def test_hdf5_rows_in_file_order_are_never_written_through(tmp_path, monkeypatch, path):
    x, _ = write_data(tmp_path, rows=14)
    if path == "autograd":
        autograd_only(monkeypatch)
    for _ in range(2):
        net = Net(logreg(tmp_path), phase=TRAIN)
        net.forward(start="data", end="data")
        net.blobs["data"].data[...] = 99  # a pycaffe script writing into the batch it was given
        layer = net.layer_modules[0]
        np.testing.assert_array_equal(layer.arrays[0], x)
        batch = layer.forward()[0]
        batch += 1  # an in-place layer after the data layer in the autograd path
        np.testing.assert_array_equal(layer.arrays[0], x)
