"""Upgrading V0/V1 nets, old data transformation fields, net inputs, BatchNorm and solver types."""
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_layers import Net
from caffe_layers.formats.proto import pb
from caffe_layers.formats.prototxt import read_net, read_solver
from caffe_layers.formats.upgrade import UpgradeError, upgrade_net, upgrade_solver

V1_NET = """
name: "v1"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 5 input_dim: 5
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip" param: "shared_w" blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } }
  include { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" loss_weight: 0.5
  exclude { phase: TEST } loss_param { ignore_label: 255 } }
"""

V2_NET = """
name: "v1"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" param { name: "shared_w" share_mode: PERMISSIVE }
  include { phase: TEST } inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 0.5
  exclude { phase: TEST } loss_param { ignore_label: 255 } }
"""


def parse(text):
    return text_format.Parse(text, pb.NetParameter())


def test_v1_to_v2_matches_hand_written_v2():
    assert read_net(V1_NET) == parse(V2_NET)


def test_upgraded_v1_net_runs_like_the_v2_net():
    torch.manual_seed(0)
    old, new = Net(V1_NET), Net(V2_NET)
    assert [s.layer.param.type for s in old.steps] == ["Input", "Convolution", "ReLU", "InnerProduct"]
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(old(data=x)["ip"], new(data=x)["ip"], rtol=0, atol=0)
    assert [(lr, decay) for _, lr, decay in old.param_specs] == [(1, 1), (2, 0), (1, 1), (1, 1)]


def test_every_v1_type_and_param_message_upgrades():
    names = {v: n for n, v in pb.V1LayerParameter.LayerType.items()}
    for value, enum_name in names.items():
        net = parse(f'layers {{ name: "l" type: {enum_name} }}')
        expected = "" if enum_name == "NONE" else None
        layer = upgrade_net(net).layer[0]
        if expected is not None:
            assert layer.type == expected
        else:
            assert layer.type and layer.type[0].isupper(), enum_name
    assert upgrade_net(parse("layers { type: SOFTMAX_LOSS }")).layer[0].type == "SoftmaxWithLoss"
    assert upgrade_net(parse("layers { type: TANH }")).layer[0].type == "TanH"
    v1 = pb.V1LayerParameter(name="all")
    for fd in pb.V1LayerParameter.DESCRIPTOR.fields:
        if fd.name.endswith("_param") and fd.message_type is not None:
            getattr(v1, fd.name).SetInParent()
    net = pb.NetParameter()
    net.layers.add().CopyFrom(v1)
    layer = upgrade_net(net).layer[0]
    for fd in pb.V1LayerParameter.DESCRIPTOR.fields:
        if fd.name.endswith("_param") and fd.message_type is not None:
            assert layer.HasField(fd.name), fd.name


def test_v1_blobs_and_param_names_carry_over():
    net = parse("""layers { name: "c" type: CONVOLUTION param: "a" param: "b" blob_share_mode: STRICT
      blob_share_mode: PERMISSIVE blobs_lr: 3 blobs { shape { dim: 2 } data: 1 data: 2 } }""")
    layer = upgrade_net(net).layer[0]
    assert [(p.name, p.share_mode, p.lr_mult) for p in layer.param] == [
        ("a", pb.ParamSpec.STRICT, 3), ("b", pb.ParamSpec.PERMISSIVE, 1)]
    assert list(layer.blobs[0].data) == [1, 2]


def test_both_layer_and_layers_is_refused():
    with pytest.raises(UpgradeError, match="both 'layer' and 'layers'"):
        read_net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')


def test_data_transformation_fields_move_to_transform_param():
    net = upgrade_net(parse("""
      layers { name: "d" type: DATA top: "data" data_param { source: "db" batch_size: 4 scale: 0.5
               mean_file: "m.binaryproto" crop_size: 7 mirror: true } }
      layers { name: "i" type: IMAGE_DATA top: "x" image_data_param { source: "l.txt" scale: 2 } }
      layers { name: "w" type: WINDOW_DATA top: "y" window_data_param { source: "w.txt" mirror: false } }"""))
    d, i, w = net.layer
    assert d.type == "Data" and d.data_param.source == "db" and d.data_param.batch_size == 4
    for f in ("scale", "mean_file", "crop_size", "mirror"):
        assert not d.data_param.HasField(f)
    assert (d.transform_param.scale, d.transform_param.mean_file, d.transform_param.crop_size,
            d.transform_param.mirror) == (0.5, "m.binaryproto", 7, True)
    assert i.transform_param.scale == 2 and not i.image_data_param.HasField("scale")
    assert w.transform_param.HasField("mirror") and not w.window_data_param.HasField("mirror")


