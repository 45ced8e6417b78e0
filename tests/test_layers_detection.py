"""The SSD fork's layers (Permute, Normalize, PriorBox, DetectionOutput) and the other community
layers OpenCV dnn reads from Caffe files (ReLU6, ShuffleChannel, Swish, ROIPooling, PSROIPooling,
Proposal), each against a plain-numpy reference written from the original's C++ (or Python)
loops, plus float64 gradchecks for the differentiable ones.
"""
import math

import numpy as np
import pytest
import torch

from golden import gradcheck_layer, make_layer

F32 = np.float32


def run(text, *bottoms, dtype=torch.float32):
    layer = make_layer(text, [b.shape for b in bottoms], dtype=dtype)
    with torch.no_grad():
        out = layer(*[torch.as_tensor(b, dtype=dtype) for b in bottoms])
    return layer, out


# ---------------------------------------------------------------------------- Permute
def permute_reference(x, order):
    """The fork's index loop: top[i] = bottom[sum_j (i / new_steps[j]) * old_steps[order[j]]]."""
    order = list(order) + [a for a in range(x.ndim) if a not in order]
    new_shape = [x.shape[o] for o in order]
    old_steps = [int(np.prod(x.shape[i + 1:])) for i in range(x.ndim)]
    new_steps = [int(np.prod(new_shape[i + 1:])) for i in range(x.ndim)]
    flat, out = x.ravel(), np.empty(int(np.prod(new_shape)), x.dtype)
    for i in range(out.size):
        idx, old = i, 0
        for j in range(x.ndim):
            old += (idx // new_steps[j]) * old_steps[order[j]]
            idx %= new_steps[j]
        out[i] = flat[old]
    return out.reshape(new_shape)


@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 3], [1, 0, 2, 3], []])
def test_permute_matches_reference(order):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(F32)
    text = 'type: "Permute" permute_param { %s }' % " ".join(f"order: {o}" for o in order)
    _, out = run(text, x)
    np.testing.assert_array_equal(out.numpy(), permute_reference(x, order))


def test_permute_bad_order():
    with pytest.raises(ValueError, match="repeats axis 2"):
        make_layer('type: "Permute" permute_param { order: 2 order: 2 }', [(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="order 4 is not an axis"):
        make_layer('type: "Permute" permute_param { order: 4 }', [(1, 2, 3, 4)])


def test_permute_gradcheck():
    gradcheck_layer('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', [(2, 3, 2, 2)])


# ---------------------------------------------------------------------------- Normalize
def normalize_reference(x, scale, across_spatial, channel_shared, eps):
    n, c = x.shape[:2]
    out = np.empty_like(x)
    for i in range(n):
        xi = x[i].reshape(c, -1)
        if across_spatial:
            norm = F32(np.sqrt(F32(np.sum(xi * xi, dtype=F32)) + F32(eps)))
            yi = xi * F32(1.0 / norm)
        else:
            norm = np.sqrt(F32(eps) + np.sum(xi * xi, axis=0, dtype=F32))
            yi = xi / norm[None, :]
        yi = yi * (scale.reshape(()) if channel_shared else scale.reshape(c, 1))
        out[i] = yi.reshape(x.shape[1:])
    return out


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
def test_normalize_matches_reference(across_spatial, channel_shared):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(F32)
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()} '
            f'channel_shared: {str(channel_shared).lower()} scale_filler {{ type: "constant" value: 20 }} eps: 1e-6 }}')
    layer, out = run(text, x)
    scale = np.array([20.0], F32) if channel_shared else np.full(3, 20.0, F32)
    assert tuple(layer.blobs[0].shape) == (() if channel_shared else (3,))
    ref = normalize_reference(x, scale, across_spatial, channel_shared, 1e-6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-6, atol=1e-6)


def test_normalize_default_scale_is_one():
    layer = make_layer('type: "Normalize"', [(1, 3, 2, 2)])
    assert layer.blobs[0].shape == () and float(layer.blobs[0].detach()) == 1.0


