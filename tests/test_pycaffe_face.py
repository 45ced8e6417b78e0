"""The pycaffe face: caffe_layers.pycaffe's names, `caffe-layers run`, the solver classes, Classifier,
Detector, coord_map and draw."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import caffe_layers
import caffe_layers.pycaffe as caffe
from caffe_layers.formats import caffe_pb2 as generated
from caffe_layers.pycaffe import draw
from caffe_layers.pycaffe.coord_map import (AxisMismatchException, compose, coord_map_from_to, crop,
                                            inverse)
from caffe_layers.tools.cli import main

L, P = caffe.layers, caffe.params

# the names python/caffe/__init__.py of BVLC Caffe defines
PYCAFFE_NAMES = {"Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                 "AdamSolver", "NCCL", "Timer", "init_log", "log", "set_mode_cpu", "set_mode_gpu", "set_device",
                 "Layer", "get_solver", "layer_type_list", "set_random_seed", "solver_count", "set_solver_count",
                 "solver_rank", "set_solver_rank", "set_multiprocess", "has_nccl", "__version__", "TRAIN", "TEST",
                 "Classifier", "Detector", "io", "layers", "params", "NetSpec", "to_proto"}


def test_exactly_pycaffes_names():
    assert set(caffe.__all__) == PYCAFFE_NAMES
    for name in PYCAFFE_NAMES:
        assert getattr(caffe_layers, name) is getattr(caffe, name), name
    for name in ("register_layer", "known_types", "TRAIN", "TEST", "Net", "Layer"):  # the names it had
        assert hasattr(caffe_layers, name)
    assert caffe.proto.caffe_pb2 is generated and caffe_layers.proto.caffe_pb2 is generated
    assert (caffe.TRAIN, caffe.TEST) == (generated.TRAIN, generated.TEST)
    assert caffe.has_nccl() is False
    types = caffe.layer_type_list()
    assert types == sorted(types) and {"Data", "Convolution", "Python", "Im2dist"} <= set(types)
    with pytest.raises(RuntimeError, match="has_nccl"):
        caffe.NCCL(None, b"")
    timer = caffe.Timer()
    timer.start()
    timer.stop()
    assert timer.ms >= 0
    caffe.set_solver_count(2)
    assert caffe.solver_count() == 2
    caffe.set_solver_count(1)


SCRIPT = r'''
import json, sys
import caffe
import caffe.io
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2
import caffe.draw
from caffe.coord_map import coord_map_from_to
import caffe_layers.pycaffe, caffe_layers.formats.caffe_pb2
report = dict(argv=sys.argv, name=__name__,
              caffe=caffe is caffe_layers.pycaffe, io=caffe.io is caffe_layers.pycaffe.io,
              pb2=caffe_pb2 is caffe_layers.formats.caffe_pb2, draw=caffe.draw is caffe_layers.pycaffe.draw,
              layers=L is caffe_layers.pycaffe.layers, pooling_max=P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX,
              spec=caffe.__spec__.name, io_spec=caffe.io.__spec__.name)
try:
    import caffe.no_such_module
except ImportError as err:
    report["missing"] = type(err).__name__
json.dump(report, open(sys.argv[1], "w"))
sys.exit(int(sys.argv[2]))
'''


def test_run_script_with_caffe_alias(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    assert main(["run", str(script), str(out), "3"]) == 3  # the script's exit status
    report = json.loads(out.read_text())
    assert report.pop("argv") == [str(script), str(out), "3"]
    assert report == dict(name="__main__", caffe=True, io=True, pb2=True, draw=True, layers=True, pooling_max=True,
                          spec="caffe_layers.pycaffe", io_spec="caffe_layers.pycaffe.io",
                          missing="ModuleNotFoundError")
    assert "caffe" not in sys.modules and not any(type(f).__name__ == "CaffeAlias" for f in sys.meta_path)
    with pytest.raises(ImportError):
        import caffe  # noqa: F401  (the alias is installed by `run` only)


def test_run_module(tmp_path, monkeypatch):
    (tmp_path / "my_pycaffe_main.py").write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-m", "my_pycaffe_main", "out.json", "0"]) == 0  # found on the working directory
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["caffe"] and report["argv"][1:] == ["out.json", "0"] and report["name"] == "__main__"
    assert main(["run"]) == 2


def test_run_shows_a_scripts_error_as_python_does(tmp_path, capsys):
    script = tmp_path / "bad.py"
    script.write_text("import caffe\ndef f():\n    raise ValueError('boom')\nf()\n")
    assert main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().endswith("ValueError: boom")
    assert "bad.py\", line 4" in err and "runpy" not in err and "run.py" not in err


# ---- coord_map --------------------------------------------------------------------------------------
def conv_pool_deconv(pad=0, pool=2, dstride=2, dpad=0):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 40, 40]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool)
    n.deconv = L.Deconvolution(n.pool, convolution_param=dict(num_output=2, kernel_size=2 * dstride,
                                                              stride=dstride, pad=dpad))
    return n


def test_coord_maps_by_hand():
    n = conv_pool_deconv()
    # deconv (a=2, b=1.5) after pool (a=1/2, b=-1/4) after conv (a=1, b=-1): the identity
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, 0)
    padded = conv_pool_deconv(pad=3)
    assert coord_map_from_to(padded.deconv, padded.data)[2].tolist() == [-3]  # conv padding shifts by -pad
    axis, a, b = coord_map_from_to(n.pool, n.data)
    assert (axis, a.tolist(), b.tolist()) == (1, [2.0], [1.5])  # pool pixel i sits over data pixel 2i+1.5
    assert compose((None, 1, 0), (2, 3, 1)) == (2, 3, 1) and inverse((1, 2.0, 1.0)) == (1, 0.5, -0.5)
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=4)
    assert coord_map_from_to(n.crop, n.data)[2].tolist() == [4]
    n.ip = L.InnerProduct(n.deconv, num_output=3)
    with pytest.raises(RuntimeError, match="connected by spatial layers"):
        coord_map_from_to(n.ip, n.data)


def test_crop_helper_builds_a_net_whose_crop_fits(tmp_path):
    n = conv_pool_deconv(pad=2)  # 40 -> 42 -> 21 -> 44: the crop must take 2 off the top and left
    n.crop = crop(n.deconv, n.data)
    proto = n.to_proto()
    assert proto.layer[-1].crop_param.axis == 2 and list(proto.layer[-1].crop_param.offset) == [2]
    path = tmp_path / "net.prototxt"
    path.write_text(str(proto))
    assert caffe.Net(str(path), caffe.TEST).blobs["crop"].shape == (1, 2, 40, 40)
    for spec, message in ((conv_pool_deconv(pool=3), "scale mismatch"), (conv_pool_deconv(dpad=6), "negative offset")):
        with pytest.raises(AssertionError, match=message):
            crop(spec.deconv, spec.data)


# ---- solvers --------------------------------------------------------------------------------------
NET = """name: "tiny" layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 } data_filler { type: "gaussian" }
                     data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture
