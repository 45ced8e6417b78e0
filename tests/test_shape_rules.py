"""Every layer type's top_shapes rule (plain arithmetic, no tensors) equals running its forward on meta
tensors, on the configs of models/, ../shared/reference, the golden layer cases and a table of the rest."""
from pathlib import Path

import pytest
import torch

import caffe_layers
from caffe_layers import Net
from caffe_layers.layers import base, layer_class
from caffe_layers.layers.base import meta_top_shapes
from golden import GOLDEN, load_case, make_layer

ROOT = Path(__file__).resolve().parent.parent
RES_DEPLOY = ROOT / "models/segaware/res/deploy.prototxt"  # 1390 layers of the types below: built once
DEPLOY_NETS = [ROOT / "models/segaware/embs/deploy.prototxt", ROOT / "models/segaware/vgg/deploy.prototxt",
               ROOT / "models/sss/sss_deploy.prototxt",
               ROOT / "models/segaware/flownet/flownet_segaware_deploy.prototxt",
               ROOT.parent / "shared/reference/segaware/embs/deploy.prototxt"]

# Types whose forward cannot run on meta tensors (it reads files, numpy or the values); each has its own
# shape test beside its values test (tests/test_data_layers*.py, test_mat_io.py, test_python_layer.py, ...).
NOT_META = {"Data", "ImageData", "ImageSegData", "TwoImageData", "HDF5Data", "MemoryData", "FloData", "MatRead",
            "MatWrite", "Python", "Input", "SegAccuracy", "UniqueLabel", "DistLoss", "SSSMetricLoss", "Silence",
            # the detection layers compute on the values (tests/test_layers_detection.py checks their shapes)
            "ROIPooling", "PSROIPooling", "DetectionOutput", "Proposal"}

# (layer text, bottom shapes) for the types and settings the nets above do not cover
EXTRA = [
    ('type: "Sigmoid"', [(2, 3)]), ('type: "TanH"', [(2, 3)]), ('type: "AbsVal"', [(2, 3, 4)]),
    ('type: "ELU"', [(2, 3)]), ('type: "BNLL"', [(2, 3)]), ('type: "Log"', [(4,)]),
    ('type: "Threshold"', [(2, 3)]), ('type: "Dropout"', [(2, 3)]), ('type: "Divide"', [(2, 3)]),
    ('type: "PReLU"', [(2, 3, 4)]), ('type: "Bias" bias_param { axis: 1 }', [(2, 3, 4)]),
    ('type: "Bias"', [(2, 3, 4), (3,)]), ('type: "Scale" scale_param { bias_term: true }', [(2, 3, 4), (3, 4)]),
    ('type: "MVN" mvn_param { across_channels: true }', [(2, 3)]), ('type: "Softmax" softmax_param { axis: -1 }', [(2, 3, 4)]),
    ('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [(2, 3, 4, 5)]),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } axis: 1 }', [(2, 3, 4, 5)]),
    ('type: "Tile" tile_param { axis: -1 tiles: 3 }', [(2, 3, 4)]),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: 2 }', [(2, 3, 4, 5)]),
    ('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [(2, 3, 4)]),
    ('type: "ArgMax" argmax_param { top_k: 2 axis: 1 }', [(2, 3, 4)]),
    ('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 3 axis: 2 }', [(2, 3, 4)]),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_dim: 1 }', [(2, 4, 4)]),
    ('type: "Split" top: "a" top: "b"', [(2, 3)]),
    ('type: "Concat" concat_param { axis: -1 }', [(2, 3), (2, 5), (2, 1)]),
    ('type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }', [(2, 3, 9, 9), (1, 1, 5, 6)]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -1 }', [(2, 3), (2, 3)]),
    ('type: "InnerProduct" inner_product_param { num_output: 4 axis: 2 }', [(2, 3, 4, 5)]),
    ('type: "Convolution" top: "a" top: "b" convolution_param { num_output: 4 kernel_size: 3 pad: 2 stride: 2 '
     'dilation: 2 group: 2 }', [(1, 2, 9, 8), (1, 2, 9, 8)]),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 kernel_size: 1 kernel_size: 2 }',
     [(1, 2, 5, 6, 7)]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 bottom_is_im2col: true }', [(2, 18, 3, 4)]),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_h: 3 kernel_w: 1 axis: 2 }', [(2, 2, 3, 7, 6)]),
    ('type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2 }',
     [(1, 2, 5, 6)]),
    ('type: "Pooling" top: "a" top: "b" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [(1, 2, 8, 9)]),
    ('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [(1, 2, 8, 9)]),
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }', [(1, 2, 8, 9)]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_h: 1 kernel_w: 3 pad_h: 0 pad_w: 1 stride_h: 3 stride_w: 2 '
     'round_mode: FLOOR }', [(1, 2, 8, 9)]),
    ('type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }', [(1, 2, 5, 6)]),
    ('type: "Interp" interp_param { height: 7 width: 5 }', [(1, 2, 5, 6)]),
    ('type: "Resize" resize_param { is_pyramid_test: true out_height_scale: 0.5 out_width_scale: 1.5 }', [(1, 2, 5, 7)]),
    ('type: "GateRecurrent2dnoind"', [(1, 2, 5, 7)] * 4),
    ('type: "ChannelReduce" channel_reduce_param { num_channels: 2 operation: SUM }', [(2, 6, 3, 4)]),
    ('type: "Im2col" convolution_param { kernel_size: 3 pad: 1 stride: 2 axis: 2 }', [(2, 2, 3, 7, 6)]),
    ('type: "NormConv" convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 }',
     [(2, 3, 7, 6), (2, 5, 7, 6)]),
    ('type: "Accuracy" top: "a" top: "b" accuracy_param { top_k: 2 }', [(6, 5), (6,)]),
    ('type: "SoftmaxWithLoss" top: "l" top: "p"', [(2, 5, 3, 4), (2, 1, 3, 4)]),
    ('type: "SigmoidCrossEntropyLoss"', [(2, 5), (2, 5)]),
    ('type: "EuclideanLoss"', [(2, 5), (2, 1, 5)]),
    ('type: "EPELoss"', [(2, 2, 3, 4), (2, 2, 3, 4)]),
    ('type: "Axpy"', [(2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5)]),
    ('type: "ConvolutionDepthwise" convolution_param { num_output: 4 kernel_size: 3 group: 4 }', [(1, 4, 6, 7)]),
    ('type: "Normalize" norm_param { across_spatial: false }', [(1, 3, 4, 5)]),
    ('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', [(1, 3, 4, 5)]),
    ('type: "PriorBox" prior_box_param { min_size: 4 max_size: 8 aspect_ratio: 2 flip: true }',
     [(1, 3, 4, 5), (1, 3, 32, 40)]),
    ('type: "ReLU6"', [(2, 3)]), ('type: "Swish" swish_param { beta: 0.5 }', [(2, 3)]),
    ('type: "ShuffleChannel" shuffle_channel_param { group: 3 }', [(1, 6, 2, 2)]),
    ('type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }', []),
]


