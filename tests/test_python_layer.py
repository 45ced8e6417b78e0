"""The Python layer: pycaffe-style user layers run inside the net, forward and backward."""
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden import make_layer  # noqa: E402

import caffe_layers as caffe  # noqa: E402

LAYERS = textwrap.dedent('''
    import numpy as np
    import caffe_layers as caffe

    class Scale(caffe.Layer):
        """top = k * bottom, k from param_str; records the calls it got."""
        def setup(self, bottom, top):
            self.k = float(self.param_str or 1)
            self.calls = ["setup"]
            if len(bottom) != 1:
                raise Exception("Scale needs one bottom")

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            self.calls.append("forward")
            top[0].data[...] = self.k * bottom[0].data

        def backward(self, top, propagate_down, bottom):
            self.calls.append(("backward", list(propagate_down)))
            if propagate_down[0]:
                bottom[0].diff[...] = self.k * top[0].diff

    class SquaredDistance:
        """A plain class (no base): top = sum((a - b)^2) / num / 2, as a loss."""
        def setup(self, bottom, top):
            pass

        def reshape(self, bottom, top):
            top[0].reshape(1)

        def forward(self, bottom, top):
            self.d = bottom[0].data - bottom[1].data
            top[0].data[...] = np.sum(self.d ** 2) / bottom[0].num / 2.0

        def backward(self, top, propagate_down, bottom):
            for i, sign in enumerate((1, -1)):
                if propagate_down[i]:
                    bottom[i].diff[...] = sign * top[0].diff[0] * self.d / bottom[i].num

    class Ramp(caffe.Layer):
        """A data layer: no bottoms, shape from param_str, a new ramp each forward."""
        def setup(self, bottom, top):
            self.shape = [int(s) for s in self.param_str.split(",")]
            self.n = 0

        def reshape(self, bottom, top):
            top[0].reshape(*self.shape)
            top[1].reshape(self.shape[0])

        def forward(self, bottom, top):
            self.n += 1
            top[0].data[...] = np.arange(top[0].count).reshape(top[0].shape) * self.n
            top[1].data[...] = self.phase

        def backward(self, top, propagate_down, bottom):
            pass

    class Failing(caffe.Layer):
        def setup(self, bottom, top):
            raise KeyError("no such thing")

    class Bias(caffe.Layer):
        """top = bottom + b, b a learnable blob of the layer (pycaffe's self.blobs.add_blob)."""
        def setup(self, bottom, top):
            self.blobs.add_blob(bottom[0].channels)
            self.blobs[0].data[...] = 0.5

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data + self.blobs[0].data

        def backward(self, top, propagate_down, bottom):
            self.blobs[0].diff[...] += top[0].diff.sum(axis=0)
            bottom[0].diff[...] = top[0].diff
''')


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "my_py_layers.py").write_text(LAYERS)
    yield tmp_path
    sys.modules.pop("my_py_layers", None)


def write_net(folder, body):
    path = folder / "net.prototxt"
    path.write_text('name: "py" force_backward: true\n'
                    'layer { name: "data" type: "Input" top: "x" top: "y" '
                    'input_param { shape { dim: 2 dim: 3 } } }\n' + body)
    return str(path)


def test_forward_backward_in_net(model_dir):
    path = write_net(model_dir, '''
layer { name: "s" type: "Python" bottom: "x" top: "sx"
        python_param { module: "my_py_layers" layer: "Scale" param_str: "3" } }
layer { name: "loss" type: "Python" bottom: "sx" bottom: "y" top: "loss" loss_weight: 2
        python_param { module: "my_py_layers" layer: "SquaredDistance" } }
''')
    net = caffe.Net(path, caffe.TEST)
    assert "my_py_layers" not in sys.path  # the folder is only on sys.path while building
    x, y = np.random.RandomState(0).randn(2, 2, 3).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = y
    out = net.forward()
    assert out["loss"].shape == (1,)
    assert np.allclose(out["loss"], ((3 * x - y) ** 2).sum() / 4, rtol=1e-5)
    net.backward()
    assert np.allclose(net.blobs["x"].diff, 2 * 3 * (3 * x - y) / 2, rtol=1e-5)
    assert np.allclose(net.blobs["y"].diff, -2 * (3 * x - y) / 2, rtol=1e-5)
    scale = net.layer_dict["s"].module.py
    assert scale.k == 3 and scale.phase == caffe.TEST
    assert scale.calls == ["setup", "forward", ("backward", [True])]


def test_propagate_down_false_reaches_the_layer(model_dir):
    path = write_net(model_dir, '''
layer { name: "s" type: "Python" bottom: "x" top: "sx" propagate_down: false
        python_param { module: "my_py_layers" layer: "Scale" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "sx" bottom: "y" top: "loss" }
''')
    net = caffe.Net(path, caffe.TRAIN)
    net.forward(x=np.ones((2, 3)), y=np.zeros((2, 3)))
    net.backward()
    assert (net.blobs["x"].diff == 0).all()
    assert net.layer_dict["s"].module.py.calls == ["setup", "forward"]


