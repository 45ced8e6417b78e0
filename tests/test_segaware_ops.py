"""Segmentation-aware ops of the segaware fork: Im2col, Im2dist, Im2parity, DistLoss, ChannelReduce,
SegAccuracy, UniqueLabel and the "xy" filler, against the original's goldens and its quirks."""
import itertools

import numpy as np
import pytest
import torch

from golden import FLT_MAX_100, check_golden, gradcheck_layer, load_case, make_layer, net_from_case

from caffe_layers.layers.fillers import fill
from caffe_layers.ops.dist_loss import dist_loss
from caffe_layers.ops.im2col import im2col
from caffe_layers.ops.im2dist import im2dist
from caffe_layers.ops.im2parity import im2parity
from caffe_layers.formats.proto import pb

IM2COL = ["im2col_k3p1", "im2col_k3p2d2", "im2col_k5p1s2"]
IM2DIST = ["im2dist_l1_k3p0s2", "im2dist_l1_k3p2d2", "im2dist_l1_k5p10d5_rcrb", "im2dist_l1_k5p2_rc",
           "im2dist_l1_kh3kw5", "im2dist_l2_k3p1", "im2dist_l2_k3p3d2_rb"]
IM2PARITY = ["im2parity_k3p1", "im2parity_k3p1s2_ign", "im2parity_k3p2d2_ign", "im2parity_k5p4_ign"]
DISTLOSS = ["distloss_ign", "distloss_ign_lw2", "distloss_noign"]


# ---- goldens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IM2COL + IM2DIST + DISTLOSS + ["channelreduce_max", "segaccuracy"])
def test_golden(name):
    check_golden(name)


@pytest.mark.parametrize("name", IM2PARITY)
def test_im2parity_golden_exact(name):
    check_golden(name, exact=("parity",))


def test_dummydata_xy_golden_exact():
    check_golden("dummydata_xy", exact=("xy",))


def test_segaware_conv_chain_golden():
    check_golden("segaware_conv_chain")


def test_im2dist_goldens_hold_flt_max_entries():
    # the remove_center / remove_bounds cases really exercise FLT_MAX/100 and zeros for outside centres
    rcrb = load_case("im2dist_l1_k5p10d5_rcrb")["out:dist"]
    assert (rcrb[:, 12] == FLT_MAX_100).all() and (rcrb == FLT_MAX_100).mean() > 0.5
    rb = load_case("im2dist_l2_k3p3d2_rb")["out:dist"]
    assert (rb[:, :, 0, :] == 0).all()  # centre row -3 + 2 = -1 lies outside the image


# ---- Im2col -----------------------------------------------------------------------------------
def test_im2col_layout_is_channel_major():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(1, 2, 3, 4)
    col = im2col(x, (3, 3), (1, 1))
    assert col.shape == (1, 18, 3, 4)
    # row (c=1, ki=1, kj=1) is the centre tap of channel 1: the channel itself
    torch.testing.assert_close(col[0, 9 + 4], x[0, 1])
    # row (c=0, ki=0, kj=0) at output (1, 1) reads input (0, 0); at (0, 0) it reads zero padding
    assert col[0, 0, 1, 1] == x[0, 0, 0, 0] and col[0, 0, 0, 0] == 0


@pytest.mark.parametrize("conv", ["kernel_size: 3 pad: 1", "kernel_size: 3 pad: 2 dilation: 2",
                                  "kernel_h: 2 kernel_w: 3 stride: 2 pad_h: 1 pad_w: 0"])
def test_im2col_gradcheck(conv):
    gradcheck_layer(f'type: "Im2col" convolution_param {{ {conv} }}', [(2, 2, 4, 5)], fast_mode=True)


