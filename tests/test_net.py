"""The net graph: filtering, in-place layers, fan-out, loss weights, shared params, errors, pycaffe use."""
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_layers as caffe
from caffe_layers.formats.prototxt import PrototxtError

HERE = Path(__file__).resolve().parent
INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'


def ip(name, bottom, top, n=3, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" }} '
            f'bias_filler {{ type: "gaussian" }} }} }}\n')


# ---- NetState filtering ------------------------------------------------------------------------
FILTERED = INPUT + '''
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "c" exclude { phase: TEST } }
layer { name: "stage_s" type: "ReLU" bottom: "x" top: "d" include { stage: "s" } }
layer { name: "stage_s_and_t" type: "ReLU" bottom: "x" top: "e" include { stage: "s" stage: "t" } }
layer { name: "not_stage_s" type: "ReLU" bottom: "x" top: "f" include { not_stage: "s" } }
layer { name: "level_1_2" type: "ReLU" bottom: "x" top: "g" include { min_level: 1 max_level: 2 } }
layer { name: "s_or_level3" type: "ReLU" bottom: "x" top: "h" include { stage: "s" } include { min_level: 3 } }
layer { name: "ex_stage_t" type: "ReLU" bottom: "x" top: "i" exclude { stage: "t" } }
'''


@pytest.mark.parametrize("phase, level, stages, kept", [
    ("train", 0, (), {"train_only", "not_test", "not_stage_s", "ex_stage_t"}),
    ("test", 0, (), {"test_only", "not_stage_s", "ex_stage_t"}),
    ("test", 0, ("s",), {"test_only", "stage_s", "s_or_level3", "ex_stage_t"}),
    ("test", 2, ("s", "t"), {"test_only", "stage_s", "stage_s_and_t", "level_1_2", "s_or_level3"}),
    ("test", 3, ("t",), {"test_only", "not_stage_s", "s_or_level3"}),
    ("test", 1, (), {"test_only", "not_stage_s", "level_1_2", "ex_stage_t"}),
])
def test_netstate_filtering(phase, level, stages, kept):
    net = caffe.Net(FILTERED, phase=phase, level=level, stages=stages)
    assert set(net._layer_names) - {"in"} == kept


def test_include_and_exclude_together_is_an_error():
    with pytest.raises(ValueError, match="'bad'.*both include and exclude"):
        caffe.Net(INPUT + 'layer { name: "bad" type: "ReLU" bottom: "x" top: "y" '
                  'include { phase: TEST } exclude { stage: "a" } }', caffe.TEST)


# ---- in-place, fan-out, propagate_down, force_backward -------------------------------------------
def test_in_place_layers():
    net = caffe.Net('force_backward: true\n' + INPUT + ip("fc", "x", "y") +
                    'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }\n'
                    'layer { name: "scale" type: "Power" bottom: "y" top: "y" power_param { scale: 3 } }',
                    caffe.TEST)
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    w, b = net.params["fc"][0].data, net.params["fc"][1].data
    out = net.forward(x=x)
    pre = x @ w.T + b
    assert list(out) == ["y"] and np.allclose(out["y"], 3 * np.maximum(pre, 0), atol=1e-6)
    assert np.allclose(net.blobs["y"].data, out["y"])
    net.blobs["y"].diff[...] = 1
    net.backward()
    assert np.allclose(net.blobs["x"].diff, (3 * (pre > 0)) @ w, atol=1e-6)


def test_blob_read_by_several_layers_sums_gradients():
    net = caffe.Net('force_backward: true\n' + INPUT +
                    'layer { name: "p1" type: "Power" bottom: "x" top: "a" power_param { scale: 2 } }\n'
                    'layer { name: "p2" type: "Power" bottom: "x" top: "b" power_param { scale: 5 } }\n'
                    'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "x" top: "c" }\n', caffe.TEST)
    net.forward(x=np.ones((2, 3)))
    net.blobs["b"].diff[...] = 1
    net.blobs["c"].diff[...] = 1
    grads = net.backward()
    assert np.allclose(grads["x"], 5 + 2 + 1)
    assert np.allclose(net.blobs["a"].diff, 1)


def test_propagate_down_false():
    text = ('force_backward: true\n' + INPUT + ip("fc1", "x", "h") +
            ip("fc2", "h", "y", extra="propagate_down: false") +
            'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "l" propagate_down: 1 '
            'propagate_down: 0 }')
    net = caffe.Net(text, caffe.TRAIN)
    net.forward(x=np.random.RandomState(1).randn(2, 3))
    net.backward()
    assert np.abs(net.params["fc2"][0].diff).sum() > 0  # its parameters still learn
    assert np.abs(net.params["fc1"][0].diff).sum() == 0 and np.abs(net.blobs["h"].diff).sum() == 0
    with pytest.raises(ValueError, match="'loss'.*propagate_down"):
        caffe.Net(text.replace("propagate_down: 0 ", ""), caffe.TRAIN)


