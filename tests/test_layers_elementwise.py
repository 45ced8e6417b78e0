"""Elementwise and normalisation layers: golden cases, float64 gradchecks, Caffe's quirks."""
import math

import numpy as np
import pytest
import torch
from golden import check_golden, gradcheck_layer, make_layer

from caffe_layers.formats.proto import TEST, TRAIN

GOLDEN = ["absval", "batchnorm_global", "eltwise_max", "eltwise_prod2", "eltwise_prod3", "eltwise_sumcoeff",
          "exp_b2s05sh1", "exp_scale-1", "power_full", "power_scale", "relu", "scale_axes0", "scale_bias",
          "tile_a1t4", "tile_a2t3"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name):
    check_golden(name)


def _positive(shape, low=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) + low


def _away_from_zero(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.where(x.abs() < 0.1, x.sign() * 0.1 + x, x)


GRADCHECKS = [
    ('type: "PReLU" prelu_param { filler { type: "uniform" min: 0.1 max: 0.5 } }', [(2, 3, 4, 5)]),
    ('type: "PReLU" prelu_param { channel_shared: true }', [(2, 3, 4)]),
    ('type: "ELU" elu_param { alpha: 0.7 }', [(2, 3, 4, 5)]),
    ('type: "Sigmoid"', [(2, 3, 4, 5)]),
    ('type: "TanH"', [(2, 3, 4, 5)]),
    ('type: "BNLL"', [(2, 3, 4, 5)]),
    ('type: "Softmax"', [(2, 3, 2, 3)]),
    ('type: "Softmax" softmax_param { axis: -1 }', [(2, 3, 4)]),
    ('type: "Tile" tile_param { axis: 1 tiles: 3 }', [(2, 3, 4)]),
    ('type: "Tile" tile_param { axis: -1 tiles: 2 }', [(2, 3, 4)]),
    ('type: "Power" power_param { power: 3 scale: 0.5 shift: 0.2 }', [(2, 3, 4, 5)]),
    ('type: "Power" power_param { power: 2 scale: -1.5 shift: 0.5 }', [(2, 3, 4, 5)]),
    ('type: "Power" power_param { scale: 2 shift: 1 }', [(2, 3, 4, 5)]),
    ('type: "Power" power_param { power: 0 scale: 2 shift: 1 }', [(2, 3, 4, 5)]),
    ('type: "Exp"', [(2, 3, 4, 5)]),
    ('type: "Exp" exp_param { base: 3 scale: -0.5 shift: 0.25 }', [(2, 3, 4, 5)]),
    ('type: "Dropout"', [(2, 3, 4, 5)]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }', [(2, 3, 4)] * 3),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3, 4)] * 3),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', [(2, 3, 4)] * 3),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3, 4)] * 3),
    ('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } '
     'bias_filler { type: "gaussian" } }', [(2, 3, 4, 5)]),
    ('type: "Scale" scale_param { axis: 1 num_axes: -1 filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Scale" scale_param { num_axes: 0 bias_term: true filler { value: 0.5 } '
     'bias_filler { value: 0.1 } }', [(2, 3, 4)]),
    ('type: "Scale" scale_param { axis: 0 bias_term: true bias_filler { type: "gaussian" } }', [(2, 3, 4), (2, 3)]),
    ('type: "Scale"', [(2, 3, 4), ()]),
    ('type: "Bias" bias_param { axis: 2 filler { type: "gaussian" } }', [(2, 3, 4, 5)]),
    ('type: "Bias" bias_param { num_axes: 0 filler { value: 0.3 } }', [(2, 3, 4)]),
    ('type: "Bias" bias_param { axis: -2 }', [(2, 3, 4, 5), (4, 5)]),
    ('type: "MVN"', [(2, 3, 4, 5)]),
    ('type: "MVN" mvn_param { across_channels: true }', [(2, 3, 4, 5)]),
    ('type: "MVN" mvn_param { normalize_variance: false }', [(2, 3, 4, 5)]),
]


@pytest.mark.parametrize("text,shapes", GRADCHECKS, ids=[t.split('"')[1] + str(i) for i, (t, _) in
                                                         enumerate(GRADCHECKS)])
