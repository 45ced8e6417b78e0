"""Vision layers: Convolution, Deconvolution, InnerProduct, Pooling, LRN, Interp, Crop."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from golden import check_golden, gradcheck_layer, make_layer

GOLDEN_CASES = ["conv_dil2", "conv_bottom_is_im2col", "pool_ave_k3p1s2", "pool_max_k2s2_ceil",
                "pool_max_k3p1s2", "interp_hw", "interp_shrink2", "interp_shrink3_zoom2_pad", "interp_zoom2"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden(name):
    check_golden(name)


# ---- references written from the original loops -------------------------------------------------
def caffe_pool_ref(x, k, p, s, method, ceil_mode=True):
    """Caffe's Forward_cpu/Backward_cpu loops for MAX/AVE: (top, mask, backward(top_diff))."""
    N, C, H, W = x.shape
    out = []
    for size, kk, pp, ss in zip((H, W), k, p, s):
        o = (math.ceil if ceil_mode else math.floor)((size + 2 * pp - kk) / ss) + 1
        if (p[0] or p[1]) and (o - 1) * ss >= size + pp:  # Caffe: if (pad_h_ || pad_w_), both axes
            o -= 1
        out.append(o)
    oh, ow = out
    top = np.zeros((N, C, oh, ow))
    mask = np.full((N, C, oh, ow), -1)
    sizes = np.zeros((oh, ow))
    for ph in range(oh):
        for pw in range(ow):
            hs, ws = ph * s[0] - p[0], pw * s[1] - p[1]
            if method == "MAX":
                he, we = min(hs + k[0], H), min(ws + k[1], W)
                hs, ws = max(hs, 0), max(ws, 0)
                best = np.full((N, C), -np.finfo(np.float32).max)
                for h in range(hs, he):
                    for w in range(ws, we):
                        better = x[:, :, h, w] > best
                        best = np.where(better, x[:, :, h, w], best)
                        mask[:, :, ph, pw] = np.where(better, h * W + w, mask[:, :, ph, pw])
                top[:, :, ph, pw] = best
            else:
                he, we = min(hs + k[0], H + p[0]), min(ws + k[1], W + p[1])
                sizes[ph, pw] = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                top[:, :, ph, pw] = x[:, :, hs:he, ws:we].sum((2, 3)) / sizes[ph, pw]

    def backward(td):
        g = np.zeros_like(x)
        for ph in range(oh):
            for pw in range(ow):
                if method == "MAX":
                    for n in range(N):
                        for c in range(C):
                            # an empty window has mask -1: Caffe writes before the channel's start, we drop it
                            if mask[n, c, ph, pw] >= 0:
                                g[n, c].flat[mask[n, c, ph, pw]] += td[n, c, ph, pw]
                else:
                    hs, ws = max(ph * s[0] - p[0], 0), max(pw * s[1] - p[1], 0)
                    he, we = min(ph * s[0] - p[0] + k[0], H), min(pw * s[1] - p[1] + k[1], W)
                    g[:, :, hs:he, ws:we] += (td[:, :, ph, pw] / sizes[ph, pw])[:, :, None, None]
        return g
    return top, mask, backward


def run_layer(text, x, tops=1, phase="test"):
    x = torch.as_tensor(x, dtype=torch.float64).requires_grad_(True)
    layer = make_layer(text + "".join(f' top: "t{i}"' for i in range(tops)), [tuple(x.shape)], phase)
    return layer, x, layer(x)


# ---- Convolution -------------------------------------------------------------------------------
def test_conv_gradcheck_group_dilation_stride():
    gradcheck_layer('type: "Convolution" convolution_param { num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 '
                    'stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2 '
                    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [(1, 4, 5, 4)], fast_mode=True)


def test_conv_gradcheck_bottom_is_im2col_group():
    gradcheck_layer('type: "Convolution" convolution_param { num_output: 4 group: 2 kernel_size: 2 '
                    'bottom_is_im2col: true weight_filler { type: "gaussian" } }', [(1, 16, 2, 3)], fast_mode=True)