def test_python_data_layer(model_dir):
    path = model_dir / "data.prototxt"
    path.write_text('layer { name: "ramp" type: "Python" top: "r" top: "phase" '
                    'python_param { module: "my_py_layers" layer: "Ramp" param_str: "2,3" } }')
    net = caffe.Net(str(path), caffe.TRAIN)
    assert net.blobs["r"].shape == (2, 3) and net.blobs["r"].num == 2 and net.blobs["r"].channels == 3
    assert np.array_equal(net.forward()["r"], np.arange(6.0).reshape(2, 3))
    out = net.forward()
    assert np.array_equal(out["r"], 2 * np.arange(6.0).reshape(2, 3))
    assert np.array_equal(out["phase"], [caffe.TRAIN] * 2)


def test_gradcheck_through_python_layer(model_dir):
    sys.path.insert(0, str(model_dir))
    try:
        text = 'type: "Python" top: "t" python_param { module: "my_py_layers" layer: "Scale" param_str: "-1.5" }'
        layer = make_layer(text, [(2, 3)])
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))
        loss = make_layer('type: "Python" top: "l" python_param { module: "my_py_layers" '
                          'layer: "SquaredDistance" }', [(2, 3), (2, 3)])
        a, b = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(loss, (a.detach().requires_grad_(), b.detach().requires_grad_()))
    finally:
        sys.path.remove(str(model_dir))


def test_errors(model_dir):
    path = write_net(model_dir, 'layer { name: "p" type: "Python" bottom: "x" top: "z" '
                                'python_param { module: "no_such_module_here" layer: "X" } }')
    with pytest.raises(ImportError, match="'p'.*cannot import python_param.module 'no_such_module_here'"):
        caffe.Net(path, caffe.TEST)
    path = write_net(model_dir, 'layer { name: "p" type: "Python" bottom: "x" top: "z" '
                                'python_param { module: "my_py_layers" layer: "Missing" } }')
    with pytest.raises(ValueError, match="'p'.*has no class 'Missing'"):
        caffe.Net(path, caffe.TEST)
    path = write_net(model_dir, 'layer { name: "p" type: "Python" bottom: "x" bottom: "y" top: "z" '
                                'python_param { module: "my_py_layers" layer: "Scale" } }')
    with pytest.raises(Exception, match="'p'.*Scale needs one bottom") as raised:
        caffe.Net(path, caffe.TEST)
    assert raised.type is Exception  # the user's exception type goes through, as in Caffe


def test_user_exception_type_goes_through(model_dir):
    path = write_net(model_dir, 'layer { name: "p" type: "Python" bottom: "x" top: "z" '
                                'python_param { module: "my_py_layers" layer: "Failing" } }')
    with pytest.raises(KeyError, match="layer 'p' .*no such thing"):
        caffe.Net(path, caffe.TEST)


def test_backward_without_forward_runs_each_layer(model_dir):
    path = write_net(model_dir, '''
layer { name: "a" type: "Python" bottom: "x" top: "ax" python_param { module: "my_py_layers" layer: "Scale" param_str: "2" } }
layer { name: "b" type: "Python" bottom: "ax" top: "bx" python_param { module: "my_py_layers" layer: "Scale" param_str: "5" } }
''')
    net = caffe.Net(path, caffe.TRAIN)
    net.blobs["bx"].diff[...] = 3
    net.blobs["bx"].data[...] = 7  # a top's stored data is not recomputed by backward
    net.backward()
    assert (net.blobs["x"].diff == 30).all() and (net.blobs["ax"].diff == 15).all()
    assert (net.blobs["bx"].data == 7).all()
    assert net.layer_dict["a"].module.py.calls == ["setup", ("backward", [True])]  # no forward, as in Caffe
    net.backward()  # a second one reuses the graphs
    assert (net.blobs["x"].diff == 30).all()


def test_python_layer_parameters(model_dir):
    path = write_net(model_dir, '''
layer { name: "bias" type: "Python" bottom: "x" top: "bx" python_param { module: "my_py_layers" layer: "Bias" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "bx" bottom: "y" top: "loss" }
''')
    net = caffe.Net(path, caffe.TRAIN)
    assert list(net.params) == ["bias"] and net.params["bias"][0].shape == (3,)
    assert (net.params["bias"][0].data == 0.5).all()  # the setup's values, not refilled by the net
    x = np.arange(6.0).reshape(2, 3)
    net.forward(x=x, y=np.zeros((2, 3)))
    assert np.allclose(net.blobs["bx"].data, x + 0.5)
    net.backward()
    expected = (x + 0.5).sum(axis=0) / 2  # EuclideanLoss: diff / num, summed over the batch by Bias
    assert np.allclose(net.params["bias"][0].diff, expected)
    layer = net.layers[list(net._layer_names).index("bias")]
    assert np.allclose(layer.blobs[0].diff, expected)
    net.backward()  # the user's backward accumulates into the same diff
    assert np.allclose(net.params["bias"][0].diff, 2 * expected)
    net.clear_param_diffs()
    assert (net.layer_dict["bias"].module.py.blobs[0].diff == 0).all()
    # weights files and share_with carry them
    net.params["bias"][0].data[...] = [1, 2, 3]
    saved = str(model_dir / "w.caffemodel")
    net.save(saved)
    other = caffe.Net(path, caffe.TRAIN, weights=saved)
    assert np.array_equal(other.layer_dict["bias"].module.py.blobs[0].data, [1, 2, 3])
    third = caffe.Net(path, caffe.TRAIN)
    third.share_with(net)
    net.params["bias"][0].data[...] = [4, 5, 6]
    assert np.array_equal(third.layer_dict["bias"].module.py.blobs[0].data, [4, 5, 6])