@pytest.mark.parametrize("force", [False, True])
def test_force_backward(force):
    net = caffe.Net(f'force_backward: {str(force).lower()}\n' + INPUT + ip("fc", "x", "y") +
                    'layer { name: "loss" type: "Reduction" bottom: "y" top: "l" loss_weight: 1 }', caffe.TRAIN)
    net.forward(x=np.ones((2, 3)))
    net.backward()
    assert np.allclose(net.params["fc"][0].diff, 2)  # d sum(Wx + b) / dW = sum over the batch of x
    assert (np.abs(net.blobs["x"].diff).sum() > 0) == force


# ---- loss weights --------------------------------------------------------------------------------
def test_loss_weight_default_and_explicit():
    body = INPUT + 'layer { name: "in2" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 } } }\n'
    x, t = np.random.RandomState(2).randn(2, 2, 3)
    net = caffe.Net('force_backward: true\n' + body +
                    'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "l" }', caffe.TRAIN)
    net.forward(x=x, t=t)
    net.backward()
    assert np.allclose(net.blobs["x"].diff, (x - t) / 2, atol=1e-6)
    assert [s.loss_weights for s in net.steps][-1] == [1.0]
    net = caffe.Net('force_backward: true\n' + body +
                    'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "l" loss_weight: 3 }\n'
                    'layer { name: "r" type: "ReLU" bottom: "x" top: "rx" loss_weight: 0.5 }', caffe.TRAIN)
    values = net.run({"x": torch.tensor(x, dtype=torch.float32), "t": torch.tensor(t, dtype=torch.float32)})
    want = 3 * ((x - t) ** 2).sum() / 4 + 0.5 * np.maximum(x, 0).sum()
    assert net.loss(values).item() == pytest.approx(want, rel=1e-5)
    net.forward(x=x, t=t)
    net.backward()
    assert np.allclose(net.blobs["x"].diff, 3 * (x - t) / 2 + 0.5 * (x > 0), atol=1e-6)
    with pytest.raises(ValueError, match="'r': loss_weight must be given for each of its 1 tops"):
        caffe.Net(body + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" loss_weight: 1 loss_weight: 2 }',
                  caffe.TRAIN)


# ---- shared parameters ---------------------------------------------------------------------------
def test_shared_parameters_share_values_and_gradients():
    text = ('force_backward: true\n' + INPUT + ip("a", "x", "ya", extra='param { name: "w" } param { name: "b" }')
            + ip("b", "x", "yb", extra='param { name: "w" } param { name: "b" }'))
    net = caffe.Net(text, caffe.TRAIN)
    assert net.layer_dict["a"].module.blobs[0] is net.layer_dict["b"].module.blobs[0]
    assert len(net.param_specs) == 2
    net.forward(x=np.ones((2, 3)))
    net.blobs["ya"].diff[...] = 1
    net.blobs["yb"].diff[...] = 2
    net.backward()
    assert np.allclose(net.params["a"][0].diff, 2 * 1 + 2 * 2)  # both layers' gradients
    assert np.allclose(net.blobs["ya"].data, net.blobs["yb"].data)


def test_shared_parameter_shape_checks():
    strict = INPUT + ip("a", "x", "ya", 4, 'param { name: "w" }') + ip("b", "x", "yb", 2, 'param { name: "w" }')
    with pytest.raises(ValueError, match="'b'.*shared parameter 'w'"):
        caffe.Net(strict, caffe.TEST)
    same_count = (INPUT + ip("a", "x", "ya", 4, 'param { name: "w" }') +
                  'layer { name: "r" type: "Reshape" bottom: "x" top: "x4" '
                  'reshape_param { shape { dim: 2 dim: 3 dim: 1 dim: 1 } } }\n'
                  'layer { name: "b" type: "Convolution" bottom: "x4" top: "yb" param { name: "w" MODE } '
                  'convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }')
    with pytest.raises(ValueError, match="'b'.*shared parameter 'w' has shape \\[4, 3, 1, 1\\]"):
        caffe.Net(same_count.replace("MODE", ""), caffe.TEST)
    net = caffe.Net("force_backward: true\n" + same_count.replace("MODE", "share_mode: PERMISSIVE"), caffe.TRAIN)
    assert net.params["b"][0].shape == (4, 3, 1, 1) and len(net.param_specs) == 2
    x = np.random.RandomState(3).randn(2, 3)
    out = net.forward(x=x)
    assert np.allclose(out["yb"].reshape(2, 4), out["ya"] - net.params["a"][1].data, atol=1e-6)
    net.blobs["ya"].diff[...] = 1
    net.blobs["yb"].diff[...] = 1
    net.backward()
    assert np.allclose(net.params["a"][0].diff, 2 * x.sum(0)[None].repeat(4, 0), atol=1e-5)