@pytest.mark.parametrize("across_spatial", ["true", "false"])
def test_normalize_gradcheck(across_spatial):
    gradcheck_layer(f'type: "Normalize" norm_param {{ across_spatial: {across_spatial} channel_shared: false }}',
                    [(2, 3, 2, 3)])


# ---------------------------------------------------------------------------- PriorBox
def prior_box_reference(layer_h, layer_w, img_h, img_w, min_sizes, max_sizes, ratios, flip, clip,
                        variance, step=0.0, offset=0.5):
    """The fork's Forward_cpu loops: float centres, double corner arithmetic, float storage."""
    ars = [1.0]
    for ar in ratios:
        if all(abs(ar - r) >= 1e-6 for r in ars):
            ars.append(ar)
            if flip:
                ars.append(float(F32(1.0 / ar)))
    if step:
        step_w = step_h = F32(step)
    else:
        step_w, step_h = F32(img_w) / F32(layer_w), F32(img_h) / F32(layer_h)
    top = []

    def corners(cx, cy, bw, bh):
        top.extend([F32((float(cx) - float(bw) / 2.0) / img_w), F32((float(cy) - float(bh) / 2.0) / img_h),
                    F32((float(cx) + float(bw) / 2.0) / img_w), F32((float(cy) + float(bh) / 2.0) / img_h)])

    for h in range(layer_h):
        for w in range(layer_w):
            cx = (F32(w) + F32(offset)) * step_w
            cy = (F32(h) + F32(offset)) * step_h
            for s, min_size in enumerate(min_sizes):
                m = int(min_size)
                corners(cx, cy, F32(m), F32(m))
                if max_sizes:
                    side = F32(math.sqrt(m * int(max_sizes[s])))
                    corners(cx, cy, side, side)
                for ar in ars:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    corners(cx, cy, F32(m) * np.sqrt(F32(ar)), F32(m) / np.sqrt(F32(ar)))
    boxes = np.array(top, F32)
    if clip:
        boxes = np.minimum(np.maximum(boxes, 0), 1)
    var = np.array([variance[i % len(variance)] for i in range(boxes.size)], F32) if len(variance) == 4 \
        else np.full(boxes.size, variance[0], F32)
    return np.stack([boxes, var])[None]


@pytest.mark.parametrize("clip,step,flip", [(False, 0, True), (True, 8, False), (False, 0, False)])
def test_prior_box_matches_reference(clip, step, flip):
    feat, img = np.zeros((1, 4, 3, 5), F32), np.zeros((1, 3, 24, 41), F32)
    text = ('type: "PriorBox" prior_box_param { min_size: 10.7 min_size: 16 max_size: 20 max_size: 33 '
            f'aspect_ratio: 2 aspect_ratio: 3 aspect_ratio: 2 flip: {str(flip).lower()} '
            f'clip: {str(clip).lower()} variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 '
            + (f"step: {step} " if step else "") + "}")
    layer, out = run(text, feat, img)
    ref = prior_box_reference(3, 5, 24, 41, [10.7, 16], [20, 33], [2, 3, 2], flip, clip, [0.1, 0.1, 0.2, 0.2], step)
    assert out.shape == ref.shape == tuple(layer.top_shapes([feat.shape, img.shape])[0])
    np.testing.assert_array_equal(out.numpy(), ref)


def test_prior_box_follows_input_size_and_img_size():
    text = 'type: "PriorBox" prior_box_param { min_size: 8 img_size: 64 variance: 0.1 offset: 0 }'
    layer = make_layer(text, [(1, 1, 2, 2)], dtype=torch.float32)
    with torch.no_grad():
        out = layer(torch.zeros(1, 1, 4, 4)).numpy()
    np.testing.assert_array_equal(out, prior_box_reference(4, 4, 64, 64, [8], [], [], True, False, [0.1], offset=0))