def test_gradcheck(text, shapes):
    inputs = [_away_from_zero(s, seed=i) for i, s in enumerate(shapes)]
    if "MAX" in text:  # no ties: well separated bottoms
        inputs = [x + 10 * i * (-1) ** i for i, x in enumerate(inputs)]
    gradcheck_layer(text, shapes, inputs=inputs)


def test_gradcheck_absval_log():
    gradcheck_layer('type: "AbsVal"', [(2, 3, 4, 5)], inputs=[_away_from_zero((2, 3, 4, 5))])
    gradcheck_layer('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', [(2, 3, 4)],
                    inputs=[_positive((2, 3, 4))])
    gradcheck_layer('type: "Log"', [(2, 3, 4)], inputs=[_positive((2, 3, 4))])


def test_gradcheck_batchnorm():
    text = 'type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.01 }'
    layer = make_layer(text, [(2, 3, 4, 5)])
    assert layer.use_global_stats
    gradcheck_layer('type: "BatchNorm"', [(2, 3, 4, 5)], phase=TRAIN, params=False)
    gradcheck_layer('type: "BatchNorm"', [(6, 4)], phase=TRAIN, params=False)
    # global stats: set positive statistics through a functional call of a fresh layer
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.2, -0.4, 0.6]))
        layer.blobs[1].copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.blobs[2].fill_(2.0)
    assert torch.autograd.gradcheck(layer, (x,))