def test_conv_gradcheck_no_bias_axis2_1d():
    layer = gradcheck_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 pad: 1 '
                            'axis: 2 bias_term: false weight_filler { type: "gaussian" } }', [(2, 3, 4, 5)], fast_mode=True)
    assert len(layer.blobs) == 1 and tuple(layer.blobs[0].shape) == (2, 4, 3)


def test_conv_3d_matches_torch():
    layer = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 2 kernel_size: 3 '
                       'kernel_size: 1 stride: 2 weight_filler { type: "gaussian" } }', [(1, 3, 5, 6, 4)])
    x = torch.randn(1, 3, 5, 6, 4, dtype=torch.float64)
    ref = F.conv3d(x, layer.blobs[0], layer.blobs[1], stride=2)
    torch.testing.assert_close(layer(x), ref)
    assert layer(x).shape == (1, 2, 2, 2, 2)


@pytest.mark.parametrize("h,w,k,p,s,d", [(9, 11, 3, 1, 2, 1), (7, 5, 3, 0, 3, 2), (13, 10, 4, 2, 3, 1)])
def test_conv_output_shape(h, w, k, p, s, d):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: {k} pad: {p} '
                       f'stride: {s} dilation: {d} }}', [(1, 2, h, w)])
    ext = d * (k - 1) + 1
    assert layer.top_shapes([(1, 2, h, w)]) == [(1, 3, (h + 2 * p - ext) // s + 1, (w + 2 * p - ext) // s + 1)]


def test_conv_bottom_is_im2col_equals_im2col_then_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    conv = make_layer('type: "Convolution" convolution_param { num_output: 6 group: 2 kernel_size: 3 pad: 1 '
                      'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [x.shape])
    col = F.unfold(x, 3, padding=1).reshape(2, 36, 5, 7)  # Caffe's im2col row order: c, kh, kw
    im2col = make_layer('type: "Convolution" convolution_param { num_output: 6 group: 2 kernel_size: 3 '
                        'pad: 1 stride: 2 bottom_is_im2col: true }', [col.shape])
    assert tuple(im2col.blobs[0].shape) == (6, 2, 3, 3)
    with torch.no_grad():
        im2col.blobs[0].copy_(conv.blobs[0])
        im2col.blobs[1].copy_(conv.blobs[1])
    torch.testing.assert_close(im2col(col), conv(x))


def test_conv_two_bottoms_share_weights(tmp_path):
    from caffe_layers import Net
    net = Net(text_net(tmp_path, 'input: "a" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 } '
                       'input: "b" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 } '
                       'layer { name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" '
                       'convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" } } }'))
    a, b = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    out = net(a=a, b=b)
    layer = net.layer_dict["c"].module
    torch.testing.assert_close(out["yb"], F.conv2d(b, layer.blobs[0], layer.blobs[1]))
    torch.testing.assert_close(out["ya"], F.conv2d(a, layer.blobs[0], layer.blobs[1]))


def text_net(tmp_path, body):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t" ' + body)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ('convolution_param { num_output: 2 }', "kernel_size"),
    ('convolution_param { num_output: 2 kernel_size: 3 group: 2 }', "group 2 must divide the 3 input channels"),
    ('convolution_param { num_output: 3 kernel_size: 1 group: 0 }', "group 0 must divide"),
    ('convolution_param { num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3 }', "not both"),
    ('convolution_param { num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3 }', "once per spatial"),
    ('convolution_param { kernel_size: 3 }', "num_output"),
    ('convolution_param { num_output: 2 kernel_size: 5 }', "kernel extent"),
    ('convolution_param { num_output: 2 kernel_size: 2 bottom_is_im2col: true }', "multiple of the kernel"),
    ('convolution_param { num_output: 2 kernel_size: 1 dilation: 0 }', "dilation must be positive"),
])
def test_conv_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        make_layer(f'name: "myconv" type: "Convolution" {text}', [(1, 3, 4, 4)])
    assert "myconv" in str(err.value)


def test_conv_group_not_dividing_num_output():
    with pytest.raises(ValueError, match="num_output 3 must be a multiple of group 2"):
        make_layer('type: "Convolution" convolution_param { num_output: 3 kernel_size: 1 group: 2 }', [(1, 4, 3, 3)])


# ---- Deconvolution -----------------------------------------------------------------------------
def test_deconv_gradcheck_group_bilinear():
    gradcheck_layer('type: "Deconvolution" convolution_param { num_output: 4 group: 2 kernel_size: 4 stride: 2 '
                    'pad: 1 weight_filler { type: "bilinear" } bias_filler { type: "gaussian" } }', [(1, 2, 2, 3)], fast_mode=True)


@pytest.mark.parametrize("h,w,k,p,s,d", [(5, 7, 4, 1, 2, 1), (3, 6, 3, 0, 3, 2), (4, 4, 5, 2, 1, 1)])
def test_deconv_output_shape(h, w, k, p, s, d):
    layer = make_layer(f'type: "Deconvolution" convolution_param {{ num_output: 3 kernel_size: {k} pad: {p} '
                       f'stride: {s} dilation: {d} }}', [(1, 2, h, w)])
    ext = d * (k - 1) + 1
    assert tuple(layer.blobs[0].shape) == (2, 3, k, k)
    assert layer.top_shapes([(1, 2, h, w)]) == [(1, 3, s * (h - 1) + ext - 2 * p, s * (w - 1) + ext - 2 * p)]


def test_deconv_is_the_adjoint_of_conv():
    """Caffe's deconv forward is conv's backward_cpu_gemm: <deconv(y), x> == <y, conv(x)>."""
    torch.manual_seed(1)
    deconv = make_layer('type: "Deconvolution" convolution_param { num_output: 4 group: 2 kernel_size: 3 '
                        'stride: 2 pad: 1 dilation: 2 bias_term: false weight_filler { type: "gaussian" } }',
                        [(1, 6, 4, 5)])
    y = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    up = deconv(y)
    x = torch.randn(up.shape, dtype=torch.float64)
    conv_x = F.conv2d(x, deconv.blobs[0], None, 2, 1, 2, 2)
    assert conv_x.shape == y.shape
    torch.testing.assert_close((up * x).sum(), (y * conv_x).sum())


def test_deconv_bilinear_upsamples_constant():
    layer = make_layer('type: "Deconvolution" convolution_param { num_output: 3 group: 3 kernel_size: 4 '
                       'stride: 2 pad: 1 bias_term: false weight_filler { type: "bilinear" } }', [(1, 3, 5, 5)])
    out = layer(torch.full((1, 3, 5, 5), 2.0, dtype=torch.float64))
    assert out.shape == (1, 3, 10, 10)
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], torch.full((1, 3, 8, 8), 2.0, dtype=torch.float64))