# ---- Im2dist ------------------------------------------------------------------------------------
def reference_im2dist(x, k, p, s, d, norm, rc, rb, top):
    """Per-pixel loop transcription of the original CPU forward and backward (float64 numpy)."""
    n_, c_, h_, w_ = x.shape
    ho = (h_ + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    wo = (w_ + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    out = np.zeros((n_, k[0] * k[1], ho, wo))
    grad = np.zeros_like(x)
    for n, c, i, j, oh, ow in itertools.product(range(n_), range(c_), range(k[0]), range(k[1]), range(ho), range(wo)):
        hi, wi = oh * s[0] - p[0] + i * d[0], ow * s[1] - p[1] + j * d[1]
        ch, cw = oh * s[0] - p[0] + k[0] // 2 * d[0], ow * s[1] - p[1] + k[1] // 2 * d[1]
        t = i * k[1] + j
        if not (0 <= ch < h_ and 0 <= cw < w_):
            continue
        centre = (hi, wi) == (ch, cw)
        inb = 0 <= hi < h_ and 0 <= wi < w_
        diff = x[n, c, ch, cw] - x[n, c, hi, wi] if inb else 0.0
        if rc and centre:
            out[n, t, oh, ow] = FLT_MAX_100
        elif inb:
            out[n, t, oh, ow] += abs(diff) if norm == "L1" else diff * diff * 0.5
        elif rb:
            out[n, t, oh, ow] = FLT_MAX_100
        if centre:
            continue
        g = (diff if norm == "L2" else (1.0 if diff > 0 else -1.0)) * top[n, t, oh, ow]
        grad[n, c, ch, cw] += g
        if inb:
            grad[n, c, hi, wi] -= g
    return out, grad


GEOMETRIES = [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (0, 0), (2, 2), (1, 1)), ((5, 5), (6, 6), (1, 1), (3, 3)),
              ((2, 3), (1, 2), (1, 2), (2, 1)), ((3, 3), (3, 3), (1, 1), (2, 2))]


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2dist_matches_loop_reference(norm, geometry):
    gen = torch.Generator().manual_seed(1)
    # small integers: many zero differences, so the L1 sign(0) = -1 quirk is exercised
    x = torch.randint(0, 3, (2, 2, 6, 7), generator=gen).double()
    for rc, rb in [(False, False), (True, False), (False, True), (True, True)]:
        xr = x.clone().requires_grad_(True)
        y = im2dist(xr, *geometry, norm=norm, remove_center=rc, remove_bounds=rb)
        top = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(top)
        ref, ref_grad = reference_im2dist(x.numpy(), *geometry, norm, rc, rb, top.numpy())
        np.testing.assert_array_equal(y.detach().numpy(), ref)
        np.testing.assert_allclose(xr.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)


def test_im2dist_l1_backward_zero_difference_sign():
    # constant embeddings: every difference is 0 and every distance is 0, yet the original backward
    # sends -top to the centre for each non-centre tap (sign(0) = -1), in-bounds or not, and +top
    # to each in-bounds neighbour
    x = torch.ones(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    y = im2dist(x, 3, 1, norm="L1")
    assert (y == 0).all()
    y.sum().backward()
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = -8 + 3  # corners: 8 taps as centre, 3 as neighbour
    expected[0, 1:-1] = expected[-1, 1:-1] = expected[1:-1, 0] = expected[1:-1, -1] = -8 + 5
    torch.testing.assert_close(x.grad[0, 0], expected)
    x.grad = None
    im2dist(x, 3, 1, norm="L1", true_gradient=True).sum().backward()
    assert (x.grad == 0).all()


def test_im2dist_l1_true_gradient_option_differs_on_golden():
    case = load_case("im2dist_l1_k3p2d2")
    net = net_from_case(case)
    net.layer_dict["L"].module.true_gradient = True
    with pytest.raises(AssertionError):
        check_golden("im2dist_l1_k3p2d2", net=net)


@pytest.mark.parametrize("extra", ["norm: L2", "norm: L2 remove_center: true remove_bounds: true",
                                   "norm: L1 true_gradient: true", "norm: L1 true_gradient: true remove_bounds: true"])
def test_im2dist_gradcheck(extra):
    gradcheck_layer(f'type: "Im2dist" convolution_param {{ kernel_size: 3 pad: 2 dilation: 2 }} '
                    f'im2dist_param {{ {extra} }}', [(2, 2, 4, 5)], fast_mode=True)


def test_im2dist_l1_default_gradcheck_without_padding():
    # with no padding (no out-of-bounds taps) and distinct values the original L1 backward is the gradient
    gradcheck_layer('type: "Im2dist" convolution_param { kernel_size: 3 stride: 2 } im2dist_param { norm: L1 }',
                    [(1, 2, 7, 6)])


def test_im2dist_defaults_to_half_squared_l2():
    x = torch.tensor([[[[0.0, 3.0]]], [[[1.0, -1.0]]]]).reshape(1, 2, 1, 2)
    layer = make_layer('type: "Im2dist" convolution_param { kernel_h: 1 kernel_w: 3 pad_w: 1 }', [(1, 2, 1, 2)])
    y = layer(x.double())
    # output 0: centre (0, 1) vs right neighbour (3, -1): (9 + 4) / 2; left neighbour is out of bounds: 0
    assert y[0, :, 0, 0].tolist() == [0.0, 0.0, 6.5]


# ---- Im2parity --------------------------------------------------------------------------------
def test_im2parity_quirks():
    lab = torch.tensor([[0.0, 1.0], [2.7, 255.0]]).reshape(1, 1, 2, 2)
    p = im2parity(lab, (1, 3), (0, 1), ignore_label=255)
    # left of (0, 0) is out of bounds and reads label 0, the centre's label: same
    assert p[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]
    # 2.7 truncates to 2 and equals nothing; a pair with 255 gives 255
    assert p[0, :, 1, 0].tolist() == [0.0, 1.0, 255.0]
    # centres outside the image (output row 0 here): ignore label, or 0 when none is set
    # (the original writes an uninitialised value then)
    out = im2parity(lab, 3, 3, dilation=2, ignore_label=7)
    assert out.shape == (1, 9, 4, 4) and (out[0, :, 0] == 7).all() and (out[0, :, 1] != 7).any()
    assert (im2parity(lab, 3, 3, dilation=2)[0, :, 0] == 0).all()
    # several channels: the last one wins
    two = torch.cat([torch.zeros_like(lab), lab], 1)
    torch.testing.assert_close(im2parity(two, 3, 1), im2parity(lab, 3, 1))


# ---- DistLoss ---------------------------------------------------------------------------------
DL = ('type: "DistLoss" convolution_param {{ kernel_size: 3 pad: 1 }} '
      'dist_loss_param {{ alpha: 0.5 beta: 2 ignore_label: 255 {extra} }}')


def _dist_parity(gen, shape=(2, 9, 3, 4)):
    dist = torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    parity = torch.randint(0, 2, shape, generator=gen).double()
    parity[torch.rand(shape, generator=gen) < 0.2] = 255
    return dist, parity


def test_distloss_backward_is_hinge_over_count_and_ignores_loss_weight():
    gen = torch.Generator().manual_seed(2)
    dist, parity = _dist_parity(gen)
    layer = make_layer(DL.format(extra=""), [dist.shape, parity.shape])
    d = dist.clone().requires_grad_(True)
    loss = layer(d, parity)
    same, keep = parity == 1, parity != 255
    hinge = torch.where(same, (dist - 0.5).clamp_min(0), (2 - dist).clamp_min(0))
    torch.testing.assert_close(loss, (hinge * keep).sum() / dist.numel())
    (loss * 2).backward()  # loss_weight 2: the original ignores it
    signed = torch.where(same, hinge, -hinge) * keep
    torch.testing.assert_close(d.grad, signed / dist.numel())
    # parity is read as a C++ int: 0.7 truncates to 0, "different labels"
    frac = layer(dist, torch.full_like(parity, 0.7))
    torch.testing.assert_close(frac, (2 - dist).clamp_min(0).sum() / dist.numel())


def test_distloss_golden_gradient_is_independent_of_loss_weight():
    a, b = load_case("distloss_ign"), load_case("distloss_ign_lw2")
    np.testing.assert_array_equal(a["grad:dist"], b["grad:dist"])


def test_distloss_stale_diff_for_ignored_entries_after_first_image():
    gen = torch.Generator().manual_seed(3)
    dist, parity = _dist_parity(gen)
    layer = make_layer(DL.format(extra=""), [dist.shape, parity.shape])
    first = parity.clone()
    first[:] = 0  # nothing ignored: the buffer holds -max(2 - d, 0) everywhere
    layer(dist, first)
    later = first.clone()
    later[:, 0, 0, 0] = 255
    d = dist.clone().requires_grad_(True)
    layer(d, later).backward()
    prev = -(2 - dist[:, 0, 0, 0]).clamp_min(0) / dist.numel()
    assert d.grad[0, 0, 0, 0] == 0  # image 0 is re-zeroed
    torch.testing.assert_close(d.grad[1, 0, 0, 0], prev[1])  # image 1 keeps the stale value
    assert prev[1] != 0


def test_distloss_buffer_keeps_its_tail_when_the_count_shrinks():
    gen = torch.Generator().manual_seed(5)
    dist, _ = _dist_parity(gen)  # 2x9x3x4: 216 entries
    layer = make_layer(DL.format(extra=""), [dist.shape, dist.shape])
    d1 = dist.clone().requires_grad_(True)
    loss1 = layer(d1, torch.zeros_like(dist))  # nothing ignored: the buffer holds -max(2 - d, 0) everywhere
    buffer = (-(2 - dist).clamp_min(0)).reshape(-1)
    small = dist[:, :, :, :3].contiguous()  # 162 entries: the buffer keeps its 216
    ignored = torch.zeros_like(small)
    ignored[1] = 255
    d2 = small.clone().requires_grad_(True)
    layer(d2, ignored).backward()
    torch.testing.assert_close(d2.grad[1].reshape(-1), buffer[81:162] / small.numel())
    loss1.backward()  # the first forward's diff, not overwritten by the second
    torch.testing.assert_close(d1.grad.reshape(-1), buffer / dist.numel())
    # back to 216 entries: image 1's ignored entries read the tail the 162-entry forward left
    d3 = dist.clone().requires_grad_(True)
    ignored = torch.zeros_like(dist)
    ignored[1] = 255
    layer(d3, ignored).backward()
    torch.testing.assert_close(d3.grad[1].reshape(-1), buffer[108:] / dist.numel())


def test_distloss_true_gradient_gradcheck_and_loss_weight():
    gen = torch.Generator().manual_seed(4)
    dist, parity = _dist_parity(gen)
    dist = dist.clamp(0.01, 2.9)
    dist[(dist - 0.5).abs() < 0.05] += 0.1  # stay off the hinge kinks
    dist[(dist - 2).abs() < 0.05] += 0.1
    gradcheck_layer(DL.format(extra="true_gradient: true"), [dist.shape, parity.shape],
                    inputs=[dist, parity], grad_inputs=[0])
    d = dist.detach().clone().requires_grad_(True)
    (dist_loss(d, parity, 0.5, 2.0, 255, true_gradient=True) * 2).backward()
    active = (parity != 255) & torch.where(parity == 1, dist > 0.5, dist < 2)
    expected = torch.where(parity == 1, 1.0, -1.0).double() * active * 2 / dist.numel()
    torch.testing.assert_close(d.grad, expected)


def test_distloss_bad_config():
    with pytest.raises(ValueError, match="alpha"):
        make_layer('type: "DistLoss" convolution_param { kernel_size: 3 } dist_loss_param { alpha: 2 beta: 1 }',
                   [(1, 9, 3, 3), (1, 9, 3, 3)])
    with pytest.raises(ValueError, match="kernel_size"):
        make_layer('type: "DistLoss" dist_loss_param { alpha: 1 beta: 2 }', [(1, 9, 3, 3), (1, 9, 3, 3)])
    with pytest.raises(ValueError, match="same shape"):
        make_layer('type: "DistLoss" convolution_param { kernel_size: 3 } dist_loss_param { alpha: 1 beta: 2 }',
                   [(1, 9, 3, 3), (1, 4, 3, 3)])


# ---- ChannelReduce ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["SUM", "MAX"])
def test_channel_reduce_gradcheck(op):
    gradcheck_layer(f'type: "ChannelReduce" channel_reduce_param {{ num_channels: 2 operation: {op} }}',
                    [(2, 4, 3, 4)])


def test_channel_reduce_max_ties_and_floor():
    layer = make_layer('type: "ChannelReduce" channel_reduce_param { num_channels: 1 }', [(1, 3, 1, 2)])
    x = torch.tensor([[[[1.0, -np.inf]], [[1.0, -np.inf]], [[0.0, -np.inf]]]], dtype=torch.float64,
                     requires_grad=True)
    y = layer(x)
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 0, 1] == -np.finfo(np.float32).max
    y.sum().backward()
    assert x.grad[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]  # first channel wins ties
    assert (x.grad[0, :, 0, 1] == 0).all()


def test_channel_reduce_inverted_divisor_check():
    with pytest.raises(ValueError, match="check_divisor"):
        make_layer('type: "ChannelReduce" channel_reduce_param { num_channels: 4 }', [(1, 4, 2, 2)])
    layer = make_layer('type: "ChannelReduce" channel_reduce_param { num_channels: 4 check_divisor: true }',
                       [(1, 4, 2, 2)])
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x)
    with pytest.raises(ValueError, match="divide"):
        make_layer('type: "ChannelReduce" channel_reduce_param { num_channels: 3 }', [(1, 4, 2, 2)])