def test_threshold():
    layer = make_layer('type: "Threshold" threshold_param { threshold: 0.5 }', [(5,)])
    x = torch.tensor([-1.0, 0.5, 0.50001, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.tolist() == [0, 0, 1, 1, 0]
    assert not y.requires_grad  # Caffe's Threshold has no backward


def test_absval_sign_zero():
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    make_layer('type: "AbsVal"', [(3,)])(x).sum().backward()
    assert x.grad.tolist() == [-1, 0, 1]


def test_prelu_zero_is_negative_side():
    layer = make_layer('type: "PReLU"', [(1, 2, 2)])
    x = torch.tensor([[[0.0, 1.0], [-2.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y.detach(), torch.tensor([[[0.0, 1.0], [-0.5, 0.0]]], dtype=torch.float64))
    y.sum().backward()
    assert x.grad.flatten().tolist() == [0.25, 1, 0.25, 0.25]
    assert layer.blobs[0].grad.tolist() == [0.0, -2.0]


def test_power_caffe_backward_at_zero():
    x = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    layer = make_layer('type: "Power" power_param { power: 3 scale: 2 }', [(2,)])
    layer(x).sum().backward()
    assert math.isnan(x.grad[0]) and x.grad[1] == pytest.approx(3 * 2 * 4 ** 2)  # power * y / x
    # power 0 or scale 0: a constant, zero gradient
    layer = make_layer('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', [(2,)])
    x.grad = None
    y = layer(x)
    y.sum().backward()
    assert y.tolist() == [9, 9] and x.grad.tolist() == [0, 0]


def test_power_exact_grad_option():
    x = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    layer = make_layer('type: "Power" power_param { power: 3 scale: 2 exact_grad: true }', [(3,)])
    assert layer.exact_grad
    layer(x).sum().backward()
    assert x.grad.tolist() == [0.0, pytest.approx(96.0), pytest.approx(24.0)]  # 3 * 2 * (2x)^2, finite at 0
    layer = make_layer('type: "Power" power_param { power: 0.5 shift: 1 exact_grad: true }', [(3,)])
    assert torch.autograd.gradcheck(layer, (torch.rand(3, dtype=torch.float64, requires_grad=True),))


def test_exp_e_base_shift_quirk():
    x = torch.zeros(3, dtype=torch.float64)
    layer = make_layer('type: "Exp" exp_param { shift: 0.5 }', [(3,)])
    assert torch.isnan(layer(x)).all()  # pow(-1, 0.5), as in the segaware fork
    layer = make_layer('type: "Exp" exp_param { shift: 2 }', [(3,)])
    assert layer(x).tolist() == [1, 1, 1]  # pow(-1, 2)
    with pytest.raises(ValueError, match="Exp.*strictly positive"):
        make_layer('name: "e" type: "Exp" exp_param { base: -2 }', [(3,)])


def test_exp_fix_e_shift_option():
    x = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    for shift in (0.5, 2):
        layer = make_layer(f'type: "Exp" exp_param {{ shift: {shift} scale: 3 fix_e_shift: true }}', [(3,)])
        assert layer(x).tolist() == pytest.approx(torch.exp(shift + 3 * x).tolist())  # BVLC's exp(shift)
    # the option changes nothing for a positive base: base^shift is already right there
    both = [make_layer(f'type: "Exp" exp_param {{ base: 2 shift: 0.5 {o} }}', [(3,)])(x)
            for o in ("", "fix_e_shift: true")]
    assert torch.equal(*both) and both[0].tolist() == pytest.approx((2 ** (0.5 + x)).tolist())


def test_log_values():
    x = torch.tensor([1.0, 4.0, 9.5], dtype=torch.float64)
    layer = make_layer('type: "Log" log_param { base: 2 scale: 2 shift: -1 }', [(3,)])
    assert layer(x).tolist() == pytest.approx(np.log2(2 * x.numpy() - 1).tolist())


def test_bnll_values_and_backward():
    x = torch.tensor([-800.0, -1.0, 0.0, 2.0, 800.0], dtype=torch.float64, requires_grad=True)
    y = make_layer('type: "BNLL"', [(5,)])(x)
    expected = [0.0, math.log1p(math.exp(-1)), math.log(2), 2 + math.log1p(math.exp(-2)), 800.0]
    assert y.tolist() == pytest.approx(expected)
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.0, 1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-2)), 1.0])


def test_eltwise_max_ties():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', [(4,)] * 3)
    a = torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    y = layer(a, b, c)
    assert y.tolist() == [1, 1, 2, 5]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    # bottoms 0 and 1 tie -> 1 wins; a later bottom wins only if strictly greater
    assert a.grad.tolist() == [0, 2, 0, 0]
    assert b.grad.tolist() == [1, 0, 3, 0]
    assert c.grad.tolist() == [0, 0, 0, 4]


def test_eltwise_prod_gradients_at_zero():
    x = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    make_layer('type: "Eltwise" eltwise_param { operation: PROD }', [(2,)] * 2)(x, y).sum().backward()
    assert x.grad.tolist() == [3, 4] and y.grad.tolist() == [0, 2]
    x.grad = y.grad = None
    text = 'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }'
    make_layer(text, [(2,)] * 2)(x, y).sum().backward()
    assert math.isnan(x.grad[0]) and x.grad[1] == 4 and y.grad.tolist() == [0, 2]  # y / x


def test_eltwise_errors():
    with pytest.raises(ValueError, match="'E'.*one coeff per bottom"):
        make_layer('name: "E" type: "Eltwise" eltwise_param { coeff: 1 }', [(2,)] * 2)
    with pytest.raises(ValueError, match="only allowed for SUM"):
        make_layer('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [(2,)] * 2)
    layer = make_layer('name: "E" type: "Eltwise"', [(2,), (3,)])
    with pytest.raises(ValueError, match="'E'.*bottom 1 has shape"):
        layer.top_shapes([(2,), (3,)])


def test_scale_shapes_and_errors():
    layer = make_layer('type: "Scale" scale_param { axis: -3 num_axes: 2 bias_term: true }', [(2, 3, 4, 5)])
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4), (3, 4)]
    assert layer.blobs[0].eq(1).all() and layer.blobs[1].eq(0).all()
    layer = make_layer('type: "Scale" scale_param { num_axes: 0 }', [(2, 3)])
    assert layer.blobs[0].shape == ()
    # two bottoms: the bias takes bottom 1's axis count
    layer = make_layer('type: "Scale" scale_param { bias_term: true }', [(2, 3, 4), (3, 4)])
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4)]
    with pytest.raises(ValueError, match="'S'.*extends past"):
        make_layer('name: "S" type: "Scale" scale_param { axis: 1 num_axes: 3 }', [(2, 3, 4)])
    layer = make_layer('name: "S" type: "Scale"', [(2, 3, 4), (4,)])
    with pytest.raises(ValueError, match="'S'.*does not match"):
        layer.top_shapes([(2, 3, 4), (4,)])