def test_deconv_bottom_is_im2col_rejected():
    with pytest.raises(ValueError, match="only supported by Convolution"):
        make_layer('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 1 bottom_is_im2col: true }',
                   [(1, 2, 3, 3)])


# ---- InnerProduct ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", ["", "transpose: true", "axis: 2 bias_term: false"])
def test_inner_product_gradcheck(extra):
    gradcheck_layer(f'type: "InnerProduct" inner_product_param {{ num_output: 3 {extra} '
                    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [(2, 3, 2, 2)])


def test_inner_product_shapes_and_values():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 6 axis: 2 transpose: true '
                       'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [x.shape])
    assert tuple(layer.blobs[0].shape) == (20, 6)
    ref = x.reshape(6, 20) @ layer.blobs[0] + layer.blobs[1]
    torch.testing.assert_close(layer(x), ref.reshape(2, 3, 6))
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 6 weight_filler { type: "gaussian" } }',
                       [x.shape])
    assert tuple(layer.blobs[0].shape) == (6, 60) and layer(x).shape == (2, 6)
    with pytest.raises(ValueError, match="incompatible.*60 elements"):
        layer.top_shapes([(2, 3, 4, 4)])
    with pytest.raises(ValueError, match="num_output"):
        make_layer('type: "InnerProduct" inner_product_param { }', [x.shape])


