"""Structure, loss and utility layers: golden cases from the original Caffe, gradchecks, Caffe's semantics."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden import check_golden, gradcheck_layer, make_layer  # noqa: E402

from caffe_layers import Net  # noqa: E402


def run(text, *bottoms, dtype=torch.float64):
    xs = [torch.as_tensor(b, dtype=dtype) for b in bottoms]
    layer = make_layer(text, [x.shape for x in xs], dtype=dtype)
    return layer, layer(*xs)


# ---- Concat / Slice / Split / Silence / Flatten / Reshape --------------------------------------
def test_concat_golden():
    check_golden("concat")


def test_concat_gradcheck_and_axes():
    gradcheck_layer('type: "Concat" bottom: "a" bottom: "b" top: "c" concat_param { axis: 2 }',
                    [(2, 3, 2, 2), (2, 3, 4, 2)])
    _, out = run('type: "Concat" concat_param { concat_dim: 0 }', np.zeros((1, 2)), np.ones((3, 2)))
    assert out.shape == (4, 2) and out[1:].eq(1).all()
    _, out = run('type: "Concat" concat_param { axis: -1 }', np.zeros((2, 1)), np.ones((2, 3)))
    assert out.shape == (2, 4)


def test_concat_errors():
    with pytest.raises(ValueError, match="not both"):
        make_layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 2), (2, 2)])
    layer = make_layer('name: "cat" type: "Concat"', [(2, 2, 3), (2, 2, 4)])
    with pytest.raises(ValueError, match="'cat'.*except at axis 1"):
        layer.top_shapes([(2, 2, 3), (2, 2, 4)])


def test_slice_points_and_equal_split():
    x = torch.arange(2 * 6 * 2, dtype=torch.float64).reshape(2, 6, 2)
    _, tops = run('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 1 slice_point: 4 }', x)
    assert [t.shape[1] for t in tops] == [1, 3, 2]
    assert torch.equal(torch.cat(tops, 1), x)
    _, tops = run('type: "Slice" top: "a" top: "b" slice_param { slice_dim: 0 }', x)
    assert [t.shape for t in tops] == [(1, 6, 2), (1, 6, 2)]
    _, tops = run('type: "Slice" top: "a" top: "b" slice_param { axis: -1 }', x)
    assert torch.equal(tops[1], x[..., 1:])
    gradcheck_layer('type: "Slice" top: "a" top: "b" slice_param { slice_point: 2 }', [(2, 5, 3)])


def test_slice_errors():
    layer = make_layer('name: "s" type: "Slice" top: "a" top: "b"', [(2, 5)])
    with pytest.raises(ValueError, match="'s'.*evenly divide"):
        layer.top_shapes([(2, 5)])
    layer = make_layer('name: "s" type: "Slice" top: "a" top: "b" slice_param { slice_point: 6 }', [(2, 5)])
    with pytest.raises(ValueError, match="increase strictly"):
        layer.top_shapes([(2, 5)])
    layer = make_layer('name: "s" type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 2 }', [(2, 5)])
    with pytest.raises(ValueError, match="expected 2"):
        layer.top_shapes([(2, 5)])


def test_split_sums_gradients():
    layer = make_layer('type: "Split" top: "a" top: "b" top: "c"', [(2, 3)])
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    a, b, c = layer(x)
    (a * 1 + b * 2 + c * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 6.0))
    gradcheck_layer('type: "Split" top: "a" top: "b"', [(2, 3)])


def test_silence():
    layer, out = run('type: "Silence" bottom: "a" bottom: "b"', np.ones((2, 2)), np.ones(3))
    assert out == () and layer.top_shapes([(2, 2), (3,)]) == []


@pytest.mark.parametrize("param, shape", [
    ("", (2, 60)), ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)), ("flatten_param { axis: 0 end_axis: -2 }", (24, 5)),
])
def test_flatten_shapes(param, shape):
    layer = make_layer(f'type: "Flatten" {param}', [(2, 3, 4, 5)])
    assert layer.top_shapes([(2, 3, 4, 5)]) == [shape]


def test_flatten_gradcheck():
    gradcheck_layer('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [(2, 3, 2, 2)])


@pytest.mark.parametrize("param, shape", [
    ("shape { dim: 0 dim: -1 }", (2, 60)),
    ("shape { dim: 0 dim: 0 dim: 2 dim: -1 }", (2, 3, 2, 10)),
    ("shape { dim: 6 dim: 20 }", (6, 20)),
    ("axis: 1 shape { dim: 12 }  num_axes: 2", (2, 12, 5)),
    ("axis: -1 shape { dim: 1 }", (2, 3, 4, 5, 1)),
    ("axis: 1 num_axes: 0 shape { dim: 1 }", (2, 1, 3, 4, 5)),
    ("axis: 2 shape { dim: -1 }", (2, 3, 20)),
])
def test_reshape_shapes(param, shape):
    layer = make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [(2, 3, 4, 5)])
    assert layer.top_shapes([(2, 3, 4, 5)]) == [shape]


def test_reshape_errors_and_gradcheck():
    with pytest.raises(ValueError, match="at most one -1"):
        make_layer('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)])
    layer = make_layer('name: "r" type: "Reshape" reshape_param { shape { dim: 7 dim: -1 } }', [(2, 3)])
    with pytest.raises(ValueError, match="'r'.*cannot infer"):
        layer.top_shapes([(2, 3)])
    gradcheck_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)])


# ---- Reduction / ArgMax / Accuracy -------------------------------------------------------------
@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction(op):
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    _, out = run(f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 coeff: 0.5 }}', x)
    flat = x.reshape(2, -1)
    want = {"SUM": flat.sum(1), "ASUM": flat.abs().sum(1), "SUMSQ": (flat ** 2).sum(1), "MEAN": flat.mean(1)}[op]
    assert out.shape == (2,) and torch.allclose(out, 0.5 * want)
    gradcheck_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: -2 coeff: -2 }}', [(2, 3, 4)])


def test_reduction_default_is_scalar_sum():
    _, out = run('type: "Reduction"', np.arange(6.0).reshape(2, 3))
    assert out.shape == () and out.item() == 15


def test_reduction_asum_backward_is_sign():
    layer = make_layer('type: "Reduction" reduction_param { operation: ASUM }', [(3,)])
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    layer(x).backward()
    assert x.grad.tolist() == [-1.0, 0.0, 1.0]  # caffe_cpu_sign(0) = 0


def test_argmax_shapes_and_ties():
    x = np.array([[[1.0, 5.0, 5.0, 2.0]], [[0.0, -1.0, 3.0, 3.0]]])  # (2, 1, 4)
    _, out = run('type: "ArgMax" argmax_param { top_k: 2 }', x)
    assert out.shape == (2, 1, 2)
    assert out.reshape(2, 2).tolist() == [[2, 1], [3, 2]]  # equal values: the larger index first
    _, out = run('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', x)
    assert out.shape == (2, 2, 2) and out.tolist() == [[[2, 1], [5, 5]], [[3, 2], [3, 3]]]
    _, out = run('type: "ArgMax" argmax_param { out_max_val: true }', x)  # top_k 1: a reduction, same ties
    assert out.tolist() == [[[2], [5]], [[3], [3]]]
    _, out = run('type: "ArgMax" argmax_param { axis: 2 }', x)
    assert out.tolist() == [[[2]], [[3]]]
    _, out = run('type: "ArgMax"', np.zeros((2, 3, 4, 5, 6)))
    assert out.shape == (2, 1, 1, 1, 1)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    _, out = run('type: "ArgMax" argmax_param { axis: 1 }', y)
    assert out.shape == (2, 1, 4, 5) and torch.equal(out[:, 0], y.argmax(1).double())
    _, out = run('type: "ArgMax" argmax_param { axis: -1 top_k: 3 out_max_val: true }', y)
    assert torch.equal(out, y.sort(-1, descending=True).values[..., :3])
    layer = make_layer('name: "am" type: "ArgMax" argmax_param { top_k: 9 axis: 1 }', [(2, 3)])
    with pytest.raises(ValueError, match="'am'.*top_k 9"):
        layer.top_shapes([(2, 3)])


def accuracy_reference(scores, labels, top_k, ignore=None):
    hits, count = 0, 0
    n, c, h = scores.shape
    for i in range(n):
        for j in range(h):
            lab = int(labels[i, j])
            if lab == ignore:
                continue
            order = sorted(((scores[i, k, j], k) for k in range(c)), reverse=True)
            hits += lab in [k for _, k in order[:top_k]]
            count += 1
    return hits / count


def test_accuracy_top_k_ignore_and_per_class():
    rng = np.random.RandomState(0)
    scores = rng.randint(0, 3, size=(3, 5, 4)).astype(np.float64)  # many ties
    labels = rng.randint(0, 5, size=(3, 4)).astype(np.float64)
    labels[0, 0] = 255
    labels[1, 1] = 2.7  # truncated to 2
    for k in (1, 2):
        text = f'type: "Accuracy" top: "a" top: "pc" accuracy_param {{ top_k: {k} ignore_label: 255 }}'
        _, (acc, per_class) = run(text, scores, labels[:, None])
        assert acc.shape == () and per_class.shape == (5,)
        assert acc.item() == pytest.approx(accuracy_reference(scores, labels, k, 255))
        lab = labels.astype(int)
        for c in range(5):
            mask = lab == c
            if mask.any():
                want = accuracy_reference(scores.transpose(1, 0, 2)[:, mask].T[:, :, None],
                                          np.full((mask.sum(), 1), c), k)
                assert per_class[c].item() == pytest.approx(want)
            else:
                assert per_class[c].item() == 0
    with pytest.raises(ValueError, match="labels must lie"):
        run('name: "acc" type: "Accuracy"', scores, np.full((3, 1, 4), 7.0))


@pytest.mark.parametrize("k", [1, 2])
def test_accuracy_without_ignore_label(k):
    rng = np.random.RandomState(1)
    scores = rng.randint(0, 3, size=(3, 5, 4)).astype(np.float64)  # many ties
    labels = rng.randint(0, 5, size=(3, 4)).astype(np.float64)
    _, (acc, per_class) = run(f'type: "Accuracy" top: "a" top: "pc" accuracy_param {{ top_k: {k} }}',
                              scores, labels[:, None])
    assert acc.item() == pytest.approx(accuracy_reference(scores, labels, k, None))
    lab = labels.astype(int)
    for c in range(5):
        mask = lab == c
        want = (accuracy_reference(scores.transpose(1, 0, 2)[:, mask].T[:, :, None], np.full((mask.sum(), 1), c), k)
                if mask.any() else 0)
        assert per_class[c].item() == pytest.approx(want)
    with pytest.raises(ValueError, match="labels must lie"):
        run('name: "acc" type: "Accuracy"', scores, np.full((3, 1, 4), -1.0))


# ---- losses ------------------------------------------------------------------------------------
def test_softmaxloss_golden():
    check_golden("softmaxloss_ign")


def softmax_loss_reference(x, lab, ignore, mode):
    p = torch.softmax(x, 1)
    valid = lab != ignore
    picked = p.gather(1, torch.where(valid, lab, 0)[:, None])[:, 0]
    total = -(torch.log(picked) * valid).sum()
    n = {"FULL": lab.numel(), "VALID": valid.sum().item(), "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    return total / max(n, 1)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmaxloss_normalization(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 2, 3))
    lab[0, :1] = 9
    text = f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 9 normalization: {mode} }}'
    _, loss = run(text, x, lab[:, None].double())
    assert loss.shape == () and loss.item() == pytest.approx(softmax_loss_reference(x, lab, 9, mode).item())
    gradcheck_layer(text, [(2, 3, 2, 3), (2, 1, 2, 3)], inputs=[x, lab[:, None].double()], grad_inputs=[0])


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmaxloss_normalization_without_ignore_label(mode):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 2, 3))
    text = f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} }}'
    layer = make_layer(text, [x.shape, (2, 1, 2, 3)], dtype=torch.float64)
    loss = layer(x.clone().requires_grad_(), lab[:, None].double())  # through the autograd.Function
    assert loss.requires_grad
    assert loss.item() == pytest.approx(softmax_loss_reference(x, lab, -1, mode).item())
    same = layer(x, lab[:, None].double())  # nothing to differentiate: the plain path, the same value
    assert not same.requires_grad and same.item() == loss.item()
    gradcheck_layer(text, [(2, 3, 2, 3), (2, 1, 2, 3)], inputs=[x, lab[:, None].double()], grad_inputs=[0])


def test_softmaxloss_legacy_normalize_and_truncation():
    x = torch.randn(4, 3, dtype=torch.float64)
    lab = torch.tensor([0.9, 1.5, 2.99, -0.5], dtype=torch.float64)  # static_cast<int>: 0, 1, 2, 0
    _, loss = run('type: "SoftmaxWithLoss" loss_param { normalize: false }', x, lab)
    assert loss.item() == pytest.approx(softmax_loss_reference(x, torch.tensor([0, 1, 2, 0]), -1, "BATCH_SIZE").item())
    # normalization wins over normalize when both are set
    _, loss2 = run('type: "SoftmaxWithLoss" loss_param { normalize: false normalization: NONE }', x, lab)
    assert loss2.item() == pytest.approx(4 * loss.item())


def test_softmaxloss_axis_prob_top_and_all_ignored():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    lab = torch.randint(0, 4, (2, 3)).double()
    layer, (loss, prob) = run('type: "SoftmaxWithLoss" top: "l" top: "p" softmax_param { axis: 2 }', x, lab)
    assert torch.allclose(prob, torch.softmax(x, 2)) and not prob.requires_grad
    want = -torch.log_softmax(x, 2).gather(2, lab.long()[..., None]).mean()
    assert loss.item() == pytest.approx(want.item())
    _, loss = run('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }', x[:, :2], torch.ones(2, 1, 4))
    assert loss.item() == 0  # normalizer is at least 1
    layer = make_layer('type: "SoftmaxWithLoss"', [(2, 3), (2,)])
    assert layer.is_loss and layer.top_shapes([(2, 3), (2,)]) == [()]
    with pytest.raises(ValueError, match="labels must lie"):
        layer(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0.0, 3.0], dtype=torch.float64))


def test_softmaxloss_backward_ignores_flt_min_clamp():
    # Caffe clamps prob at FLT_MIN in the loss but its gradient is still prob - 1
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { normalization: NONE }', [(1, 2), (1,)])
    x = torch.tensor([[0.0, -1000.0]], dtype=torch.float64, requires_grad=True)
    loss = layer(x, torch.tensor([1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(-np.log(np.float32(np.finfo(np.float32).tiny)))
    loss.backward()
    assert x.grad.tolist() == [[1.0, -1.0]]


def test_sigmoid_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64) * 5
    t = torch.rand(3, 4, dtype=torch.float64)
    _, loss = run('type: "SigmoidCrossEntropyLoss"', x, t)
    want = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="sum") / 3
    assert loss.item() == pytest.approx(want.item())
    gradcheck_layer('type: "SigmoidCrossEntropyLoss"', [(3, 4), (3, 4)], inputs=[x, t], grad_inputs=[0])
    t2 = t.clone()
    t2[0] = -1
    text = 'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalization: VALID }'
    _, loss = run(text, x, t2)
    want = torch.nn.functional.binary_cross_entropy_with_logits(x[1:], t[1:], reduction="sum") / 8
    assert loss.item() == pytest.approx(want.item())
    gradcheck_layer(text, [(3, 4), (3, 4)], inputs=[x, t2], grad_inputs=[0])


def test_sigmoid_cross_entropy_gradient_at_zero():
    layer = make_layer('type: "SigmoidCrossEntropyLoss"', [(1, 1), (1, 1)])
    x = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    layer(x, torch.full((1, 1), 0.25, dtype=torch.float64)).backward()
    assert x.grad.item() == 0.25  # sigmoid(0) - t


def test_euclidean_loss():
    a, b = np.random.RandomState(1).randn(2, 3, 2, 2)
    a, b = a[None].repeat(2, 0), b[None].repeat(2, 0)
    _, loss = run('type: "EuclideanLoss"', a, b)
    assert loss.shape == () and loss.item() == pytest.approx(((a - b) ** 2).sum() / 2 / 2)
    gradcheck_layer('type: "EuclideanLoss"', [(2, 3), (2, 3)])


# ---- DummyData ---------------------------------------------------------------------------------
def dummy_net(body):
    return Net(f'name: "d" layer {{ name: "d" type: "DummyData" {body} }}', phase="test")


def test_dummydata_shapes_and_constant():
    net = dummy_net('top: "a" top: "b" dummy_data_param { num: 2 channels: 3 channels: 4 height: 1 width: 5 '
                    'data_filler { type: "constant" value: 7 } }')
    out = net.forward()
    assert out["a"].shape == (2, 3, 1, 5) and out["b"].shape == (2, 4, 1, 5)
    assert (out["a"] == 7).all() and (out["b"] == 7).all()
    net.blobs["a"].data[...] = 1  # constant tops are filled once and never refilled (Caffe)
    assert (net.forward()["a"] == 1).all()
    net = dummy_net('top: "a" dummy_data_param { shape { dim: 2 dim: 3 } }')
    assert (net.forward()["a"] == 0).all()


def test_dummydata_refills_random_tops():
    net = dummy_net('top: "a" top: "b" dummy_data_param { shape { dim: 3 dim: 4 } shape { dim: 5 } '
                    'data_filler { type: "gaussian" std: 2 } data_filler { type: "constant" value: 3 } }')
    torch.manual_seed(0)
    first = net.forward()["a"].copy()
    second = net.forward()["a"]
    assert not np.array_equal(first, second) and first.shape == (3, 4)
    assert (net.blobs["b"].data == 3).all() and net.blobs["b"].shape == (5,)


@pytest.mark.parametrize("filler", ['type: "uniform" min: 2 max: 3', 'type: "gaussian"', 'type: "xavier"',
                                    'type: "msra"', 'type: "bilinear"', 'type: "positive_unitball"',
                                    'type: "constant" value: 2'])
def test_dummydata_fillers(filler):
    out = dummy_net(f'top: "a" dummy_data_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 4 }} '
                    f'data_filler {{ {filler} }} }}').forward()["a"]
    assert out.shape == (2, 3, 4, 4) and np.isfinite(out).all()
    if "uniform" in filler:
        assert out.min() >= 2 and out.max() <= 3
    if "unitball" in filler:
        assert np.allclose(out.reshape(2, -1).sum(1), 1, atol=1e-5)


def test_dummydata_errors():
    with pytest.raises(ValueError, match="'d'.*shape once or once per top"):
        dummy_net('top: "a" top: "b" top: "c" dummy_data_param { shape { dim: 1 } shape { dim: 2 } }')
    with pytest.raises(ValueError, match="unknown filler type 'nope'"):
        dummy_net('top: "a" dummy_data_param { shape { dim: 1 } data_filler { type: "nope" } }')
    with pytest.raises(ValueError, match="not both"):
        dummy_net('top: "a" dummy_data_param { num: 1 shape { dim: 1 } }')