def test_bias_values():
    layer = make_layer('type: "Bias" bias_param { axis: 2 filler { type: "gaussian" } }', [(2, 3, 4)])
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(layer(x), x + layer.blobs[0].detach())


def test_mvn_forward_and_caffe_backward():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    eps = 0.5  # large, so that Caffe's backward visibly differs from the true gradient
    layer = make_layer(f'type: "MVN" mvn_param {{ eps: {eps} }}', [x.shape])
    y = layer(x)
    xs = x.detach().reshape(6, -1)
    xc = xs - xs.mean(1, keepdim=True)
    std = xc.pow(2).mean(1, keepdim=True).sqrt() + eps  # eps added to the standard deviation
    assert torch.allclose(y.detach(), (xc / std).reshape(x.shape))
    y.backward(dy)
    yd, d = y.detach().reshape(6, -1), dy.reshape(6, -1)
    caffe = (d - d.mean(1, keepdim=True) - (d * yd).mean(1, keepdim=True) * yd) / std
    assert torch.allclose(x.grad, caffe.reshape(x.shape))


def test_mvn_exact_grad_option():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    layer = make_layer('type: "MVN" mvn_param { eps: 0.5 exact_grad: true }', [x.shape])
    caffe = make_layer('type: "MVN" mvn_param { eps: 0.5 }', [x.shape])
    assert torch.equal(layer(x), caffe(x))  # the forward is the same
    assert torch.autograd.gradcheck(layer, (x,))
    exact = torch.autograd.grad(layer(x), x, dy)[0]
    assert not torch.allclose(exact, torch.autograd.grad(caffe(x), x, dy)[0], atol=1e-3)


def test_mvn_legacy_shape():
    layer = make_layer('name: "M" type: "MVN" mvn_param { across_channels: true }', [(3, 4)])
    assert layer.top_shapes([(3, 4)]) == [(3, 4, 1, 1)]
    y = layer(torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    assert y.shape == (3, 4, 1, 1) and torch.allclose(y.sum((1, 2, 3)), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="'M'.*at most 4 axes"):
        layer.top_shapes([(1, 2, 3, 4, 5)])


def test_dropout_test_and_train():
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    test = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x.shape], phase=TEST)
    y = test(x)
    assert torch.equal(y, x)
    train = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x.shape], phase=TRAIN)
    torch.manual_seed(0)
    y = train(x)
    mask = train.mask
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - 0.7) < 0.05
    assert torch.allclose(y, x * mask / 0.7)
    dy = torch.randn_like(x)
    y.backward(dy)
    assert torch.allclose(x.grad, dy * mask / 0.7)
    torch.manual_seed(0)
    assert torch.equal(train(x), y)  # deterministic under a seed
    with pytest.raises(ValueError, match="dropout_ratio"):
        make_layer('type: "Dropout" dropout_param { dropout_ratio: 1 }', [(2,)])


def _bn_reference_stats(x):
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


def test_batchnorm_train_moving_average_two_iterations():
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }'
    layer = make_layer(text, [(2, 3, 4, 5)], phase=TRAIN)
    assert not layer.use_global_stats
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    mean_sum = torch.zeros(3, dtype=torch.float64)
    var_sum = torch.zeros(3, dtype=torch.float64)
    factor = 0.0
    m = 2 * 4 * 5
    for x in xs:
        y = layer(x)
        mean, var = _bn_reference_stats(x)
        assert torch.allclose(y, (x - mean[:, None, None]) / (var[:, None, None] + 0.001).sqrt())
        factor = 0.9 * factor + 1
        mean_sum = 0.9 * mean_sum + mean
        var_sum = 0.9 * var_sum + var * m / (m - 1)
        assert layer.blobs[2].item() == pytest.approx(factor)
        assert torch.allclose(layer.blobs[0].detach(), mean_sum)
        assert torch.allclose(layer.blobs[1].detach(), var_sum)
    assert factor == pytest.approx(1.9)
    # the same blobs in TEST give the running averages
    test = make_layer(text, [(2, 3, 4, 5)], phase=TEST)
    test.load_state_dict(layer.state_dict())
    x = xs[0]
    mean, var = mean_sum / factor, var_sum / factor
    assert torch.allclose(test(x), (x - mean[:, None, None]) / (var[:, None, None] + 0.001).sqrt())
    assert torch.equal(test.blobs[2].detach(), layer.blobs[2].detach())  # TEST does not update