def solver_file(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path}/net.prototxt" type: "Adam" base_lr: 0.1 lr_policy: "fixed" '
                    f'max_iter: 6 display: 0 test_iter: 1 test_interval: 3 snapshot_prefix: "{tmp_path}/s" '
                    f'random_seed: 3\n')
    return str(path)


def test_solver_classes_and_get_solver(solver_file):
    sgd = caffe.SGDSolver(solver_file)  # the class decides the method, as in pycaffe
    assert sgd._solver.type == "SGD" and len(sgd._solver.history) == 2
    adam = caffe.get_solver(solver_file)
    assert isinstance(adam, caffe.AdamSolver) and adam._solver.type == "Adam" and len(adam._solver.history) == 4
    for cls in (caffe.NesterovSolver, caffe.AdaGradSolver, caffe.RMSPropSolver, caffe.AdaDeltaSolver):
        assert cls(solver_file)._solver.type == cls.solver_type and issubclass(cls, caffe.SGDSolver)
    adam.solve()
    assert adam.iter == adam.max_iter == 6 and adam.lr == pytest.approx(0.1)


def test_test_nets_share_the_trained_weights(solver_file):
    solver = caffe.SGDSolver(solver_file)
    train, test = solver.net, solver.test_nets[0]
    assert not np.array_equal(train.params["ip"][0].data, test.params["ip"][0].data)  # apart until a test
    solver.step(1)  # tests at iteration 0, which shares the weights (Caffe's ShareTrainedLayersWith)
    solver.step(1)  # no test here: the test net sees the update all the same
    np.testing.assert_array_equal(train.params["ip"][0].data, test.params["ip"][0].data)
    test.params["ip"][0].data[0, 0] = 7.0  # the same memory
    assert train.params["ip"][0].data[0, 0] == 7.0
    other = caffe.Net(str(solver_file).replace("solver", "net"), caffe.TEST)
    solver.share_weights(other)
    np.testing.assert_array_equal(other.params["ip"][0].data, train.params["ip"][0].data)
    wrong = caffe.Net(str(solver_file).replace("solver", "net"), caffe.TEST)
    next(m for m in wrong.layer_modules if m.name == "ip").blobs[0].data = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="cannot share param 0 weights from layer 'ip'; shape mismatch"):
        solver.share_weights(wrong)