def _config_key(layer, bottom_shapes):
    lp = type(layer.param)()
    lp.CopyFrom(layer.param)
    lp.ClearField("name")
    lp.ClearField("bottom")
    lp.ClearField("top")
    return lp.SerializeToString(), len(layer.param.top), tuple(bottom_shapes)


def _cases():
    """(layer, bottom shapes): every distinct layer config of the nets, golden cases and EXTRA."""
    seen = set()
    nets = [Net(str(p), phase="test") for p in DEPLOY_NETS]
    for path in sorted((GOLDEN / "layers").glob("*.npz")):
        case = load_case(path.stem)
        nets.append(Net(str(case["prototxt"]), phase=str(case["phase"]).lower()))
    for net in nets:
        for step in net.steps:
            shapes = [net.blob_shapes[b] for b in step.bottoms]
            key = _config_key(step.layer, shapes)
            if key not in seen:
                seen.add(key)
                yield step.layer, shapes
    for text, shapes in EXTRA:
        if "top:" not in text:
            text += ' top: "t"'
        yield make_layer(text, shapes, dtype=torch.float32), shapes


def test_every_rule_equals_meta_execution():
    covered = set()
    for layer, shapes in _cases():
        kind = layer.param.type
        covered.add(kind)
        if kind in NOT_META:
            continue
        rule = [tuple(s) for s in layer.top_shapes(shapes)]
        assert rule == meta_top_shapes(layer, shapes), f"{kind} {layer.name!r} with bottoms {shapes}"
    ours = {t for t in caffe_layers.known_types() if layer_class(t).__module__.startswith("caffe_layers.")}
    missing = ours - covered - NOT_META  # (other tests register types of their own)
    assert not missing, f"no shape-rule case for {sorted(missing)}"


def test_standard_nets_build_without_meta_execution(monkeypatch):
    def refuse(layer, bottom_shapes):
        raise AssertionError(f"{layer.param.type} {layer.name!r} fell back to meta execution")

    monkeypatch.setattr(base, "meta_top_shapes", refuse)
    for path in DEPLOY_NETS[:2] + [RES_DEPLOY]:
        Net(str(path), phase="test")


def test_rules_keep_the_build_time_checks():
    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 5 }', [(1, 1, 6, 6)])
    with pytest.raises(ValueError, match="'p'.*smaller than the kernel"):
        layer.top_shapes([(1, 1, 3, 6)])
    layer = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                       [(1, 2, 6, 6)])
    with pytest.raises(ValueError, match="'c'.*does not fit"):
        layer.top_shapes([(1, 3, 6, 6)])
    with pytest.raises(ValueError, match="'c'.*empty output"):
        layer.top_shapes([(1, 2, 2, 6)])
    layer = make_layer('name: "cr" type: "Crop" crop_param { axis: 2 offset: 2 }', [(1, 1, 6, 6), (1, 1, 3, 3)])
    with pytest.raises(ValueError, match="'cr'.*out of bounds"):
        layer.top_shapes([(1, 1, 4, 6), (1, 1, 3, 3)])