def test_prior_box_errors():
    with pytest.raises(ValueError, match="must provide min_size"):
        make_layer('type: "PriorBox" prior_box_param { }', [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(ValueError, match="max_size must be greater"):
        make_layer('type: "PriorBox" prior_box_param { min_size: 4 max_size: 2 }', [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(ValueError, match="either img_size or img_h/img_w"):
        make_layer('type: "PriorBox" prior_box_param { min_size: 4 img_size: 8 img_h: 8 }', [(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="step_h and step_w must be larger than 0"):
        make_layer('type: "PriorBox" prior_box_param { min_size: 4 step_h: 8 }', [(1, 1, 2, 2), (1, 3, 8, 8)])
    with pytest.raises(ValueError, match="OpenCV extension"):
        make_layer('type: "PriorBox" prior_box_param { min_size: 4 width: 3 }', [(1, 1, 2, 2), (1, 3, 8, 8)])


# ---------------------------------------------------------------------------- DetectionOutput
def decode_reference(prior, var, loc, code, in_target):
    """DecodeBBox, one box, float32 operations in the fork's order."""
    v = [F32(1)] * 4 if in_target else [F32(t) for t in var]
    p = [F32(t) for t in prior]
    l = [F32(t) for t in loc]
    if code == "CORNER":
        return [p[k] + v[k] * l[k] for k in range(4)]
    pw, ph = p[2] - p[0], p[3] - p[1]
    if code == "CORNER_SIZE":
        return [p[0] + v[0] * l[0] * pw, p[1] + v[1] * l[1] * ph, p[2] + v[2] * l[2] * pw, p[3] + v[3] * l[3] * ph]
    cx, cy = (p[0] + p[2]) / F32(2), (p[1] + p[3]) / F32(2)
    dcx, dcy = v[0] * l[0] * pw + cx, v[1] * l[1] * ph + cy
    dw, dh = np.exp(v[2] * l[2]) * pw, np.exp(v[3] * l[3]) * ph
    return [dcx - dw / F32(2), dcy - dh / F32(2), dcx + dw / F32(2), dcy + dh / F32(2)]


def size_reference(b):
    return F32(0) if b[2] < b[0] or b[3] < b[1] else F32((b[2] - b[0]) * (b[3] - b[1]))


def iou_reference(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F32(0)
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if not (iw > 0 and ih > 0):
        return F32(0)
    inter = F32(iw * ih)
    return F32(inter / (size_reference(a) + size_reference(b) - inter))


def nms_reference(boxes, scores, thr_score, nms, eta, top_k):
    pairs = [(s, i) for i, s in enumerate(scores) if s > thr_score]
    pairs.sort(key=lambda t: -t[0])          # stable, as std::stable_sort
    if top_k > -1:
        pairs = pairs[:top_k]
    kept, adaptive = [], F32(nms)
    for _, i in pairs:
        keep = all(iou_reference(boxes[i], boxes[k]) <= adaptive for k in kept)
        if keep:
            kept.append(i)
            if eta < 1 and adaptive > 0.5:
                adaptive = F32(adaptive * F32(eta))
    return kept


def detection_reference(loc, conf, priors, num_classes, share, background, code, in_target, thr, nms, eta,
                        top_k, keep_top_k):
    num, p = loc.shape[0], priors.shape[2] // 4
    loc_classes = 1 if share else num_classes
    rows = []
    for i in range(num):
        decoded = {}
        for c in range(loc_classes):
            label = -1 if share else c
            if label == background:
                continue
            decoded[label] = [decode_reference(priors[0, 0, 4 * j:4 * j + 4], priors[0, 1, 4 * j:4 * j + 4],
                                               loc[i, (j * loc_classes + c) * 4:(j * loc_classes + c) * 4 + 4],
                                               code, in_target) for j in range(p)]
        scores = conf[i].reshape(p, num_classes)
        picked = {}
        for c in range(num_classes):
            if c != background:
                picked[c] = nms_reference(decoded[-1 if share else c], list(scores[:, c]), thr, nms, eta, top_k)
        if keep_top_k > -1 and sum(map(len, picked.values())) > keep_top_k:
            pairs = sorted(((scores[j, c], c, j) for c in picked for j in picked[c]), key=lambda t: -t[0])
            picked = {}
            for _, c, j in pairs[:keep_top_k]:
                picked.setdefault(c, []).append(j)
        for c in sorted(picked):
            for j in picked[c]:
                rows.append([i, c, scores[j, c], *decoded[-1 if share else c][j]])
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(num)], F32)
    return np.array(rows, F32)


def detection_inputs(seed, num=2, priors=30, classes=3, share=True):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.1, 0.9, (priors, 2))
    sizes = rng.uniform(0.05, 0.4, (priors, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(F32).ravel()
    var = np.tile(np.array([0.1, 0.1, 0.2, 0.2], F32), priors)
    prior = np.stack([boxes, var])[None]
    loc = rng.normal(0, 1, (num, priors * (1 if share else classes) * 4)).astype(F32)
    logits = rng.normal(0, 2, (num, priors, classes))
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(F32).reshape(num, -1)
    return loc, conf, prior


@pytest.mark.parametrize("code", ["CORNER", "CENTER_SIZE", "CORNER_SIZE"])
@pytest.mark.parametrize("share,background,in_target", [(True, 0, False), (False, 0, True), (False, -1, False)])
def test_detection_output_matches_reference(code, share, background, in_target):
    loc, conf, prior = detection_inputs(3, share=share)
    text = (f'type: "DetectionOutput" detection_output_param {{ num_classes: 3 share_location: {str(share).lower()} '
            f'background_label_id: {background} code_type: {code} variance_encoded_in_target: '
            f'{str(in_target).lower()} nms_param {{ nms_threshold: 0.45 top_k: 20 }} keep_top_k: 12 '
            'confidence_threshold: 0.05 }')
    _, out = run(text, loc, conf, prior)
    ref = detection_reference(loc, conf, prior, 3, share, background, code, in_target, F32(0.05), 0.45, 1.0, 20, 12)
    assert out.shape == (1, 1, len(ref), 7)
    np.testing.assert_array_equal(out.numpy()[0, 0], ref)


def test_detection_output_eta_and_no_threshold():
    loc, conf, prior = detection_inputs(5, num=1, priors=40, classes=2)
    text = ('type: "DetectionOutput" detection_output_param { num_classes: 2 nms_param { nms_threshold: 0.9 '
            'eta: 0.7 } }')
    _, out = run(text, loc, conf, prior)
    ref = detection_reference(loc, conf, prior, 2, True, 0, "CORNER", False, -np.finfo(F32).max, 0.9, 0.7, -1, -1)
    np.testing.assert_array_equal(out.numpy()[0, 0], ref)
    assert len(ref) < 40   # the adaptive threshold removed some


def test_detection_output_no_detection_rows():
    loc, conf, prior = detection_inputs(7, num=3)
    text = 'type: "DetectionOutput" detection_output_param { num_classes: 3 confidence_threshold: 1.5 }'
    layer, out = run(text, loc, conf, prior)
    expected = np.full((3, 7), -1, F32)
    expected[:, 0] = [0, 1, 2]
    np.testing.assert_array_equal(out.numpy(), expected[None, None])
    assert layer.top_shapes([loc.shape, conf.shape, prior.shape]) == [(1, 1, 3, 7)]


def test_detection_output_errors():
    shapes = [(1, 120), (1, 90), (1, 2, 120)]
    with pytest.raises(ValueError, match="must specify num_classes"):
        make_layer('type: "DetectionOutput"', shapes)
    with pytest.raises(ValueError, match="background_label_id -1 makes the SSD fork abort"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 3 background_label_id: -1 }', shapes)
    layer = make_layer('type: "DetectionOutput" detection_output_param { num_classes: 4 }', shapes)
    with pytest.raises(ValueError, match="conf channels must be priors\\*num_classes = 120"):
        layer.top_shapes(shapes)


# ---------------------------------------------------------------------------- ReLU6, ShuffleChannel, Swish
def test_relu6_and_gradcheck():
    x = np.linspace(-3, 9, 25, dtype=F32).reshape(1, 1, 5, 5)
    _, out = run('type: "ReLU6"', x)
    np.testing.assert_array_equal(out.numpy(), np.minimum(np.maximum(x, 0), 6))
    inputs = [torch.tensor([[-1.0, 0.5, 3.0, 5.5, 7.0]], dtype=torch.float64)]
    gradcheck_layer('type: "ReLU6"', [(1, 5)], inputs=inputs)


def test_shuffle_channel_matches_reference():
    x = np.random.default_rng(2).standard_normal((2, 6, 2, 3)).astype(F32)
    _, out = run('type: "ShuffleChannel" shuffle_channel_param { group: 3 }', x)
    ref = np.empty_like(x)
    for i in range(3):          # the original's loop: output j*group + i <- input i*(C/group) + j
        for j in range(2):
            ref[:, j * 3 + i] = x[:, i * 2 + j]
    np.testing.assert_array_equal(out.numpy(), ref)
    gradcheck_layer('type: "ShuffleChannel" shuffle_channel_param { group: 2 }', [(1, 4, 2, 2)])


def test_swish_and_gradcheck():
    x = np.linspace(-4, 4, 9, dtype=F32).reshape(1, 9)
    _, out = run('type: "Swish" swish_param { beta: 1.5 }', x)
    np.testing.assert_allclose(out.numpy(), x / (1 + np.exp(-1.5 * x)), rtol=1e-6)
    gradcheck_layer('type: "Swish" swish_param { beta: 0.5 }', [(2, 3)])


# ---------------------------------------------------------------------------- ROIPooling, PSROIPooling
def c_round(v):
    return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)


def roi_pool_reference(x, rois, ph_, pw_, scale):
    out = np.zeros((len(rois), x.shape[1], ph_, pw_), F32)
    h, w = x.shape[2:]
    for n, r in enumerate(rois):
        b = int(r[0])
        sw, sh, ew, eh = (c_round(float(F32(v) * F32(scale))) for v in r[1:])
        bh = F32(max(eh - sh + 1, 1)) / F32(ph_)
        bw = F32(max(ew - sw + 1, 1)) / F32(pw_)
        for c in range(x.shape[1]):
            for ph in range(ph_):
                for pw in range(pw_):
                    hs = min(max(math.floor(F32(ph) * bh) + sh, 0), h)
                    he = min(max(math.ceil(F32(ph + 1) * bh) + sh, 0), h)
                    ws = min(max(math.floor(F32(pw) * bw) + sw, 0), w)
                    we = min(max(math.ceil(F32(pw + 1) * bw) + sw, 0), w)
                    if he <= hs or we <= ws:
                        continue
                    best = -np.finfo(F32).max
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            if x[b, c, yy, xx] > best:
                                best = x[b, c, yy, xx]
                    out[n, c, ph, pw] = best
    return out


ROIS = np.array([[0, 0, 0, 15, 15], [1, 4.4, 2.5, 30.2, 20.7], [0, 10, 10, 10.3, 10.2], [1, -8, -8, 70, 70],
                 [0, 40, 40, 60, 60]], F32)


def test_roi_pooling_matches_reference():
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 8)).astype(F32)
    _, out = run('type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.25 }', x, ROIS)
    np.testing.assert_array_equal(out.numpy(), roi_pool_reference(x, ROIS, 3, 2, 0.25))


def test_roi_pooling_gradcheck():
    gradcheck_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 }',
                    [(2, 2, 4, 5), (3, 5)], inputs=[torch.randn(2, 2, 4, 5), torch.tensor(ROIS[:3])],
                    grad_inputs=[0])


def psroi_reference(x, rois, scale, dim, g):
    out = np.zeros((len(rois), dim, g, g), F32)
    h, w = x.shape[2:]
    for n, r in enumerate(rois):
        b = int(r[0])
        sw, sh = F32(c_round(float(r[1]))) * F32(scale), F32(c_round(float(r[2]))) * F32(scale)
        ew, eh = F32(c_round(float(r[3])) + 1.0) * F32(scale), F32(c_round(float(r[4])) + 1.0) * F32(scale)
        bh, bw = max(eh - sh, F32(0.1)) / F32(g), max(ew - sw, F32(0.1)) / F32(g)
        for k in range(dim):
            for ph in range(g):
                for pw in range(g):
                    hs = min(max(math.floor(F32(ph) * bh + sh), 0), h)
                    he = min(max(math.ceil(F32(ph + 1) * bh + sh), 0), h)
                    ws = min(max(math.floor(F32(pw) * bw + sw), 0), w)
                    we = min(max(math.ceil(F32(pw + 1) * bw + sw), 0), w)
                    if he <= hs or we <= ws:
                        continue
                    c = (k * g + ph) * g + pw
                    out[n, k, ph, pw] = x[b, c, hs:he, ws:we].sum(dtype=F32) / F32((he - hs) * (we - ws))
    return out


def test_psroi_pooling_matches_reference():
    x = np.random.default_rng(5).standard_normal((2, 2 * 9, 6, 8)).astype(F32)
    text = 'type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.25 output_dim: 2 group_size: 3 }'
    _, out = run(text, x, ROIS)
    np.testing.assert_allclose(out.numpy(), psroi_reference(x, ROIS, 0.25, 2, 3), rtol=1e-6, atol=1e-7)


def test_psroi_pooling_gradcheck_and_errors():
    text = 'type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.5 output_dim: 1 group_size: 2 }'
    gradcheck_layer(text, [(2, 4, 4, 5), (3, 5)], inputs=[torch.randn(2, 4, 4, 5), torch.tensor(ROIS[:3])],
                    grad_inputs=[0])
    with pytest.raises(ValueError, match="output_dim\\*group_size\\^2 = 4, got 5"):
        make_layer(text, [(1, 5, 4, 4), (1, 5)])
    with pytest.raises(ValueError, match="psroi_pooling_param.spatial_scale is required"):
        make_layer('type: "PSROIPooling" psroi_pooling_param { output_dim: 1 }', [(1, 1, 4, 4), (1, 5)])


# ---------------------------------------------------------------------------- Proposal
def anchors_reference(base_size, ratios, scales):
    """generate_anchors written out anchor by anchor."""
    out = []
    w = h = base_size
    xc = yc = (base_size - 1) / 2.0
    for r in ratios:
        ws = round_half_even(math.sqrt(w * h / r))
        hs = round_half_even(ws * r)
        for s in scales:
            aw, ah = ws * s, hs * s
            out.append([xc - 0.5 * (aw - 1), yc - 0.5 * (ah - 1), xc + 0.5 * (aw - 1), yc + 0.5 * (ah - 1)])
    return np.array(out)


def round_half_even(v):
    return float(np.round(v))


def proposal_reference(scores, deltas, im_info, stride, anchors, min_size, pre, post, thresh):
    a = len(anchors)
    h, w = scores.shape[2:]
    boxes, fg = [], []
    for y in range(h):               # the (H, W, A) order of the transposed blobs
        for x in range(w):
            for k in range(a):
                an = anchors[k] + np.array([x * stride, y * stride, x * stride, y * stride])
                d = deltas[0, 4 * k:4 * k + 4, y, x]
                aw, ah = an[2] - an[0] + 1.0, an[3] - an[1] + 1.0
                cx, cy = an[0] + 0.5 * aw, an[1] + 0.5 * ah
                pcx, pcy = d[0] * aw + cx, d[1] * ah + cy
                pw, ph = np.exp(d[2]) * aw, np.exp(d[3]) * ah
                b = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
                b = [min(max(b[0], 0), im_info[1] - 1), min(max(b[1], 0), im_info[0] - 1),
                     min(max(b[2], 0), im_info[1] - 1), min(max(b[3], 0), im_info[0] - 1)]
                if b[2] - b[0] + 1 >= min_size * im_info[2] and b[3] - b[1] + 1 >= min_size * im_info[2]:
                    boxes.append(b)
                    fg.append(scores[0, a + k, y, x])
    order = sorted(range(len(fg)), key=lambda i: -fg[i])[:pre]
    kept = []
    for i in order:
        ok = True
        for j in kept:
            bi, bj = boxes[i], boxes[j]
            iw = max(0.0, min(bi[2], bj[2]) - max(bi[0], bj[0]) + 1)
            ih = max(0.0, min(bi[3], bj[3]) - max(bi[1], bj[1]) + 1)
            ai = (bi[2] - bi[0] + 1) * (bi[3] - bi[1] + 1)
            aj = (bj[2] - bj[0] + 1) * (bj[3] - bj[1] + 1)
            if iw * ih / (ai + aj - iw * ih) > thresh:
                ok = False
                break
        if ok:
            kept.append(i)
    kept = kept[:post]
    return (np.array([[0, *boxes[i]] for i in kept], F32), np.array([[fg[i]] for i in kept], F32))


def test_proposal_anchors_match_py_faster_rcnn():
    from caffe_layers.layers.proposal import generate_anchors
    ours = generate_anchors(16, np.array([0.5, 1, 2]), np.array([8, 16, 32]))
    np.testing.assert_array_equal(ours, anchors_reference(16, [0.5, 1, 2], [8, 16, 32]))
    # the published first anchor of py-faster-rcnn's generate_anchors.py docstring
    np.testing.assert_array_equal(ours[0], [-84, -40, 99, 55])


def test_proposal_matches_reference():
    rng = np.random.default_rng(6)
    a = 6
    logits = rng.normal(0, 1, (1, 2, a, 5, 7))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = prob.reshape(1, 2 * a, 5, 7).astype(F32)
    deltas = rng.normal(0, 0.3, (1, 4 * a, 5, 7)).astype(F32)
    im_info = np.array([[80, 112, 1.0]], F32)
    text = ('type: "Proposal" top: "rois" top: "scores" proposal_param { feat_stride: 16 base_size: 16 '
            'min_size: 4 ratio: 0.5 ratio: 2 scale: 2 scale: 4 scale: 8 pre_nms_topn: 60 post_nms_topn: 20 '
            'nms_thresh: 0.6 }')
    layer, (rois, fg) = run(text, scores, deltas, im_info)
    anchors = anchors_reference(16, [0.5, 2], [2, 4, 8])
    ref_rois, ref_fg = proposal_reference(scores, deltas, im_info[0], 16, anchors, 4, 60, 20, 0.6)
    np.testing.assert_allclose(rois.numpy(), ref_rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(fg.numpy(), ref_fg)


# ---------------------------------------------------------------------------- Axpy
def test_axpy_matches_reference_and_gradcheck():
    rng = np.random.default_rng(8)
    a, x, y = (rng.standard_normal(s).astype(F32) for s in [(2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5)])
    _, out = run('type: "Axpy"', a, x, y)
    ref = y.copy()
    for n in range(2):               # the original: copy y, then caffe_axpy per (image, channel)
        for c in range(3):
            ref[n, c] += a[n, c, 0, 0] * x[n, c]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-7)
    gradcheck_layer('type: "Axpy"', [(2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 2, 2)])
    with pytest.raises(ValueError, match="needs a \\(N, C, 1, 1\\)"):
        make_layer('type: "Axpy"', [(2, 3, 2, 2), (2, 3, 2, 2), (2, 3, 2, 2)])
