"""Folded convolutions in float32 CPU inference hand back channels-last tops (1x1 ones as one GEMM over the
pixels, larger ones through oneDNN); TorchNet makes them contiguous before the steps that want the plain layout
and at its outputs. Checked against F.conv2d on the folded weights and against the unfolded nets."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from golden import make_layer

from caffe_layers import TorchNet, native
from caffe_layers.engine.folding import fold_weights, folded_convolution
from caffe_layers.formats.prototxt import read_net
from caffe_layers.tools.reference import fill_net_hash

ROOT = Path(__file__).resolve().parents[1]


def _bn_blobs(channels, generator):
    mean = torch.randn(channels, generator=generator)
    var = torch.rand(channels, generator=generator) + 0.5
    scale = torch.rand(channels, generator=generator) + 0.5
    shift = torch.randn(channels, generator=generator)
    return mean, var, torch.tensor([0.9]), scale, shift


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_folded_1x1_gemm_equals_conv2d(stride, relu, layout):
    g = torch.Generator().manual_seed(stride + 2 * relu)
    weight, bias = torch.randn(6, 5, 1, 1, generator=g), torch.randn(6, generator=g)
    mean, var, factor, scale, shift = _bn_blobs(6, g)
    x = torch.randn(2, 5, 7, 6, generator=g).contiguous(memory_format=layout)
    w, b = fold_weights(weight, bias, mean, var, factor, 1e-5, scale, shift)
    expected = F.conv2d(x, w, b, stride)
    expected = expected.clamp_min(0) if relu else expected
    args = (weight, bias, mean, var, factor, 1e-5, scale, shift, (stride, stride), (0, 0), (1, 1), 1, relu)
    with torch.inference_mode():
        got = folded_convolution(x, *args)
        with native.disabled():  # the exported graph's path: F.conv2d, the plain layout
            plain = folded_convolution(x, *args)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert plain.is_contiguous(memory_format=layout)  # (F.conv2d keeps the input's layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # under autograd: the plain path, gradients through the folded weights
        weight.requires_grad_()
        y = folded_convolution(x, *((weight,) + args[1:]))
        y.sum().backward()
    assert y.is_contiguous(memory_format=layout) and weight.grad is not None


def _bn(name, top):
    return (f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{top}" top: "{top}" }}\n'
            f'layer {{ name: "sc_{name}" type: "Scale" bottom: "{top}" top: "{top}" scale_param {{ bias_term: true }} }}\n')


def _conv(name, bottom, out, kernel, stride=1, pad=0, relu=True):
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {out} kernel_size: {kernel} stride: {stride} pad: {pad} bias_term: false '
            f'weight_filler {{ type: "gaussian" std: 0.2 }} }} }}\n') + _bn(name, name)
    return text + (f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n' if relu else "")


# a bottleneck after a 3x3 stem and a pooling, its sum read by a plain convolution, an AbsVal (module call),
# an InnerProduct and the outputs
RESIDUAL_NET = ('name: "residual"\n'
                'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 11 dim: 11 } } }\n'
                + _conv("stem", "data", 16, 3, pad=1)
                + 'layer { name: "pool" type: "Pooling" bottom: "stem" top: "pool" '
                  'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
                + _conv("short", "pool", 24, 1, stride=2, relu=False)
                + _conv("a", "pool", 8, 1, stride=2) + _conv("b", "a", 8, 3, pad=1) + _conv("c", "b", 24, 1, relu=False)
                + 'layer { name: "sum" type: "Eltwise" bottom: "short" bottom: "c" top: "sum" }\n'
                  'layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }\n'
                  'layer { name: "head" type: "Convolution" bottom: "sum" top: "head" convolution_param { '
                  'num_output: 32 kernel_size: 3 pad: 2 dilation: 2 weight_filler { type: "gaussian" std: 0.1 } } }\n'
                  'layer { name: "abs" type: "AbsVal" bottom: "sum" top: "abs" }\n'
                  'layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip" inner_product_param { '
                  'num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }\n')


def _random_statistics(net):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in net.layer_modules:
            if layer.param.type == "BatchNorm":
                mean, var, factor, _, _ = _bn_blobs(layer.blobs[0].numel(), g)
                layer.blobs[0].copy_(mean)
                layer.blobs[1].copy_(var)
                layer.blobs[2].copy_(factor)
            elif layer.param.type == "Scale":
                layer.blobs[0].uniform_(0.5, 1.5, generator=g)
                layer.blobs[1].normal_(generator=g)


def test_channels_last_tops_equal_the_unfolded_net_and_leave_as_plain_tensors():
    torch.manual_seed(0)
    folded = TorchNet(RESIDUAL_NET, keep_blobs=("c",))
    plain = TorchNet(RESIDUAL_NET, fold=False, keep_blobs=("c",))
    _random_statistics(folded)
    plain.load_state_dict(folded.state_dict())
    seen = []
    folded.abs.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    # the module-called AbsVal and the InnerProduct read the channels-last sum through a contiguous()
    readers = {n.name for n in folded.graph.nodes if n.op == "call_method" and n.target == "contiguous"
               for n in n.users}
    assert any("abs" in r for r in readers) and any("ip" in r for r in readers)
    for x in (torch.randn(2, 3, 11, 11), torch.randn(3, 3, 12, 12)):
        with torch.inference_mode():
            got, expected = folded(data=x), plain(data=x)
        assert set(got) == {"head", "abs", "ip", "c"}
        for blob, value in expected.items():
            assert got[blob].is_contiguous(), blob
            torch.testing.assert_close(got[blob], value, rtol=1e-5, atol=1e-5)
    assert seen == [True, True]


def _res_deploy_at_33():
    """res/deploy with its inputs at 33 x 33 (the 0.75 and 0.5 scales, the fed-in scores and the xy grid follow)."""
    param = read_net(ROOT / "models" / "segaware" / "res" / "deploy.prototxt")
    sizes = {513: 33, 385: 25, 257: 17, 65: 5}
    for lp in param.layer:
        if lp.type in ("Input", "DummyData"):
            dims = (lp.input_param.shape or lp.dummy_data_param.shape)[0].dim
            dims[2:] = [sizes[d] for d in dims[2:]]
    return text_format.MessageToString(param)


def test_res_deploy_folded_in_channels_last_equals_unfolded():
    text = _res_deploy_at_33()
    folded, plain = TorchNet(text), TorchNet(text, fold=False)
    fill_net_hash(folded)
    plain.load_state_dict(folded.state_dict())
    torch.manual_seed(0)
    inputs = {name: torch.randn(folded.blob_shapes[name]) for name in folded.inputs}
    with torch.inference_mode():
        got, expected = folded(**inputs), plain(**inputs)
    for blob, value in expected.items():
        assert got[blob].is_contiguous(), blob
        scale = value.abs().max().item()
        assert scale > 0, blob
        torch.testing.assert_close(got[blob], value, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_a_channels_last_input_in_inference(method):
    """MAX pools a channels-last input there and keeps the layout; AVE hands back the plain layout."""
    x = torch.randint(-3, 4, (1, 16, 96, 96)).float()  # MAX: large enough for the separable path on NCHW
    layer = make_layer(f'type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 }}',
                       [x.shape])
    with torch.inference_mode():
        plain, last = layer(x), layer(x.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous()
    assert last.is_contiguous(memory_format=torch.channels_last if method == "MAX" else torch.contiguous_format)
    assert torch.equal(plain, last)