def test_batchnorm_global_zero_factor_and_no_param_grad():
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [(2, 3)], phase=TRAIN)
    with torch.no_grad():
        layer.blobs[0].fill_(5.0)
        layer.blobs[1].fill_(7.0)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)  # factor 0 -> statistics 0
    assert torch.allclose(y, x / math.sqrt(1e-5))
    y.sum().backward()
    assert all(b.grad is None for b in layer.blobs)
    assert layer.blobs[0][0].item() == 5.0  # no update without update_global_stats


def test_batchnorm_update_global_stats():
    text = ('type: "BatchNorm" batch_norm_param { use_global_stats: true update_global_stats: true '
            'moving_average_fraction: 0.5 eps: 0.01 }')
    layer = make_layer(text, [(2, 3, 4)], phase=TRAIN)
    b0, b1 = torch.tensor([0.2, -0.4, 0.6]), torch.tensor([1.0, 2.0, 0.5])
    with torch.no_grad():
        layer.blobs[0].copy_(b0)
        layer.blobs[1].copy_(b1)
        layer.blobs[2].fill_(2.0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gmean = (b0 / 2).double()[:, None]
    var = (x.detach() - gmean).pow(2).mean((0, 2))  # around the stored mean
    assert torch.allclose(y, (x - gmean) / (var[:, None] + 0.01).sqrt())
    assert layer.blobs[2].item() == 2.0  # 0.5 * 2 + 1
    assert torch.allclose(layer.blobs[0].detach(), gmean[:, 0] + 0.5 * b0.double())
    assert torch.allclose(layer.blobs[1].detach(), var * 8 / 7 + 0.5 * b1.double())
    dy = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    y.backward(dy)
    assert torch.allclose(x.grad, dy / (var[:, None] + 0.01).sqrt())  # the variance taken as constant
    # the update is only in TRAIN
    test = make_layer(text, [(2, 3, 4)], phase=TEST)
    test(x)
    assert test.blobs[2].item() == 0.0


def test_batchnorm_channel_error():
    layer = make_layer('name: "B" type: "BatchNorm"', [(2, 3, 4)])
    with pytest.raises(ValueError, match="'B'.*4 channels, expected 3"):
        layer.top_shapes([(2, 4, 4)])


def test_batchnorm_train_in_net(tmp_path):
    from caffe_layers import Net

    proto = tmp_path / "bn.prototxt"
    proto.write_text('input: "x" input_shape { dim: 4 dim: 2 dim: 3 }\n'
                     'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }\n')
    net = Net(str(proto), phase="train")
    x = np.random.RandomState(0).randn(4, 2, 3).astype(np.float32)
    for _ in range(2):
        y = net.forward(x=x)["y"]
    np.testing.assert_allclose(y.mean((0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(net.params["bn"][2].data, [1.999], rtol=1e-6)
    np.testing.assert_allclose(net.params["bn"][0].data, x.mean((0, 2)) * 1.999, rtol=1e-5)


CUDA_CASES = [(text, shapes) for text, shapes in GRADCHECKS if "Dropout" not in text] + [
    ('type: "BatchNorm"', [(2, 3, 4, 5)]), ('type: "AbsVal"', [(2, 3)]), ('type: "Log"', [(2, 3)])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for text, shapes in CUDA_CASES:
        inputs = [_positive(s, seed=i) for i, s in enumerate(shapes)]
        results = []
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            layer = make_layer(text, shapes, phase=TRAIN).to(device)
            xs = [x.to(device).requires_grad_(True) for x in inputs]
            y = layer(*xs)
            y.backward(torch.ones_like(y))
            results.append([y] + [x.grad for x in xs] + [b.grad if b.grad is not None else b for b in layer.blobs])
        for ours, ref in zip(*results):
            torch.testing.assert_close(ours.cpu(), ref, msg=lambda m: f"{text}: {m}")