def test_apply_update_callbacks_snapshot_restore(solver_file, tmp_path):
    solver = caffe.SGDSolver(solver_file)
    weights = solver.net.params["ip"][0]
    weights.data[...] = 0
    weights.diff[...] = 1
    solver.apply_update()
    np.testing.assert_allclose(weights.data, -0.1)
    seen = []
    solver.add_callback(lambda: seen.append(("start", weights.data.copy())),
                        lambda: seen.append(("gradients", weights.data.copy())))
    solver.step(2)
    assert [k for k, _ in seen] == ["start", "gradients"] * 2
    np.testing.assert_array_equal(seen[0][1], seen[1][1])  # no update between forward and on_gradients
    assert not np.array_equal(seen[1][1], seen[2][1])  # the update comes after on_gradients
    solver.snapshot()
    assert (tmp_path / "s_iter_2.caffemodel").exists() and (tmp_path / "s_iter_2.solverstate").exists()
    saved = weights.data.copy()
    solver.step(1)
    again = caffe.SGDSolver(solver_file)
    again.restore(str(tmp_path / "s_iter_2.solverstate"))
    assert again.iter == 2
    np.testing.assert_array_equal(again.net.params["ip"][0].data, saved)


def test_param_diff_view_holds_the_update_after_step(solver_file):
    solver = caffe.SGDSolver(solver_file)
    blob = solver.net.params["ip"][0]
    diff = blob.diff  # taken before the step: the same memory after it
    before = blob.data.copy()
    solver.step(1)
    np.testing.assert_allclose(diff, before - blob.data, rtol=1e-5, atol=1e-7)
    assert np.abs(diff).max() > 0


def test_set_random_seed_repeats_fillers(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    caffe.set_random_seed(5)
    a = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN).params["ip"][0].data.copy()
    caffe.set_random_seed(5)
    b = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN).params["ip"][0].data.copy()
    np.testing.assert_array_equal(a, b)


# ---- Classifier, Detector, forward_all --------------------------------------------------------------
DEPLOY = """name: "cls" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: %d dim: 3
dim: 4 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def deploy(tmp_path):
    """(prototxt with batch 2, caffemodel, weights W, bias)."""
    rng = np.random.RandomState(0)
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY % 2)
    net = caffe.Net(str(path), caffe.TEST)
    w, bias = rng.randn(3, 48).astype(np.float32), rng.randn(3).astype(np.float32)
    net.params["ip"][0].data[...] = w
    net.params["ip"][1].data[...] = bias
    net.save(str(tmp_path / "w.caffemodel"))
    return str(path), str(tmp_path / "w.caffemodel"), w, bias


def test_forward_all_batches_and_drops_the_padding(deploy):
    model, weights, w, bias = deploy
    net = caffe.Net(model, weights, caffe.TEST)
    x = np.random.RandomState(1).randn(5, 3, 4, 4).astype(np.float32)  # 2 + 2 + 1 (padded) items
    out = caffe.pycaffe.forward_all(net, blobs=["ip"], data=x)
    assert set(out) == {"prob", "ip"} and out["prob"].shape == (5, 3)
    np.testing.assert_allclose(out["ip"], x.reshape(5, -1) @ w.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["prob"], softmax(out["ip"]), rtol=1e-5, atol=1e-6)


def test_forward_backward_all(deploy, tmp_path):
    model, weights, w, bias = deploy
    path = tmp_path / "fb.prototxt"
    path.write_text("force_backward: true\n" + open(model).read())
    net = caffe.Net(str(path), weights, caffe.TEST)
    rng = np.random.RandomState(3)
    x, top_diff = rng.randn(3, 3, 4, 4).astype(np.float32), rng.randn(3, 3).astype(np.float32)
    outs, diffs = caffe.pycaffe.forward_backward_all(net, data=x, prob=top_diff)
    data = torch.tensor(x, requires_grad=True)
    prob = torch.softmax(data.reshape(3, -1) @ torch.tensor(w).T + torch.tensor(bias), 1)
    prob.backward(torch.tensor(top_diff))
    np.testing.assert_allclose(outs["prob"], prob.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["data"], data.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_classifier_center_crop_and_oversample(deploy):
    model, weights, w, bias = deploy
    classifier = caffe.Classifier(model, weights, image_dims=(6, 6), raw_scale=2.0)
    images = [np.random.RandomState(i).rand(6, 6, 3).astype(np.float32) for i in range(2)]

    def expected(crops):
        return softmax(np.stack([(2.0 * c.transpose(2, 0, 1)).ravel() @ w.T + bias for c in crops]))

    center = classifier.predict(images, oversample=False)
    np.testing.assert_allclose(center, expected([im[1:5, 1:5] for im in images]), rtol=1e-5, atol=1e-6)
    corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for i, im in enumerate(images):
        crops = [im[y:y + 4, x:x + 4] for y, x in corners]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_allclose(classifier.predict(images)[i], expected(crops).mean(0), rtol=1e-5, atol=1e-6)


def test_detector_windows_and_context_pad(deploy, tmp_path):
    model, weights, w, bias = deploy
    rgb = np.random.RandomState(2).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    windows = [np.array([0, 0, 4, 4]), np.array([2, 3, 6, 7])]
    detector = caffe.Detector(model, weights)
    found = detector.detect_windows([(str(tmp_path / "im.png"), windows)])
    image = rgb.astype(np.float32) / 255
    assert [d["filename"] for d in found] == [str(tmp_path / "im.png")] * 2
    for d, (y0, x0, y1, x1) in zip(found, windows):
        crop_ = image[y0:y1, x0:x1].transpose(2, 0, 1).ravel()
        np.testing.assert_allclose(d["prediction"], softmax(crop_ @ w.T + bias), rtol=1e-5, atol=1e-6)
    padded = caffe.Detector(model, weights, mean=np.full(3, 0.5, np.float32), context_pad=1)
    assert tuple(padded.crop_dims) == (4, 4, 3)
    out = padded.crop(image, np.array([0, 0, 3, 3]))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0], 0.5)  # above the image: the mean


# ---- draw -------------------------------------------------------------------------------------------
DRAW_NET = """name: "d" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 }
  include { phase: TRAIN } }