# ---- Pooling -----------------------------------------------------------------------------------
# (kernel, pad, stride); the last has an empty last window (width 8, kernel 1, stride 2, no pad)
# ((3, 1), (1, 0), (2, 3)): width 8 is not padded but height is, so Caffe's rule drops the width's last
# window (3 * 3 >= 8 + 0); the others: pads, stride 1, a global-size kernel, stride > kernel.
POOL_CASES = [((3, 3), (1, 1), (2, 2)), ((3, 2), (0, 1), (2, 3)), ((4, 3), (2, 1), (3, 1)), ((2, 2), (0, 0), (2, 2)),
              ((1, 1), (0, 0), (2, 2)), ((3, 1), (1, 0), (2, 3)), ((3, 3), (1, 1), (1, 1)), ((5, 4), (2, 1), (2, 3)),
              ((7, 8), (0, 0), (1, 1)), ((3, 3), (0, 0), (4, 4))]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("k,p,s,channels", [c + (2,) for c in POOL_CASES] + [c + (40,) for c in POOL_CASES[:3]])
def test_pool_matches_caffe_loops(method, k, p, s, channels):
    # 40 channels (4480 values): torch's kernels run in the channels-last layout
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(2, channels, 7, 8)).astype(np.float64)  # many ties: the first max must win
    text = (f'type: "Pooling" pooling_param {{ pool: {method} kernel_h: {k[0]} kernel_w: {k[1]} '
            f'pad_h: {p[0]} pad_w: {p[1]} stride_h: {s[0]} stride_w: {s[1]} }}')
    tops = 2 if method == "MAX" else 1
    layer, xt, out = run_layer(text, x, tops)
    top = out[0] if tops == 2 else out
    with np.errstate(invalid="ignore", divide="ignore"):  # the empty window divides 0 by 0, as Caffe
        ref, mask, backward = caffe_pool_ref(x, k, p, s, method)
    np.testing.assert_allclose(top.detach().numpy(), ref, rtol=1e-12)  # NaN (0 / 0) where Caffe's is
    if method == "MAX":
        np.testing.assert_array_equal(out[1].numpy(), mask)
    td = rng.standard_normal(ref.shape)
    top.backward(torch.as_tensor(td))
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_grad = backward(td)
    np.testing.assert_allclose(xt.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w,k,p,s", [(9, 11, 3, 1, 2), (10, 7, 3, 2, 3), (6, 6, 2, 1, 2), (5, 8, 3, 0, 2),
                                       (7, 7, 2, 1, 3)])
@pytest.mark.parametrize("mode", ["CEIL", "FLOOR"])
def test_pool_output_shape(h, w, k, p, s, mode):
    layer = make_layer(f'type: "Pooling" pooling_param {{ pool: AVE kernel_size: {k} pad: {p} stride: {s} '
                       f'round_mode: {mode} }}', [(1, 1, h, w)])
    out = []
    for size in (h, w):
        o = (math.ceil if mode == "CEIL" else math.floor)((size + 2 * p - k) / s) + 1
        if p and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    assert layer.top_shapes([(1, 1, h, w)]) == [(1, 1, *out)]


def test_pool_last_window_clipped():
    # height 5: ceil((5 + 2 - 2) / 3) + 1 = 3, but the last window starts at 2 * 3 = 6 >= 5 + 1: dropped;
    # width 6: ceil(6 / 3) + 1 = 3 and 6 < 6 + 1: kept
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 pad: 1 stride: 3 }', [(1, 1, 5, 6)])
    assert layer.top_shapes([(1, 1, 5, 6)]) == [(1, 1, 2, 3)]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pool_gradcheck(method):
    gradcheck_layer(f'type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 pad: 1 stride: 2 }}',
                    [(2, 2, 5, 6)])


def test_pool_global():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    layer = make_layer('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [x.shape])
    torch.testing.assert_close(layer(x), x.mean((2, 3), keepdim=True))
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX global_pooling: true }', [x.shape])
    torch.testing.assert_close(layer(x), x.amax((2, 3), keepdim=True))
    gradcheck_layer('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [(1, 2, 3, 4)])


def test_pool_stochastic_test_phase():
    x = torch.rand(2, 2, 5, 8, dtype=torch.float64) + 0.1
    layer = make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }', [x.shape])
    out = layer(x)
    assert out.shape == (2, 2, 2, 4)  # ceil((5 - 3) / 2) + 1, ceil((8 - 3) / 2) + 1
    win = x[:, :, 2:5, 4:7]
    torch.testing.assert_close(out[:, :, 1, 2], (win * win).sum((2, 3)) / win.sum((2, 3)))
    last = x[:, :, 2:5, 6:8]  # the last column window is clipped to the image
    torch.testing.assert_close(out[:, :, 1, 3], (last * last).sum((2, 3)) / last.sum((2, 3)))
    gradcheck_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }', [(1, 2, 4, 5)],
                    inputs=[torch.rand(1, 2, 4, 5) + 0.5])