# ---- errors --------------------------------------------------------------------------------------
def test_shape_error_names_the_layer_at_build_time():
    with pytest.raises(ValueError, match="layer 'cat' \\(Concat\\) with bottoms \\[x \\[2, 3\\], y \\[4, 5\\]\\]"):
        caffe.Net(INPUT + 'layer { name: "in2" type: "Input" top: "y" input_param { shape { dim: 4 dim: 5 } } }\n'
                  'layer { name: "cat" type: "Concat" bottom: "x" bottom: "y" top: "z" concat_param { axis: 0 } }',
                  caffe.TEST)
    with pytest.raises(ValueError, match="'r'.*unknown bottom blob 'nope'"):
        caffe.Net(INPUT + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }', caffe.TEST)


def test_unknown_type_lists_known_types():
    with pytest.raises(ValueError, match="layer 'q': unknown layer type 'Quux'.*Concat.*SoftmaxWithLoss"):
        caffe.Net(INPUT + 'layer { name: "q" type: "Quux" bottom: "x" top: "y" }', caffe.TEST)


def test_variable_substitution(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(INPUT + 'layer { name: "p" type: "Power" bottom: "x" top: "y"\n'
                    '        power_param { scale: ${SCALE} shift: ${SHIFT} } }\n')
    net = caffe.Net(str(path), caffe.TEST, variables={"SCALE": 2, "SHIFT": 1})
    assert np.allclose(net.forward(x=np.ones((2, 3)))["y"], 3)
    with pytest.raises(PrototxtError, match=f"{path}:3: \\$\\{{SHIFT\\}} is not set"):
        caffe.Net(str(path), caffe.TEST, variables={"SCALE": 2})


def test_parse_error_names_file_line_column(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text(INPUT + 'layer { name: "r" type: "ReLU"\n  bottom: "x" tpo: "y" }\n')
    with pytest.raises(PrototxtError, match=f"{path}:3:15.*tpo"):
        caffe.Net(str(path), caffe.TEST)


# ---- parameters and the pycaffe interface ---------------------------------------------------------
def test_state_dict_keys():
    net = caffe.Net(INPUT + ip("fc", "x", "h") + 'layer { name: "r" type: "ReLU" bottom: "h" top: "h" }\n'
                    + ip("fc2", "h", "y", 2), caffe.TEST)
    sd = net.state_dict()
    assert list(sd) == ["fc.0", "fc.1", "fc2.0", "fc2.1"] and sd["fc2.0"].shape == (2, 3)
    other = caffe.Net(INPUT + ip("fc", "x", "h") + ip("fc2", "h", "y", 2), caffe.TEST)
    other.load_state_dict(sd)
    for key in sd:
        layer, i = key.split(".")
        assert np.array_equal(other.params[layer][int(i)].data, net.params[layer][int(i)].data)
    x = np.abs(np.random.RandomState(4).randn(2, 3))
    w, b = net.params["fc"][0].data, net.params["fc"][1].data
    h = np.maximum(x @ w.T + b, 0)
    assert np.allclose(net.forward(x=x)["y"], h @ net.params["fc2"][0].data.T + net.params["fc2"][1].data, atol=1e-5)
    with pytest.raises(KeyError, match="missing \\['fc2.1'\\]"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "fc2.1"})


def test_pycaffe_script(capsys):
    runpy.run_path(str(HERE / "pycaffe_example.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    loss = float(lines[0].split()[1])
    assert np.isfinite(loss) and loss > 0
    assert lines[1].startswith("conv1 [(4, 3, 3, 3), (4,)]") and lines[2].startswith("score [(3, 4, 1, 1), (3,)]")
    assert float(lines[1].split()[-1]) > 0


def test_loss_layer_without_top_gets_an_automatic_one():
    text = ('name: "t" input: "x" input_shape { dim: 2 dim: 3 } input: "y" input_shape { dim: 2 dim: 3 } '
            'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" }')
    net = caffe.Net(text)
    out = net.forward(x=np.ones((2, 3)), y=np.zeros((2, 3)))
    assert net.top_names["loss"] == ["loss (automatic)"]
    assert float(out["loss (automatic)"]) == pytest.approx(1.5)  # sum of squares / (2N)