"""


def test_pydot_graph_and_labels():
    from google.protobuf import text_format
    import pydot

    net = text_format.Parse(DRAW_NET, generated.NetParameter())
    conv = net.layer[1]
    assert draw.get_layer_label(conv, "LR") == r'"conv\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1"'
    assert draw.get_layer_label(conv, "TB", display_lrm=True) == \
        '"conv (Convolution) kernel size: 3 stride: 2 pad: 1 lr mult: 1.0, 2.0"'
    assert draw.get_layer_label(net.layer[3], "TB") == '"pool (Pooling AVE) kernel size: 2 stride: 1 pad: 0"'
    assert draw.get_edge_label(conv) == "4" and draw.get_edge_label(net.layer[2]) == '""'
    assert draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
    assert draw.choose_color_by_layertype("Pooling") == "#FF9900"
    with pytest.raises(ValueError, match="ReLU layers do not have a learning rate multiplier"):
        draw.get_layer_lr_mult(net.layer[2])
    graph = draw.get_pydot_graph(net, "LR", phase=generated.TEST)
    assert isinstance(graph, pydot.Dot)
    names = {n.get_name() for n in graph.get_nodes()}
    assert "pool" not in str(names) and r'"conv\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1"' in names
    assert len(graph.get_edges()) == 5  # Input->data, data->conv, conv->conv blob, conv blob->relu->conv blob
    source = draw.draw_net(net, "LR", ext="raw").decode()
    assert source.startswith("digraph d {") and source == draw.get_pydot_graph(net, "LR").to_string()


def test_draw_net_to_file_without_graphviz(tmp_path, monkeypatch):
    from google.protobuf import text_format

    net = text_format.Parse(DRAW_NET, generated.NetParameter())
    monkeypatch.setattr(shutil, "which", lambda name: None)  # as where Graphviz is not installed
    draw.draw_net_to_file(net, str(tmp_path / "net.png"))
    assert (tmp_path / "net.png").read_bytes()[:4] == b"\x89PNG"
    draw.draw_net_to_file(net, str(tmp_path / "net.svg"), phase=generated.TRAIN)
    assert b"<svg" in (tmp_path / "net.svg").read_bytes()[:400]
    with pytest.raises(ValueError, match="Graphviz's `dot` is not installed.*format 'bmp'"):
        draw.draw_net_to_file(net, str(tmp_path / "net.bmp"))
    assert not (tmp_path / "net.bmp").exists()
