"""NetSpec (pycaffe's caffe.NetSpec / caffe.layers / caffe.params) builds NetParameters that Net runs."""
import numpy as np
import pytest
from google.protobuf import text_format

import caffe_layers as caffe
from caffe_layers import layers as L, params as P
from caffe_layers.formats.proto import pb


def lenet(batch):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch, 1, 12, 12]), dict(dim=[batch, 1, 1, 1])],
                                  data_filler=[dict(type="gaussian"), dict(type="constant", value=1)], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=8, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=3, param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)],
                           weight_filler=dict(type="gaussian", std=0.5))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label, loss_weight=0.5)
    return n.to_proto()


def test_lenet_proto_and_net():
    proto = lenet(2)
    assert [l.name for l in proto.layer] == ["data", "conv1", "pool1", "ip1", "relu1", "ip2", "loss"]
    assert list(proto.layer[0].top) == ["data", "label"]
    relu = proto.layer[4]
    assert list(relu.bottom) == list(relu.top) == ["ip1"]  # in place
    assert proto.layer[1].convolution_param.kernel_size == [3]  # scalar into a repeated field
    assert proto.layer[1].convolution_param.weight_filler.type == "xavier"
    assert proto.layer[2].pooling_param.pool == pb.PoolingParameter.MAX
    assert [(p.lr_mult, p.decay_mult) for p in proto.layer[5].param] == [(1, 1), (2, 0)]
    assert list(proto.layer[6].loss_weight) == [0.5]
    assert proto.layer[0].dummy_data_param.shape[1].dim == [2, 1, 1, 1]
    # the text round-trips and builds a net that runs forward and backward
    text = text_format.MessageToString(proto)
    net = caffe.Net(text, caffe.TRAIN)
    assert len(net.layers) == 7 and net.blobs["ip2"].shape == (2, 3)
    out = net.forward()
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    net.backward()
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


def test_anonymous_tops_get_type_names():
    data = L.DummyData(shape=dict(dim=[2, 3]))
    a = L.ReLU(data)
    b = L.ReLU(data)
    out = L.Eltwise(a, b)
    proto = out.to_proto()
    assert [l.name for l in proto.layer] == ["DummyData1", "ReLU1", "ReLU2", "Eltwise1"]
    assert list(proto.layer[3].bottom) == ["ReLU1", "ReLU2"]
    assert caffe.to_proto(a, b) == text_format.Parse(text_format.MessageToString(caffe.to_proto(a, b)),
                                                     pb.NetParameter())
    assert len(caffe.to_proto(a, b).layer) == 3  # the shared bottom appears once


def test_zero_tops_and_explicit_param_fields():
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence = L.Silence(n.data, n.data2, ntop=0)
    n.py = L.Python(n.data, module="m", layer="K", param_str="x", propagate_down=[False])
    n.deconv = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=4), name="up")
    proto = n.to_proto()
    assert [l.name for l in proto.layer] == ["data", "silence", "py", "up"]
    assert len(proto.layer[1].top) == 0 and list(proto.layer[1].bottom) == ["data", "data2"]
    assert proto.layer[2].python_param.module == "m" and proto.layer[2].python_param.param_str == "x"
    assert list(proto.layer[2].propagate_down) == [False]
    assert proto.layer[3].convolution_param.num_output == 2
    assert n["py"] is n.py and "deconv" in n.keys()


def test_errors():
    with pytest.raises(TypeError, match=r"^ReLU input 0 is not a Top \(type is <class .numpy.ndarray.>\)$"):
        L.ReLU(np.zeros(3))
    with pytest.raises(AttributeError, match="no top 'missing'"):
        caffe.NetSpec().missing
    with pytest.raises(AttributeError, match="NoSuchParameter"):
        P.NoSuch.X
    with pytest.raises(AttributeError):
        L.Convolution(L.DummyData(shape=dict(dim=[1])), no_such_field=1).to_proto()


def test_layers_namespace_still_reaches_the_registry():
    assert "Concat" in caffe.layers.known_types()
