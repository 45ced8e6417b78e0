"""NormConv and NormConvMeanfield (segaware normalised convolutions)."""
import numpy as np
import torch

from caffe_layers import Net
from golden import FLT_MAX_100, check_golden, gradcheck_layer, load_case, make_layer



def test_normconvmeanfield_init_golden():
    case = load_case("normconvmeanfield_init")
    net = Net(str(case["prototxt"]), phase="test")
    for i in range(3):  # the original's initialisation: identity, identity, -identity (Potts)
        np.testing.assert_array_equal(net.params["L"][i].data, case[f"param:L:{i}"])
    check_golden("normconvmeanfield_init", net=net)


def test_normconvmeanfield_given_golden():
    check_golden("normconvmeanfield_given")


MEANFIELD = ('type: "NormConvMeanfield" norm_conv_meanfield_param { num_iterations: %d '
             'kernel_size: 3 pad: 2 dilation: 2 kernel_size: 3 pad: 1 dilation: 1 scale: 0.7 scale: 0.3 '
             'remove_center: %s remove_bounds: %s remove_center: true remove_bounds: false }')


def test_normconvmeanfield_gradcheck():
    shapes = [(1, 3, 6, 5), (1, 3, 6, 5), (1, 2, 6, 5), (1, 2, 6, 5)]
    layer = gradcheck_layer(MEANFIELD % (2, "true", "true"), shapes)
    torch.manual_seed(1)
    params = [torch.randn(1, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    names = [n for n, _ in layer.named_parameters()]
    fn = lambda *a: torch.func.functional_call(layer, dict(zip(names, a[4:])), a[:4])  # noqa: E731
    args = [t.requires_grad_(True) for t in inputs + params]
    assert torch.autograd.gradcheck(fn, tuple(args), fast_mode=True)
    gradcheck_layer(MEANFIELD % (3, "false", "false"), [(2, 2, 4, 4), (2, 2, 4, 4), (2, 3, 4, 4), (2, 2, 4, 4)],
                    fast_mode=True)


def test_normconvmeanfield_sets_param_diffs_instead_of_accumulating():
    """The quirk by default, and norm_conv_meanfield_param { accumulate_param_diffs: true } (ours)."""
    layer = MEANFIELD % (2, "true", "true")
    rng = np.random.RandomState(0)
    u, e, top = rng.randn(1, 3, 5, 5), rng.randn(1, 2, 5, 5), rng.randn(1, 3, 5, 5)
    diffs = {}
    for accumulate in (False, True):
        option = layer[:-1] + "accumulate_param_diffs: true }" if accumulate else layer
        text = ('name: "m" force_backward: true input: "u" input_shape { dim: 1 dim: 3 dim: 5 dim: 5 } '
                'input: "e" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 } '
                'layer { name: "L" ' + option + ' bottom: "u" bottom: "u" bottom: "e" bottom: "e" top: "q" }')
        net = Net(text)
        assert net.layer_dict["L"].module.accumulate_param_diffs == accumulate
        for _ in range(2):
            net.forward(u=u, e=e)
            net.blobs["q"].diff[...] = top
            net.backward()
        diffs[accumulate] = [p.diff.copy() for p in net.params["L"]]
    for once, twice in zip(*diffs.values()):
        assert np.abs(once).max() > 0
        np.testing.assert_allclose(twice, 2 * once, rtol=1e-5, atol=1e-6)


def test_normconvmeanfield_bad_settings():
    import pytest
    shapes = [(1, 3, 6, 5), (1, 3, 6, 5), (1, 2, 6, 5), (1, 2, 6, 5)]
    with pytest.raises(ValueError, match="kernel_size must be given once for each"):
        make_layer('type: "NormConvMeanfield" norm_conv_meanfield_param { num_iterations: 2 kernel_size: 3 '
                   'dilation: 1 }', shapes)
    with pytest.raises(ValueError, match="must keep the 6x5 size"):
        make_layer('type: "NormConvMeanfield" norm_conv_meanfield_param { num_iterations: 2 kernel_size: 3 '
                   'kernel_size: 3 dilation: 1 dilation: 1 }', shapes)
    with pytest.raises(ValueError, match="greater than 1"):
        make_layer('type: "NormConvMeanfield" norm_conv_meanfield_param { num_iterations: 1 kernel_size: 3 '
                   'kernel_size: 3 dilation: 1 dilation: 1 pad: 1 pad: 1 }', shapes)


def naive_norm_conv(img, emb, w, b, scale, k, pad, dil, group, norm, rc, rb):
    """Loop version of the original's forward (im2dist + softmax + grouped gemm), in float64."""
    n, c, h, wd = img.shape
    o = w.shape[0]
    ho, wo = h + 2 * pad - dil * (k - 1), wd + 2 * pad - dil * (k - 1)
    out = np.zeros((n, o, ho, wo))
    for b_ in range(n):
        for y in range(ho):
            for x in range(wo):
                cy, cx = y - pad + (k // 2) * dil, x - pad + (k // 2) * dil
                d = np.zeros(k * k)
                vals = np.zeros((c, k * k))
                for i in range(k):
                    for j in range(k):
                        yy, xx = y - pad + i * dil, x - pad + j * dil
                        inside = 0 <= yy < h and 0 <= xx < wd
                        if inside:
                            vals[:, i * k + j] = img[b_, :, yy, xx]
                        if not (0 <= cy < h and 0 <= cx < wd):
                            continue
                        if rc and (i, j) == (k // 2, k // 2):
                            d[i * k + j] = FLT_MAX_100
                        elif inside:
                            diff = emb[b_, :, cy, cx] - emb[b_, :, yy, xx]
                            d[i * k + j] = np.abs(diff).sum() if norm == "L1" else (diff ** 2 / 2).sum()
                        elif rb:
                            d[i * k + j] = FLT_MAX_100
                logits = d if scale is None else -scale * d
                soft = np.exp(logits - logits.max())
                soft /= soft.sum()
                for oo in range(o):
                    g = oo // (o // group)
                    cs = range(g * (c // group), (g + 1) * (c // group))
                    out[b_, oo, y, x] = sum((w[oo, ci - cs[0]].reshape(-1) * vals[ci] * soft).sum() for ci in cs)
                    out[b_, oo, y, x] += 0 if b is None else b[oo]
    return out


def _normconv_text(extra="", norm="L2", rc="true", rb="true", group=2, bias="true", scale_term="true"):
    return (f'type: "NormConv" convolution_param {{ num_output: 4 kernel_size: 3 pad: 2 dilation: 2 group: {group} '
            f'bias_term: {bias} weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "gaussian" std: 1 }} '
            f'{extra} }} norm_conv_param {{ norm: {norm} scale_term: {scale_term} remove_center: {rc} '
            f'remove_bounds: {rb} scale_filler {{ type: "constant" value: 0.8 }} }}')


def test_normconv_forward_matches_loop_reference():
    rng = np.random.RandomState(0)
    img, emb = rng.randn(2, 4, 6, 5), rng.randn(2, 3, 6, 5)
    for norm, rc, rb, group, bias, scale_term in [("L2", "true", "true", 2, "true", "true"),
                                                  ("L1", "false", "false", 1, "false", "true"),
                                                  ("L2", "true", "false", 4, "true", "false")]:
        layer = make_layer(_normconv_text("", norm, rc, rb, group, bias, scale_term), [img.shape, emb.shape])
        got = layer(torch.tensor(img), torch.tensor(emb)).detach().numpy()
        w = layer.blobs[0].detach().numpy()
        b = layer.blobs[1].detach().numpy() if bias == "true" else None
        scale = float(layer.blobs[-1].detach()) if scale_term == "true" else None  # quirk: without one, softmax(+dist)
        ref = naive_norm_conv(img, emb, w, b, scale, 3, 2, 2, group, norm, rc == "true", rb == "true")
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_normconv_blobs_and_gradcheck():
    layer = make_layer(_normconv_text(), [(1, 4, 5, 5), (1, 3, 5, 5)])
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 2, 3, 3), (4,), (1,)]
    assert float(layer.blobs[2].detach()) == float(np.float32(0.8))
    gradcheck_layer(_normconv_text(), [(2, 4, 5, 4), (2, 3, 5, 4)], fast_mode=True)
    gradcheck_layer(_normconv_text("stride: 2", rc="false", rb="false", group=1), [(1, 4, 6, 5), (1, 2, 6, 5)],
                    fast_mode=True)


def test_normconv_l1_uses_im2dist_backward():
    # L1 embeddings get the original dist2im backward (sign(0) = -1), not the true gradient:
    # gradcheck the image and the parameters, and pin the embedding diff to the Im2dist op's.
    gradcheck_layer(_normconv_text(norm="L1"), [(1, 4, 5, 5), (1, 3, 5, 5)], grad_inputs=[0], fast_mode=True)
    from caffe_layers.ops.im2dist import im2dist
    from caffe_layers.ops.norm_conv import norm_conv_filter
    torch.manual_seed(0)
    layer = make_layer(_normconv_text(norm="L1"), [(1, 4, 5, 5), (1, 3, 5, 5)])
    img = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    emb = torch.randn(1, 3, 5, 5, dtype=torch.float64).requires_grad_(True)
    emb.data[:, :, 2, 2] = emb.data[:, :, 2, 3]  # a zero difference
    layer(img, emb).sum().backward()
    emb2 = emb.detach().clone().requires_grad_(True)
    dist = im2dist(emb2, 3, 2, 1, 2, "L1", True, True)
    norm_conv_filter(img, dist, layer.blobs[0], layer.blobs[1], layer.blobs[2], 2, 1, 2, 2).sum().backward()
    torch.testing.assert_close(emb.grad, emb2.grad)


def test_normconv_1x1_drops_image_grad():
    text = ('type: "NormConv" convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } '
            'norm_conv_param { scale_filler { type: "constant" value: 1 } }')
    layer = make_layer(text, [(1, 2, 3, 3), (1, 2, 3, 3)])
    img = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = layer(img, torch.randn(1, 2, 3, 3, dtype=torch.float64))
    assert not out.requires_grad or torch.autograd.grad(out.sum(), img, allow_unused=True)[0] is None
    gradcheck_layer(text, [(1, 2, 3, 3), (1, 2, 3, 3)], grad_inputs=[1])


def test_normconv_drop_1x1_image_grad_option():
    text = ('type: "NormConv" convolution_param { num_output: 2 kernel_size: 1 '
            'weight_filler { type: "gaussian" std: 1 } } norm_conv_param { scale_filler { type: "constant" value: 1 } drop_1x1_image_grad: false }')
    shapes = [(1, 2, 3, 3), (1, 2, 3, 3)]
    layer = make_layer(text, shapes)
    assert not layer.drop_1x1_image_grad
    img = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(layer(img, torch.randn(1, 2, 3, 3, dtype=torch.float64)).sum(), img)[0]
    assert grad.abs().max() > 0  # the image gets a diff now
    gradcheck_layer(text, shapes)  # image, embeddings and blobs: the true gradient


def test_normconv_bad_bottoms():
    import pytest
    with pytest.raises(ValueError, match="NormConv layer 'L'.*same N, H and W"):
        make_layer(_normconv_text(), [(1, 4, 5, 5), (1, 3, 4, 5)])
