"""Checks for proto/caffe.proto, the merged Caffe schema.

The schema is compiled with grpc_tools.protoc into a temporary directory, so these tests
do not depend on the rest of the package. They check that
  * every reference prototxt (segaware, SPN) parses with text_format,
  * every golden binary (.caffemodel / .solverstate) parses,
  * every prototxt embedded in the golden .npz files parses,
  * each field-number conflict is resolved as documented at the top of caffe.proto.
"""
import re
import struct
import types
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "proto" / "caffe.proto"

REFERENCE = SHARED / "reference"
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Compile caffe.proto with grpc_tools.protoc into a temporary directory.

    protoc writes both caffe_pb2.py and a descriptor set there. The message classes are
    built from the descriptor set in a private DescriptorPool, so this test never clashes
    with another copy of caffe.proto registered in protobuf's default pool (for example the
    package's own caffe_pb2 imported in the same pytest session).
    """
    from grpc_tools import protoc as grpc_protoc
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    out = tmp_path_factory.mktemp("caffe_pb")
    desc = out / "caffe.desc"
    rc = grpc_protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"--python_out={out}",
        f"--descriptor_set_out={desc}",
        str(PROTO),
    ])
    assert rc == 0, "protoc failed on proto/caffe.proto"
    assert (out / "caffe_pb2.py").exists()
    fds = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    fd = pool.FindFileByName("caffe.proto")
    classes = message_factory.GetMessageClassesForFiles(["caffe.proto"], pool)
    ns = types.SimpleNamespace(DESCRIPTOR=fd)
    for name in fd.message_types_by_name:
        setattr(ns, name, classes["caffe." + name])
    for name, enum in fd.enum_types_by_name.items():
        setattr(ns, name, enum)
        for v in enum.values:
            setattr(ns, v.name, v.number)
    return ns


def _text_format():
    from google.protobuf import text_format
    return text_format


# ---------------------------------------------------------------------------
# ${VAR} placeholders in the segaware templates
# ---------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_QUOTED = re.compile(r'"[^"\n]*"')
# Unquoted placeholders take numbers (or an enum name); values from the reference README.
_UNQUOTED_VALUES = {
    "SOLVER_MODE": "GPU",
    "CROP_SIZE": "321", "HALF_SIZE": "161", "BATCH_SIZE": "1", "NUM_LABELS": "21",
    "LEARNING_RATE": "0.001", "ITER_SIZE": "10", "ITERS": "20000", "STEP": "2000",
    "SNAP": "5000", "MASK_SIZE": "3", "MASK_DILATION": "1", "MASK_PAD": "1",
    "MASK2_SIZE": "3", "MASK2_DILATION": "2", "MASK2_PAD": "2",
    "MASK3_SIZE": "3", "MASK3_DILATION": "5", "MASK3_PAD": "5",
}


def fill_placeholders(text):
    """Quoted placeholders become strings, the rest numbers (1 unless listed)."""
    text = _QUOTED.sub(lambda m: _PLACEHOLDER.sub(lambda p: p.group(1).lower(), m.group(0)), text)
    return _PLACEHOLDER.sub(lambda p: _UNQUOTED_VALUES.get(p.group(1), "1"), text)


def test_fill_placeholders():
    src = 'source: "${EXP}/list/${TRAIN_SET}.txt"\ncrop_size: ${CROP_SIZE}\nlr_mult: ${MAIN_LR1}'
    assert fill_placeholders(src) == 'source: "exp/list/train_set.txt"\ncrop_size: 321\nlr_mult: 1'


def _reference_files():
    files = sorted(REFERENCE.glob("segaware/*/*.prototxt")) + sorted(REFERENCE.glob("spn/*.prototxt"))
    return files


REFERENCE_FILES = _reference_files()


def test_reference_files_present():
    assert REFERENCE.exists(), f"{REFERENCE} is missing: the tests need ../shared beside the checkout"
    assert len(REFERENCE_FILES) >= 20


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: str(p.relative_to(REFERENCE)))
def test_reference_prototxt_parses(pb, path):
    text = fill_placeholders(path.read_text())
    msg = pb.SolverParameter() if path.name.startswith("solver") else pb.NetParameter()
    _text_format().Merge(text, msg)
    if isinstance(msg, pb.NetParameter):
        assert len(msg.layer) > 0
    else:
        assert msg.HasField("base_lr") or msg.HasField("lr_policy")


def test_reference_fork_fields(pb):
    """Spot-check that fork-specific fields land where expected."""
    tf = _text_format()
    seg = pb.NetParameter()
    tf.Merge(fill_placeholders((REFERENCE / "segaware/vgg/train.prototxt").read_text()), seg)
    two = [l for l in seg.layer if l.type == "TwoImageData"]
    assert two and two[0].two_image_data_param.first_is_color
    assert not two[0].two_image_data_param.second_is_color
    res = pb.NetParameter()
    tf.Merge((REFERENCE / "segaware/res/deploy.prototxt").read_text(), res)
    xy = [l for l in res.layer if l.type == "DummyData"]
    assert any(f.type == "xy" for l in xy for f in l.dummy_data_param.data_filler)
    spn = pb.NetParameter()
    tf.Merge((REFERENCE / "spn/parsing_rnn_strd2_v4.prototxt").read_text(), spn)
    gates = [l for l in spn.layer if l.type == "GateRecurrent2dnoind"]
    assert gates and {(g.gaterecurrent2dnoind_param.horizontal, g.gaterecurrent2dnoind_param.reverse)
                      for g in gates} == {(True, False), (True, True), (False, False), (False, True)}
    resize = [l for l in spn.layer if l.type == "Resize"]
    assert resize and resize[0].resize_param.is_pyramid_test
    assert resize[0].resize_param.type == pb.ResizeParameter.BILINEAR


# ---------------------------------------------------------------------------
# Golden binaries and npz prototxts
# ---------------------------------------------------------------------------
CAFFEMODELS = sorted(GOLDEN.glob("train/*/*.caffemodel"))
SOLVERSTATES = sorted(GOLDEN.glob("train/*/*.solverstate"))
NPZS = sorted(GOLDEN.glob("layers/*.npz")) + sorted(GOLDEN.glob("nets/*.npz"))
TRAIN_TEXT = sorted(GOLDEN.glob("train/*/*.prototxt"))


def _unknown_field_numbers(msg):
    from google.protobuf import unknown_fields
    return [f.field_number for f in unknown_fields.UnknownFieldSet(msg)]


@pytest.mark.parametrize("path", CAFFEMODELS, ids=lambda p: "/".join(p.parts[-2:]))
def test_caffemodel_parses(pb, path):
    net = pb.NetParameter()
    net.ParseFromString(path.read_bytes())
    assert len(net.layer) > 0
    assert not _unknown_field_numbers(net)
    for layer in net.layer:
        assert not _unknown_field_numbers(layer), layer.name
    # the segaware-specific parameters must decode into their own fields
    types = {l.type: l for l in net.layer}
    if "DistLoss" in types:
        assert types["DistLoss"].HasField("dist_loss_param")
    if "Im2dist" in types:
        assert types["Im2dist"].HasField("im2dist_param")
    if "Interp" in types:
        assert types["Interp"].HasField("interp_param")
    assert sum(len(l.blobs) for l in net.layer) > 0


@pytest.mark.parametrize("path", SOLVERSTATES, ids=lambda p: "/".join(p.parts[-2:]))
def test_solverstate_parses(pb, path):
    state = pb.SolverState()
    state.ParseFromString(path.read_bytes())
    assert state.iter == 12
    assert len(state.history) > 0
    assert not _unknown_field_numbers(state)


@pytest.mark.parametrize("path", TRAIN_TEXT, ids=lambda p: "/".join(p.parts[-2:]))
def test_golden_train_prototxt_parses(pb, path):
    msg = pb.SolverParameter() if path.name.startswith("solver") else pb.NetParameter()
    _text_format().Merge(path.read_text(), msg)


@pytest.mark.parametrize("path", NPZS, ids=lambda p: "/".join(p.parts[-2:]))
def test_npz_prototxt_parses(pb, path):
    with np.load(path, allow_pickle=False) as z:
        text = str(z["prototxt"])
    net = pb.NetParameter()
    _text_format().Merge(text, net)
    assert len(net.layer) > 0


def test_golden_present():
    assert GOLDEN.exists(), f"{GOLDEN} is missing: the tests need ../shared beside the checkout"
    assert CAFFEMODELS and SOLVERSTATES and NPZS


# ---------------------------------------------------------------------------
# Field-number conflict resolutions (see the header of proto/caffe.proto)
# ---------------------------------------------------------------------------
def _key(number, wire_type):
    return _varint((number << 3) | wire_type)


def _varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number, payload):
    return _key(number, 2) + _varint(len(payload)) + payload


def _number(pb, message, field):
    return getattr(pb, message).DESCRIPTOR.fields_by_name[field].number


# (field name, number in this schema, which message type it holds)
SEGAWARE_KEPT = [
    ("interp_param", 143), ("seg_accuracy_param", 144), ("mat_write_param", 145),
    ("dense_crf_param", 146), ("domain_transform_param", 147),
    ("adaptive_bias_channel_param", 148), ("bias_channel_param", 149),
    ("unique_label_param", 150), ("mat_read_param", 151), ("channel_reduce_param", 152),
    ("dist_loss_param", 153), ("im2dist_param", 154), ("im2parity_param", 155),
    ("norm_conv_param", 156), ("norm_conv_meanfield_param", 157),
    ("l1_loss_param", 3001), ("aug_param", 3002),
]
MOVED = [
    ("input_param", 1143), ("crop_param", 1144), ("parameter_param", 1145),
    ("recurrent_param", 1146), ("swish_param", 1147), ("clip_param", 1148),
    ("four_image_data_param", 2144), ("two_image_data_param", 2148),
    ("replicate_param", 2152), ("multi_stage_meanfield_param", 2155),
    ("resize_param", 231),
]
SPN_KEPT = [("gaterecurrent2dnoind_param", 162), ("divide_param", 163), ("roi_param", 164)]


@pytest.mark.parametrize("name,number", SEGAWARE_KEPT + MOVED + SPN_KEPT)
def test_layer_field_numbers(pb, name, number):
    assert _number(pb, "LayerParameter", name) == number


def test_no_duplicate_layer_numbers(pb):
    numbers = [f.number for f in pb.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))


def test_segaware_interp_at_143_roundtrip(pb):
    # segaware binary: interp_param { zoom_factor: 2 } as field 143
    raw = _len_field(143, _key(3, 0) + _varint(2))
    layer = pb.LayerParameter.FromString(raw)
    assert layer.HasField("interp_param") and layer.interp_param.zoom_factor == 2
    assert not layer.HasField("input_param")
    assert layer.SerializeToString() == raw


def test_bvlc_input_param_moved(pb):
    # text still works by name
    layer = pb.LayerParameter()
    _text_format().Merge('type: "Input" input_param { shape { dim: 1 dim: 3 dim: 5 dim: 7 } }', layer)
    assert list(layer.input_param.shape[0].dim) == [1, 3, 5, 7]
    raw = layer.SerializeToString()
    assert _len_field(1143, layer.input_param.SerializeToString()) in raw
    assert pb.LayerParameter.FromString(raw) == layer
    # a BVLC binary (input_param at 143) lands in interp_param: documented misparse.
    # InputParameter.shape is length-delimited, InterpParameter field 1 is a varint, so
    # the payload stays as an unknown field and nothing raises.
    shape = _len_field(1, b"\x08\x01\x08\x03")  # BlobShape{dim:1 dim:3}, unpacked
    bvlc = pb.LayerParameter.FromString(_len_field(143, shape))
    assert not bvlc.HasField("input_param")
    assert bvlc.HasField("interp_param") and not bvlc.interp_param.HasField("height")


def test_bvlc_crop_and_clip_moved(pb):
    layer = pb.LayerParameter()
    _text_format().Merge("crop_param { axis: 1 offset: 2 } clip_param { min: -1 max: 1 }", layer)
    raw = layer.SerializeToString()
    back = pb.LayerParameter.FromString(raw)
    assert back.crop_param.axis == 1 and list(back.crop_param.offset) == [2]
    assert back.clip_param.min == -1 and back.clip_param.max == 1
    # number 144 is segaware's seg_accuracy_param, 148 adaptive_bias_channel_param
    acc = pb.LayerParameter.FromString(_len_field(144, _key(1, 0) + _varint(2)))
    assert acc.seg_accuracy_param.metric == pb.SegAccuracyParameter.PixelIOU
    ab = pb.LayerParameter.FromString(_len_field(148, _key(1, 0) + _varint(4)))
    assert ab.adaptive_bias_channel_param.num_iter == 4


def test_early_segaware_two_image_data_moved(pb):
    layer = pb.LayerParameter()
    _text_format().Merge("two_image_data_param { first_is_color: false second_is_color: true }", layer)
    raw = layer.SerializeToString()
    assert raw == _len_field(2148, _key(1, 0) + b"\x00" + _key(2, 0) + b"\x01")
    back = pb.LayerParameter.FromString(raw)
    assert not back.two_image_data_param.first_is_color
    assert back.two_image_data_param.second_is_color
    # the early revision's channel_reduce_param number (151) is mat_read_param now
    mr = pb.LayerParameter.FromString(_len_field(151, _len_field(1, b"pre")))
    assert mr.mat_read_param.prefix == "pre"


def test_segaware_headline_fields_roundtrip(pb):
    layer = pb.LayerParameter()
    _text_format().Merge(
        'dist_loss_param { alpha: 0.5 beta: 2 ignore_label: 255 } '
        'im2dist_param { norm: L1 remove_center: true } '
        'convolution_param { kernel_size: 3 bottom_is_im2col: true } '
        'channel_reduce_param { num_channels: 2 operation: SUM }', layer)
    raw = layer.SerializeToString()
    assert _len_field(153, layer.dist_loss_param.SerializeToString()) in raw
    assert _len_field(154, layer.im2dist_param.SerializeToString()) in raw
    assert _len_field(152, layer.channel_reduce_param.SerializeToString()) in raw
    assert pb.ConvolutionParameter.DESCRIPTOR.fields_by_name["bottom_is_im2col"].number == 19
    assert pb.LayerParameter.FromString(raw) == layer


def test_spn_fields(pb):
    g = pb.GateRecurrent2dnoindParameter()
    assert g.num_output == 16 and g.horizontal and not g.reverse
    assert g.active == pb.GateRecurrent2dnoindParameter.LINEAR
    layer = pb.LayerParameter()
    _text_format().Merge("gaterecurrent2dnoind_param { horizontal: false reverse: true } "
                         "divide_param { alpha: 2 }", layer)
    raw = layer.SerializeToString()
    assert _len_field(162, _key(16, 0) + b"\x00" + _key(17, 0) + b"\x01") in raw
    back = pb.LayerParameter.FromString(raw)
    assert back.divide_param.alpha == 2 and back.gaterecurrent2dnoind_param.reverse


def test_rms_decay_default_follows_segaware(pb):
    s = pb.SolverParameter()
    assert s.rms_decay == 0.0 and not s.HasField("rms_decay")
    raw = _key(38, 5) + struct.pack("<f", 0.99)
    s2 = pb.SolverParameter.FromString(raw)
    assert s2.HasField("rms_decay") and abs(s2.rms_decay - 0.99) < 1e-6


def test_bvlc_solver_additions(pb):
    s = pb.SolverParameter()
    _text_format().Merge('weights: "a.caffemodel" layer_wise_reduce: false type: "Adam"', s)
    assert _number(pb, "SolverParameter", "weights") == 42
    assert _number(pb, "SolverParameter", "layer_wise_reduce") == 41
    assert pb.SolverParameter.FromString(s.SerializeToString()) == s
    assert pb.PoolingParameter().round_mode == pb.PoolingParameter.CEIL


# ---------------------------------------------------------------------------
# SSD fork and OpenCV's community layers (proto/README.md)
# ---------------------------------------------------------------------------
SSD_LAYER_FIELDS = [
    ("annotated_data_param", 200), ("multibox_loss_param", 201), ("permute_param", 202),
    ("prior_box_param", 203), ("detection_output_param", 204),
    ("detection_evaluate_param", 205), ("norm_param", 206), ("video_data_param", 207),
]
OPENCV_LAYER_FIELDS = [("proposal_param", 1201), ("psroi_pooling_param", 10002),
                       ("roi_pooling_param", 8266711), ("shuffle_channel_param", 1164), ("roi_param", 164)]
MOVED_INSIDE = [
    ("TransformationParameter", "resize_param", 1008), ("TransformationParameter", "noise_param", 1009),
    ("TransformationParameter", "emit_constraint", 1010), ("TransformationParameter", "crop_h", 11),
    ("TransformationParameter", "distort_param", 13), ("TransformationParameter", "scale_factors", 8),
    ("SolverParameter", "eval_type", 1041), ("SolverParameter", "ap_version", 1042),
    ("SolverParameter", "plateau_winsize", 43), ("PoolingParameter", "ceil_mode", 1013),
    ("PoolingParameter", "round_mode", 13), ("DetectionOutputParameter", "visualize", 10),
    ("DetectionOutputParameter", "normalized_bbox", 1010), ("PriorBoxParameter", "offset_h", 14),
    ("BlobProto", "raw_data", 12), ("BatchNormParameter", "scale_bias", 7),
    ("DropoutParameter", "scale_train", 2),
]


@pytest.mark.parametrize("name,number", SSD_LAYER_FIELDS + OPENCV_LAYER_FIELDS)
def test_ssd_and_opencv_layer_field_numbers(pb, name, number):
    assert _number(pb, "LayerParameter", name) == number


@pytest.mark.parametrize("message,name,number", MOVED_INSIDE)
def test_ssd_and_opencv_fields_in_other_messages(pb, message, name, number):
    assert _number(pb, message, name) == number


def test_ssd_binary_fields_land_in_place(pb):
    # an SSD-written layer: permute_param { order: 0 order: 2 } at 202, norm_param at 206
    raw = _len_field(202, _key(1, 0) + b"\x00" + _key(1, 0) + b"\x02") + \
        _len_field(206, _key(1, 0) + b"\x00" + _key(3, 0) + b"\x00")
    layer = pb.LayerParameter.FromString(raw)
    assert list(layer.permute_param.order) == [0, 2]
    assert not layer.norm_param.across_spatial and not layer.norm_param.channel_shared
    assert not _unknown_field_numbers(layer)


def test_ssd_prototxt_fields_parse(pb):
    net = pb.NetParameter()
    _text_format().Merge('''
      layer { name: "p" type: "PriorBox" prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2
              flip: true variance: 0.1 variance: 0.2 step: 8 offset: 0.5 } }
      layer { name: "d" type: "DetectionOutput" detection_output_param { num_classes: 21
              nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200
              confidence_threshold: 0.01 save_output_param { resize_param { resize_mode: WARP } } } }
      layer { name: "t" type: "AnnotatedData" transform_param { resize_param { height: 300 width: 300
              interp_mode: LINEAR } distort_param { brightness_prob: 0.5 } emit_constraint {
              emit_type: CENTER } } annotated_data_param { batch_sampler { max_trials: 50 } } }
      layer { name: "r" type: "Proposal" proposal_param { ratio: 0.5 scale: 8 feat_stride: 16 } }
      layer { name: "q" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.0625
              output_dim: 21 group_size: 7 } }
    ''', net)
    p, d, t, r, q = net.layer
    assert list(p.prior_box_param.min_size) == [30] and not p.prior_box_param.clip
    assert d.detection_output_param.code_type == pb.PriorBoxParameter.CENTER_SIZE
    assert d.detection_output_param.nms_param.top_k == 400
    assert t.transform_param.resize_param.height == 300
    assert list(r.proposal_param.scale) == [8] and r.proposal_param.nms_thresh == pytest.approx(0.7)
    back = pb.NetParameter.FromString(net.SerializeToString())
    assert back == net


def test_ssd_transform_resize_moved(pb):
    # DeepLab's scale_factors keeps 8; an SSD binary's resize_param (8, length-delimited) does
    # not reach resize_param (documented): it lands in scale_factors, a packed float field.
    t = pb.TransformationParameter()
    _text_format().Merge("resize_param { height: 3 } scale_factors: 0.5", t)
    assert pb.TransformationParameter.FromString(t.SerializeToString()) == t
    ssd = pb.TransformationParameter.FromString(_len_field(8, b""))
    assert not ssd.HasField("resize_param")