def test_pool_stochastic_train_samples_by_value():
    torch.manual_seed(0)
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64).expand(1, 4000, 2, 2).clone().requires_grad_(True)
    layer = make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }', [x.shape],
                       phase="train")
    out = layer(x)
    assert set(out.detach().unique().tolist()) <= {1.0, 3.0}
    frac = (out == 3.0).double().mean().item()
    assert abs(frac - 0.75) < 0.04  # P(3) = 3 / 4
    out.sum().backward()
    picked = x.grad.reshape(4000, 4)
    assert torch.equal(picked.sum(1), torch.ones(4000, dtype=torch.float64))
    assert torch.equal(picked[:, 1] == 1, out.detach().reshape(4000) == 3.0)


@pytest.mark.parametrize("text,message", [
    ('pool: MAX', "kernel_size, or kernel_h and kernel_w"),
    ('pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2', "not both"),
    ('pool: MAX kernel_h: 2', "kernel_size, or kernel_h and kernel_w"),
    ('pool: MAX global_pooling: true kernel_size: 2', "global_pooling"),
    ('pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1', "pad is pad OR"),
    ('pool: STOCHASTIC kernel_size: 3 pad: 1', "padding is implemented only"),
    ('pool: AVE kernel_size: 2 pad: 2', "smaller than kernel"),
    ('pool: AVE kernel_size: 9', "smaller than the kernel"),
])
def test_pool_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        make_layer(f'name: "mypool" type: "Pooling" pooling_param {{ {text} }}', [(1, 1, 5, 5)])
    assert "mypool" in str(err.value)


# ---- LRN ---------------------------------------------------------------------------------------
def lrn_ref(x, size, alpha, beta, k, across):
    N, C, H, W = x.shape
    pre = (size - 1) // 2
    if across:
        scale = np.full_like(x, k)
        for c in range(C):
            for c2 in range(max(c - pre, 0), min(c + pre + 1, C)):
                scale[:, c] += alpha / size * x[:, c2] ** 2
        return x * scale ** -beta
    out = np.zeros_like(x)
    for h in range(H):
        for w in range(W):
            s = (x[:, :, max(h - pre, 0):h + pre + 1, max(w - pre, 0):w + pre + 1] ** 2).sum((2, 3))
            out[:, :, h, w] = x[:, :, h, w] * (1 + alpha * s / size ** 2) ** -beta  # k is unused here
    return out


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size,channels", [(3, 5), (7, 5), (5, 90)])  # a window past all channels; channels-last
def test_lrn_matches_formula_and_gradcheck(region, size, channels):
    text = (f'type: "LRN" lrn_param {{ local_size: {size} alpha: 0.5 beta: 0.75 k: 2 norm_region: {region} }}')
    x = np.random.default_rng(0).standard_normal((2, channels, 4, 6))
    layer = make_layer(text, [x.shape])
    ref = lrn_ref(x, size, 0.5, 0.75, 2.0, region == "ACROSS_CHANNELS")
    np.testing.assert_allclose(layer(torch.as_tensor(x)).numpy(), ref, rtol=1e-12)
    gradcheck_layer(text, [(1, 4, 3, 3)])


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_image_result_independent_of_batch_and_threads(region):
    """An image's float32 output is the same alone, inside a batch and on any thread count (the
    02-fine-tuning notebook asserts fc7 of one image equal in a batch-1 and a batch-10 net); each power
    is the correctly rounded one."""
    text = f'type: "LRN" lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 norm_region: {region} }}'
    x = torch.as_tensor(np.random.default_rng(3).uniform(0, 300, (10, 96, 27, 27)), dtype=torch.float32)
    layer = make_layer(text, [tuple(x.shape)])
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs += [layer(x)[:1], layer(x[:1].clone()), layer(x[:3].clone())[:1]]
    finally:
        torch.set_num_threads(threads)
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    if region == "ACROSS_CHANNELS":
        sq = x[:1] * x[:1]
        scale = sq.clone()
        for j in (1, 2):
            scale[:, j:] += sq[:, :-j]
            scale[:, :-j] += sq[:, j:]
        scale = (scale * (0.0001 / 5) + 1).numpy()
        expected = x[:1].numpy() * np.power(scale.astype(np.float64), -0.75).astype(np.float32)
        np.testing.assert_array_equal(outputs[0].numpy(), expected)


