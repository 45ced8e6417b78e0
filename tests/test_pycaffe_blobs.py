"""The pycaffe face keeps Caffe's blob semantics: persistent views, ranged forward/backward, diffs as Caffe
sets and accumulates them, and no autograd graph where Caffe would not backpropagate."""
import numpy as np
import pytest

import caffe_layers as caffe

NET = """name: "tiny" {force}
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: 2 dim: 4 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip" top: "ip" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip" top: "out"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 1 }} }} }}
{loss}
"""
LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" top: "loss" }'


def make(force=False, loss=True):
    return caffe.Net(NET.format(force="force_backward: true" if force else "", loss=LOSS if loss else ""),
                     caffe.TRAIN)


def feed(net, seed=0):
    rng = np.random.RandomState(seed)
    net.blobs["data"].data[...] = rng.randn(2, 3)
    net.blobs["label"].data[...] = rng.randn(2, 4)


def test_views_stay_the_blob():
    net = make()
    data, out, wdiff = net.blobs["data"].data, net.blobs["out"].data, net.params["ip"][0].diff
    for seed in (0, 1):
        feed(net, seed)
        net.forward()
        assert np.array_equal(out, net.blobs["out"].data)  # a view taken before forward is the blob after it
        net.backward()
    assert np.shares_memory(data, net.blobs["data"].data)
    assert np.abs(wdiff).sum() > 0 and np.array_equal(wdiff, net.params["ip"][0].diff)


def test_param_diffs_accumulate_until_cleared_and_backward_twice():
    net = make()
    feed(net)
    net.forward()
    net.backward()
    once = net.params["ip2"][0].diff.copy()
    net.backward()  # the graph of the last forward is kept: a second backward works and accumulates
    np.testing.assert_allclose(net.params["ip2"][0].diff, 2 * once, rtol=1e-6)
    net.clear_param_diffs()
    assert not net.params["ip2"][0].diff.any()


def test_loss_top_diff_is_its_weight_and_bottom_diffs_are_set():
    net = make()
    feed(net)
    net.forward()
    assert net.blobs["loss"].diff == pytest.approx(1.0)
    net.backward()
    first = net.blobs["out"].diff.copy()
    net.backward()
    np.testing.assert_allclose(net.blobs["out"].diff, first)  # bottom diffs are overwritten, not summed
    expected = (net.blobs["out"].data - net.blobs["label"].data) / 2  # EuclideanLoss: diff / num
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    assert not net.blobs["data"].diff.any()  # no force_backward: Caffe computes no input diff


def test_ranged_forward_and_backward():
    net = make(force=True, loss=False)
    feed(net)
    net.forward(end="relu")
    assert not net.blobs["out"].data.any()  # ip2 has not run
    hidden = net.blobs["ip"].data.copy()
    out = net.forward(start="ip2")
    w = net.params["ip2"][0].data
    np.testing.assert_allclose(out["out"], hidden @ w.T + net.params["ip2"][1].data, rtol=1e-5, atol=1e-6)
    net.blobs["out"].diff[...] = 1
    net.backward(start="ip2", end="ip2")
    np.testing.assert_allclose(net.blobs["ip"].diff, np.ones((2, 4)) @ w, rtol=1e-5)
    assert not net.blobs["data"].diff.any()  # the range stopped above ip
    grads = net.backward()
    relu_mask = hidden > 0
    np.testing.assert_allclose(grads["data"], ((np.ones((2, 4)) @ w) * relu_mask) @ net.params["ip"][0].data,
                               rtol=1e-5, atol=1e-6)


def test_no_graph_where_caffe_would_not_backpropagate():
    deploy = make(loss=False)
    feed(deploy)
    deploy.forward()
    assert deploy._graphs == {}  # no loss and no force_backward: nothing to differentiate, nothing kept
    deploy.blobs["out"].diff[...] = 1
    deploy.backward()
    assert not deploy.params["ip"][0].diff.any()
    trained = make()
    feed(trained)
    trained.forward()
    assert len(trained._graphs) == 4


def test_layer_views():
    net = make()
    assert [layer.type for layer in net.layers] == ["Input", "Input", "InnerProduct", "ReLU", "InnerProduct",
                                                   "EuclideanLoss"]
    ip = net.layer_dict["ip"]
    assert ip.type == "InnerProduct" and len(ip.blobs) == 2
    weight = ip.blobs[0]
    assert weight.shape == (4, 3) and weight.count == 12 and weight.num == 4 and weight.channels == 3
    assert np.shares_memory(weight.data, net.params["ip"][0].data)
    assert net.blobs["ip"].num == 2 and net.blobs["ip"].channels == 4


def test_backward_without_forward_uses_the_current_blobs():
    net = make(force=True, loss=False)
    feed(net)
    net.blobs["out"].diff[...] = 1
    grads = net.backward(start="ip2", end="ip2")  # no forward ever: ip2's Backward on the stored blobs
    assert list(grads) == ["ip"]  # pycaffe returns the bottoms of `end`
    np.testing.assert_allclose(grads["ip"], np.ones((2, 4)) @ net.params["ip2"][0].data, rtol=1e-5)
    assert not net.blobs["out"].data.any()  # the stored top is not recomputed
    np.testing.assert_allclose(net.params["ip2"][1].diff, [2] * 4)
    net.blobs["data"].reshape(5, 3)  # a reshape drops the graphs: the next backward works at the new shape
    net.blobs["out"].diff[...] = 1
    assert net.backward()["data"].shape == (5, 3)


def test_pycaffe_constructor_forms_and_hdf5(tmp_path):
    net = make()
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET.format(force="", loss=LOSS))
    binary, h5 = str(tmp_path / "w.caffemodel"), str(tmp_path / "weights")  # save_hdf5 needs no suffix
    net.save(binary)
    net.save_hdf5(h5)
    with open(h5, "rb") as f:
        assert f.read(8) == b"\x89HDF\r\n\x1a\n"
    forms = [caffe.Net(str(proto), caffe.TRAIN, weights=binary), caffe.Net(str(proto), binary, caffe.TRAIN),
             caffe.Net(str(proto), weights=binary, phase=caffe.TRAIN)]
    loaded = caffe.Net(str(proto), caffe.TRAIN)
    loaded.load_hdf5(h5)
    for other in forms + [loaded]:
        assert other.phase == caffe.TRAIN
        for name in net.params:
            for mine, theirs in zip(net.params[name], other.params[name]):
                assert np.array_equal(mine.data, theirs.data)
    with pytest.raises(TypeError, match="at most"):
        caffe.Net(str(proto), binary, caffe.TRAIN, None, 1)