V0_NET = """
name: "v0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 6 kernelsize: 5 stride: 1 group: 1 biasterm: false
  weight_filler { type: "gaussian" std: 0.01 } blobs_lr: 1 weight_decay: 1 } bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "pool1" top: "pool1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 } bottom: "pool1" top: "fc" }
"""


def test_v0_upgrade_folds_padding_and_maps_fields():
    net = read_net(V0_NET)
    assert [(l.name, l.type) for l in net.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"),
        ("drop", "Dropout"), ("fc", "InnerProduct")]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"] and list(conv.convolution_param.pad) == [2]
    assert list(conv.convolution_param.kernel_size) == [5] and list(conv.convolution_param.stride) == [1]
    assert conv.convolution_param.num_output == 6 and conv.convolution_param.bias_term is False
    assert conv.convolution_param.weight_filler.std == pytest.approx(0.01)
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1)]
    pool = net.layer[3].pooling_param
    assert (pool.pool, pool.kernel_size, pool.stride) == (pb.PoolingParameter.AVE, 3, 2)
    assert net.layer[4].dropout_param.dropout_ratio == pytest.approx(0.3)
    assert net.layer[5].inner_product_param.num_output == 10
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]


def test_v0_data_layer_fields():
    net = read_net("""layers { layer { name: "d" type: "data" source: "db" batchsize: 8 scale: 0.25
        meanfile: "mean" cropsize: 9 mirror: true rand_skip: 3 } top: "data" top: "label" }""")
    d = net.layer[0]
    assert (d.type, d.data_param.source, d.data_param.batch_size, d.data_param.rand_skip) == ("Data", "db", 8, 3)
    assert (d.transform_param.scale, d.transform_param.mean_file, d.transform_param.crop_size,
            d.transform_param.mirror) == (0.25, "mean", 9, True)


def test_v0_errors():
    with pytest.raises(UpgradeError, match="unknown V0 layer type 'bogus'"):
        read_net('layers { layer { name: "x" type: "bogus" } }')
    with pytest.raises(UpgradeError, match="padding layer 'p' feeds layer 'r'"):
        read_net("""input: "data" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "data" top: "p" }
                    layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }""")
    with pytest.raises(UpgradeError, match="unknown blob input 'nope'"):
        read_net('layers { layer { name: "r" type: "relu" } bottom: "nope" top: "r" }')


def test_v0_misplaced_field_is_logged_not_fatal(caplog):
    net = read_net('layers { layer { name: "r" type: "relu" num_output: 3 } }')
    assert net.layer[0].type == "ReLU"
    assert "unknown parameter num_output for layer type relu" in caplog.text


def test_net_input_upgrade():
    net = read_net('input: "a" input: "b" input_shape { dim: 1 dim: 2 } input_shape { dim: 3 } '
                   'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }')
    assert [l.name for l in net.layer] == ["input", "r"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    assert not net.input and not net.input_shape
    # a legacy caffemodel's input name without shape is simply dropped
    net = upgrade_net(parse('input: "data" layer { name: "r" type: "ReLU" }'))
    assert [l.name for l in net.layer] == ["r"] and not net.input


def test_batch_norm_upgrade():
    net = read_net('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 decay_mult: 1 } '
                   'param { lr_mult: 1 } param { lr_mult: 1 } } '
                   'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }')
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3
    assert net.layer[1].param[0].lr_mult == 1


@pytest.mark.parametrize("enum_name,type_name", [("SGD", "SGD"), ("NESTEROV", "Nesterov"),
                                                 ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
                                                 ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_upgrade(enum_name, type_name):
    solver = text_format.Parse(f"base_lr: 0.1 solver_type: {enum_name}", pb.SolverParameter())
    upgrade_solver(solver)
    assert solver.type == type_name and not solver.HasField("solver_type")
    assert read_solver(f"base_lr: 0.1 solver_type: {enum_name}").type == type_name


def test_solver_type_conflict():
    solver = text_format.Parse('solver_type: ADAM type: "Adam"', pb.SolverParameter())
    with pytest.raises(UpgradeError, match="cannot both be given"):
        upgrade_solver(solver)
    untouched = text_format.Parse('type: "Nesterov"', pb.SolverParameter())
    assert upgrade_solver(untouched).type == "Nesterov"


def test_v1_net_weights_round_trip_through_net(tmp_path):
    """A V1 prototxt net saves a V2 .caffemodel that a V2 net reads back exactly."""
    torch.manual_seed(1)
    old = Net(V1_NET)
    old.save(str(tmp_path / "m.caffemodel"))
    new = Net(V2_NET, weights=str(tmp_path / "m.caffemodel"), strict_weights=True)
    for k, v in old.state_dict().items():
        np.testing.assert_array_equal(new.state_dict()[k].numpy(), v.numpy())