def test_lrn_errors():
    with pytest.raises(ValueError, match="'n'.*local_size must be odd"):
        make_layer('name: "n" type: "LRN" lrn_param { local_size: 4 }', [(1, 3, 2, 2)])
    with pytest.raises(ValueError, match="4 axes"):
        make_layer('type: "LRN"', [(3, 2, 2)])


# ---- Interp ------------------------------------------------------------------------------------
def interp_ref(x, off, eff, out):
    """The original caffe_cpu_interp2 loop, float32 positions."""
    N, C, H, W = x.shape
    y = np.zeros((N, C) + tuple(out))
    if tuple(eff) == tuple(out):
        return x[:, :, off:off + eff[0], off:off + eff[1]].copy()
    rh = np.float32(eff[0] - 1) / np.float32(out[0] - 1) if out[0] > 1 else np.float32(0)
    rw = np.float32(eff[1] - 1) / np.float32(out[1] - 1) if out[1] > 1 else np.float32(0)
    for i in range(out[0]):
        hr = np.float32(rh * np.float32(i))
        h1 = int(hr)
        hp = 1 if h1 < eff[0] - 1 else 0
        l1 = float(hr - np.float32(h1))
        for j in range(out[1]):
            wr = np.float32(rw * np.float32(j))
            w1 = int(wr)
            wp = 1 if w1 < eff[1] - 1 else 0
            m1 = float(wr - np.float32(w1))
            a, b = off + h1, off + w1
            y[:, :, i, j] = ((1 - l1) * ((1 - m1) * x[:, :, a, b] + m1 * x[:, :, a, b + wp])
                             + l1 * ((1 - m1) * x[:, :, a + hp, b] + m1 * x[:, :, a + hp, b + wp]))
    return y


@pytest.mark.parametrize("params,eff,out", [
    ("zoom_factor: 3", (7, 8), (19, 22)),
    ("shrink_factor: 4", (7, 8), (2, 2)),
    ("height: 1 width: 5", (7, 8), (1, 5)),
    ("height: 7 width: 3 pad_beg: 0", (7, 8), (7, 3)),
    ("shrink_factor: 2 zoom_factor: 3 pad_beg: -1 pad_end: -2", (4, 5), (4, 7)),
    ("zoom_factor: 1 pad_beg: -1 pad_end: -1", (5, 6), (5, 6)),
    ("zoom_factor: 2 height: 3 width: 3", (7, 8), (13, 15)),  # zoom alone wins over height/width
])
def test_interp_sizes_and_values(params, eff, out):
    x = np.random.default_rng(1).standard_normal((1, 2, 7, 8))
    layer = make_layer(f'type: "Interp" interp_param {{ {params} }}', [x.shape])
    assert layer.top_shapes([x.shape]) == [(1, 2) + out]
    off = -layer.pad_beg
    np.testing.assert_allclose(layer(torch.as_tensor(x)).numpy(), interp_ref(x, off, eff, out), rtol=1e-6, atol=1e-9)


def test_interp_gradcheck():
    gradcheck_layer('type: "Interp" interp_param { shrink_factor: 2 zoom_factor: 3 pad_beg: -1 pad_end: -1 }',
                    [(1, 2, 6, 7)])
    gradcheck_layer('type: "Interp" interp_param { height: 4 width: 9 }', [(1, 2, 3, 5)])