# ---- SegAccuracy ------------------------------------------------------------------------------
def test_seg_accuracy_metrics_ties_and_reset():
    text = 'type: "SegAccuracy" seg_accuracy_param {{ ignore_label: 255 {extra} }}'
    scores = torch.tensor([[0.0, 1.0, 1.0, 2.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 3, 1, 4)
    labels = torch.tensor([2.0, 0.0, 255.0, 1.0]).reshape(1, 1, 1, 4)
    # predictions: (0,1,0) -> 1, (1,0,0) -> 0, ignored, (2,0,0) -> 0
    layer = make_layer(text.format(extra=""), [scores.shape, labels.shape], dtype=torch.float32)
    acc = layer(scores, labels).reshape(-1).tolist()
    # confusion (label, pred): (2,1) (0,0) (1,0): accuracy 1/3; recall over labels 0,1,2: (1+0+0)/3;
    # IoU: class 0: 1/(1+2-1) = .5, class 1: 0/(1+1) = 0, class 2: 0/1 = 0 -> 0.5/3
    np.testing.assert_allclose(acc, [1 / 3, 1 / 3, 0.5 / 3], rtol=1e-6)
    tie = torch.ones(1, 3, 1, 1)
    layer = make_layer(text.format(extra="reset: false"), [tie.shape, (1, 1, 1, 1)], dtype=torch.float32)
    assert layer(tie, torch.full((1, 1, 1, 1), 2.0)).reshape(-1)[0] == 1  # tie -> class 2
    assert layer(tie, torch.full((1, 1, 1, 1), 0.0)).reshape(-1)[0] == 0.5  # accumulated
    with pytest.raises(ValueError, match="unexpected label 3"):
        layer(tie, torch.full((1, 1, 1, 1), 3.0))


# ---- UniqueLabel ------------------------------------------------------------------------------
def test_unique_label():
    layer = make_layer('type: "UniqueLabel" unique_label_param { max_labels: 4 ignore_label: 255 force_label: 0 }',
                       [(2, 1, 2, 2)])
    labels = torch.tensor([[5.0, 255.0, 3.0, 5.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    out = layer(labels)
    assert out.shape == (2, 4, 1, 1)
    assert out[:, :, 0, 0].tolist() == [[0.0, 3.0, 5.0, -1.0], [0.0, -1.0, -1.0, -1.0]]
    with pytest.raises(ValueError, match="max_labels"):
        layer(torch.arange(8, dtype=torch.float64).reshape(2, 1, 2, 2))


# ---- "xy" filler ------------------------------------------------------------------------------
def test_xy_filler_layout_and_multi_image_quirk():
    param = pb.FillerParameter(type="xy")
    one = fill((1, 2, 3, 4), param)
    assert one[0, 0].tolist() == [[0, 1, 2, 3]] * 3
    assert one[0, 1].tolist() == [[0] * 4, [1] * 4, [2] * 4]
    three = fill((3, 2, 3, 4), param)
    # x only in image 0 channel 0; y maps in flat slots 1..3; slots 4, 5 stay 0
    slots = three.reshape(6, 3, 4)
    torch.testing.assert_close(slots[0], one[0, 0])
    for s in (1, 2, 3):
        torch.testing.assert_close(slots[s], one[0, 1])
    assert (slots[4:] == 0).all()
    fixed = fill((3, 2, 3, 4), pb.FillerParameter(type="xy", xy_all_images=True))
    torch.testing.assert_close(fixed, one.expand(3, 2, 3, 4))
    with pytest.raises(ValueError, match="2 channels"):
        fill((1, 3, 2, 2), param)


# ---- CUDA -------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_cuda_match_cpu():
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (2, 3, 7, 6), generator=gen).float()
    for norm, rc, rb in [("L1", False, False), ("L1", True, True), ("L2", True, False)]:
        grads = []
        for device in ("cpu", "cuda"):
            xd = x.to(device).requires_grad_(True)
            y = im2dist(xd, 3, 2, dilation=2, norm=norm, remove_center=rc, remove_bounds=rb)
            y.backward(torch.ones_like(y))
            grads.append((y.detach().cpu(), xd.grad.cpu()))
        torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(im2parity(x.cuda(), 3, 1, ignore_label=2).cpu(), im2parity(x, 3, 1, ignore_label=2))
    torch.testing.assert_close(im2col(x.cuda(), 3, 1).cpu(), im2col(x, 3, 1))