@pytest.mark.parametrize("params,message", [
    ("pad_beg: 1 zoom_factor: 2", "non-positive padding"),
    ("zoom_factor: 0", "zoom_factor must be positive"),
    ("height: 3", "zoom_factor and/or shrink_factor, or both height and width"),
    ("shrink_factor: 2 pad_beg: -3 pad_end: -3", "must be positive"),
])
def test_interp_errors(params, message):
    with pytest.raises(ValueError, match=message) as err:
        make_layer(f'name: "myinterp" type: "Interp" interp_param {{ {params} }}', [(1, 1, 5, 5)])
    assert "myinterp" in str(err.value)


# ---- Crop --------------------------------------------------------------------------------------
def test_crop_values_shape_and_gradcheck():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    ref = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    layer = make_layer('type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }', [x.shape, ref.shape])
    torch.testing.assert_close(layer(x, ref), x[:, :, 1:5, 2:7])
    layer = make_layer('type: "Crop" crop_param { axis: 1 offset: 1 }', [x.shape, (1, 2, 4, 5)])
    assert layer.top_shapes([x.shape, (1, 2, 4, 5)]) == [(2, 2, 4, 5)]
    torch.testing.assert_close(layer(x, torch.zeros(1, 2, 4, 5)), x[:, 1:3, 1:5, 1:6])
    layer = make_layer('type: "Crop"', [x.shape, (5, 5, 3, 3)])  # default axis 2, offset 0
    torch.testing.assert_close(layer(x, torch.zeros(5, 5, 3, 3)), x[:, :, :3, :3])
    gradcheck_layer('type: "Crop" crop_param { offset: 1 }', [(2, 2, 5, 5), (1, 1, 3, 2)], grad_inputs=[0])


def test_crop_errors():
    with pytest.raises(ValueError, match="'cr'.*out of bounds"):
        make_layer('name: "cr" type: "Crop" crop_param { offset: 3 }', [(1, 1, 5, 5), (1, 1, 3, 3)]).top_shapes(
            [(1, 1, 5, 5), (1, 1, 3, 3)])
    with pytest.raises(ValueError, match="number of offsets"):
        make_layer('type: "Crop" crop_param { axis: 1 offset: 1 offset: 1 }', [(1, 3, 5, 5), (1, 1, 3, 3)])
    with pytest.raises(ValueError, match="takes exactly 2 bottom blobs, got 1"):
        make_layer('type: "Crop"', [(1, 3, 5, 5)])


# ---- CUDA matches CPU ----------------------------------------------------------------------------
CUDA_CASES = [
    ('type: "Convolution" convolution_param { num_output: 4 group: 2 kernel_size: 3 pad: 2 dilation: 2 stride: 2 '
     'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', (2, 4, 7, 6)),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 bottom_is_im2col: true '
     'weight_filler { type: "gaussian" } }', (2, 18, 3, 4)),
    ('type: "Deconvolution" convolution_param { num_output: 2 group: 2 kernel_size: 4 stride: 2 pad: 1 '
     'weight_filler { type: "bilinear" } }', (1, 2, 3, 5)),
    ('type: "InnerProduct" inner_product_param { num_output: 3 transpose: true weight_filler { type: "gaussian" } }',
     (2, 3, 2, 2)),
    ('type: "Pooling" top: "a" top: "b" pooling_param { pool: MAX kernel_size: 3 pad: 1 stride: 2 }', (2, 3, 7, 8)),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 pad: 1 stride: 2 }', (2, 3, 7, 8)),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: ACROSS_CHANNELS }', (2, 5, 3, 4)),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL }', (2, 5, 3, 4)),
    ('type: "Interp" interp_param { shrink_factor: 2 zoom_factor: 3 pad_beg: -1 pad_end: -1 }', (1, 2, 9, 11)),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("text,shape", CUDA_CASES)
def test_cuda_matches_cpu(text, shape):
    torch.manual_seed(0)
    layer = make_layer(text, [shape])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    xc = x.detach().cuda().requires_grad_(True)
    out, outc = layer(x), layer.cuda()(xc)
    out, outc = (out if isinstance(out, tuple) else (out,)), (outc if isinstance(outc, tuple) else (outc,))
    for a, b in zip(out, outc):
        torch.testing.assert_close(b.cpu(), a)
    g = torch.randn(out[0].shape, dtype=torch.float64)
    out[0].backward(g)
    outc[0].backward(g.cuda())
    torch.testing.assert_close(xc.grad.cpu(), x.grad)
