"""SSS: post-processing functions (MATLAB preprocessFeatures semantics), metric loss, feature net config."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_layers import Net

from caffe_layers.ops import sss
from tests.golden import make_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "sss"))
from make_sss import make_net  # noqa: E402

D = torch.float64


def loop_box(x, k):
    """MATLAB imfilter(ones(k)/k^2, 'replicate'): window offsets -(c-1)..k-c, c = floor((k+1)/2)."""
    n, c_, h, w = x.shape
    c = (k + 1) // 2
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for di in range(-(c - 1), k - c + 1):
                for dj in range(-(c - 1), k - c + 1):
                    out[:, :, i, j] += x[:, :, min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
    return out / (k * k)


@pytest.mark.parametrize("k", [3, 4, 10])
def test_box_mean_matches_matlab_window(k):
    x = torch.randn(1, 2, 6, 7, dtype=D)
    torch.testing.assert_close(sss.box_mean(x, k), loop_box(x, k))


def test_guided_filter_gray_per_pixel():
    torch.manual_seed(0)
    p, g, k, eps = torch.randn(1, 1, 7, 8, dtype=D), torch.rand(1, 1, 7, 8, dtype=D), 4, 0.01
    mg, mp = loop_box(g, k), loop_box(p, k)
    a = (loop_box(g * p, k) - mg * mp) / (loop_box(g * g, k) - mg * mg + eps)
    b = mp - a * mg
    torch.testing.assert_close(sss.guided_filter(p, g, k, eps), loop_box(a, k) * g + loop_box(b, k))


def test_guided_filter_color_solves_3x3_per_pixel():
    torch.manual_seed(1)
    p, g, k, eps = torch.randn(1, 1, 6, 6, dtype=D), torch.rand(1, 3, 6, 6, dtype=D), 3, 0.01
    mg, mp = loop_box(g, k), loop_box(p, k)
    a = torch.zeros(1, 3, 6, 6, dtype=D)
    gg = [[loop_box(g[:, r:r + 1] * g[:, s:s + 1], k) for s in range(3)] for r in range(3)]
    gp = loop_box(g * p, k)
    for i in range(6):
        for j in range(6):
            cov = torch.stack([torch.stack([gg[r][s][0, 0, i, j] - mg[0, r, i, j] * mg[0, s, i, j]
                                            for s in range(3)]) for r in range(3)])
            rhs = gp[0, :, i, j] - mg[0, :, i, j] * mp[0, 0, i, j]
            a[0, :, i, j] = torch.linalg.solve(cov + eps * torch.eye(3, dtype=D), rhs)
    b = mp - (a * mg).sum(1, keepdim=True)
    ref = (loop_box(a, k) * g).sum(1, keepdim=True) + loop_box(b, k)
    torch.testing.assert_close(sss.guided_filter(p, g, k, eps), ref)


def test_filter_features_matlab_grouping():
    torch.manual_seed(2)
    f, img = torch.randn(1, 5, 8, 9, dtype=D), torch.rand(1, 3, 8, 9, dtype=D)
    out = sss.filter_features(f, img, 4)
    # channels 0..2: channel j guided by image channel j alone; channels 3, 4: colour guide
    for j in range(3):
        torch.testing.assert_close(out[:, j:j + 1], sss.guided_filter(f[:, j:j + 1], img[:, j:j + 1], 4))
    for j in (3, 4):
        torch.testing.assert_close(out[:, j:j + 1], sss.guided_filter(f[:, j:j + 1], img, 4))
    color = sss.filter_features(f, img, 4, grouping="color")
    torch.testing.assert_close(color[:, 3:], out[:, 3:])
    assert not torch.allclose(color[:, :3], out[:, :3])


def test_pca_matches_numpy_svd():
    torch.manual_seed(3)
    f = torch.randn(2, 6, 5, 7, dtype=D) * torch.arange(1, 7, dtype=D).view(1, 6, 1, 1)
    out = sss.pca(f, 3)
    for i in range(2):
        x = f[i].reshape(6, -1).T.numpy()
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        proj = x @ vt[:3].T
        ours = out[i].reshape(3, -1).T.numpy()
        np.testing.assert_allclose(np.abs(ours), np.abs(proj), atol=1e-10)
        # sign convention: the largest-magnitude loading of each axis is positive
        signs = np.sign(vt[:3][np.arange(3), np.abs(vt[:3]).argmax(1)])
        np.testing.assert_allclose(ours, proj * signs, atol=1e-10)


def test_normalize01_and_pipeline():
    x = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]]], dtype=D)
    out = sss.normalize01(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]], dtype=D))
    assert torch.isnan(out[0, 1]).all()  # constant channel: 0/0 as in MATLAB
    assert (sss.normalize01(x, safe=True)[0, 1] == 0).all()
    torch.manual_seed(4)
    f, img = torch.randn(1, 7, 9, 8, dtype=D) * 4, torch.rand(1, 3, 9, 8, dtype=D)
    res = sss.preprocess_features(f, img)
    ref = sss.normalize01(sss.pca(sss.filter_features(f.clamp(-5, 5), img, 10, 0.01), 3))
    torch.testing.assert_close(res, ref)
    assert res.shape == (1, 3, 9, 8) and res.amin().item() == 0 and res.amax().item() == 1


def test_post_processing_gradcheck():
    torch.manual_seed(5)
    f = torch.randn(1, 4, 4, 4, dtype=D, requires_grad=True)
    img = torch.rand(1, 3, 4, 4, dtype=D)
    assert torch.autograd.gradcheck(lambda x: sss.filter_features(x, img, 2), (f,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: sss.pca(x, 2), (f,))


def test_post_processing_errors():
    with pytest.raises(ValueError, match="NCHW"):
        sss.pca(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="RGB"):
        sss.filter_features(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="dim"):
        sss.pca(torch.zeros(1, 2, 4, 4), 3)


LOSS = ('type: "SSSMetricLoss" bottom: "e" bottom: "l" top: "loss" '
        'sss_metric_loss_param {{ form: {form} num_instances: 3 samples_per_instance: 4 seed: 7 {extra} }}')


def _labels():
    lab = torch.zeros(2, 1, 5, 6, dtype=D)
    lab[:, :, :, 2:4], lab[:, :, :, 4:] = 1, 2
    lab[1, :, 0, 0] = 3
    return lab


@pytest.mark.parametrize("form", ["PAPER", "RELEASED"])
def test_metric_loss_gradcheck(form):
    layer = make_layer(LOSS.format(form=form, extra=""), [(2, 5, 5, 6), (2, 1, 5, 6)])
    lab = _labels()

    def fn(e):
        layer.gen.manual_seed(7)  # same pixel samples on every call
        return layer(e, lab)
    torch.manual_seed(6)
    assert torch.autograd.gradcheck(fn, (torch.randn(2, 5, 5, 6, dtype=D, requires_grad=True),))


@pytest.mark.parametrize("form", ["PAPER", "RELEASED"])
def test_metric_loss_formula(form):
    layer = make_layer(LOSS.format(form=form, extra=""), [(2, 5, 5, 6), (2, 1, 5, 6)])
    lab, emb = _labels(), torch.randn(2, 5, 5, 6, dtype=D)
    layer.gen.manual_seed(7)
    samples = [layer.sample(lab[i, 0]) for i in range(2)]
    layer.gen.manual_seed(7)
    loss = layer(emb, lab)
    per = []
    for i, (idx, inst) in enumerate(samples):
        f = emb[i].reshape(5, -1)[:, idx].T
        assert len(set(lab[i, 0].reshape(-1)[idx].tolist())) == 3
        d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
        same = (inst[:, None] == inst[None]).to(D)
        if form == "PAPER":
            sig = 2 / (1 + torch.exp(d2.sqrt()))
            terms = same * torch.log(sig) + (1 - same) * torch.log((1 - sig).clamp(min=1e-300))
            per.append(-terms.mean())
        else:  # the released TF lossfunction, literally
            ind = 2 * same - 1
            sig = 2 / (1 + torch.exp(d2 / 64))
            per.append((-(ind + 2) * torch.log(0.5 * (1 - ind) + ind * sig)).mean())
    torch.testing.assert_close(loss, torch.stack(per).mean())


def test_metric_loss_skips_images_with_few_instances():
    layer = make_layer(LOSS.format(form="PAPER", extra="ignore_label: 0"), [(2, 5, 5, 6), (2, 1, 5, 6)])
    lab = _labels()  # without label 0, image 0 has 2 instances (skipped), image 1 has 3
    emb = torch.randn(2, 5, 5, 6, dtype=D, requires_grad=True)
    layer(emb, lab).backward()
    assert emb.grad[0].abs().sum() == 0 and emb.grad[1].abs().sum() > 0
    assert layer(emb, torch.zeros(2, 1, 5, 6, dtype=D)).item() == 0


def test_metric_loss_errors():
    with pytest.raises(ValueError, match="SSSMetricLoss"):
        make_layer(LOSS.format(form="PAPER", extra=""), [(2, 5, 5, 6), (2, 1, 5, 5)])


def _write(tmp_path, net):
    p = tmp_path / "net.prototxt"
    p.write_text(str(net))
    return str(p)


def test_full_resnet101_config_shapes(tmp_path):
    net = make_net(33)
    names = {layer.name for layer in net.layer}
    assert {"res3b3", "res4b22", "res5c", "pool1", "hc_cv_5", "embedding"} <= names
    assert "res5c_relu" not in names  # hypercolumn reads res5c before the ReLU, as released
    n = Net(_write(tmp_path, net), phase="test")
    assert n.blobs["hypercolumn"].data.shape == (1, 1024, 33, 33)
    assert n.blobs["res5c"].data.shape == (1, 2048, 5, 5)  # output stride 8 (dilated res4/res5)
    assert n.blobs["embedding"].data.shape == (1, 128, 33, 33)


def test_reduced_config_forward_backward(tmp_path):
    torch.manual_seed(0)
    n = Net(_write(tmp_path, make_net(33, blocks=(1, 1, 1, 1), train=True)), phase="train")
    for name, blobs in n.params.items():
        if name.startswith("bn"):  # trained-like statistics: mean 0, variance 1, scale factor 1
            blobs[0].data[...] = 0
            blobs[1].data[...] = 1
            blobs[2].data[...] = 1
    rng = np.random.RandomState(0)
    label = np.zeros((1, 1, 33, 33), np.float32)
    label[..., 11:22], label[..., 22:] = 1, 2
    n.forward(data=rng.randn(1, 3, 33, 33).astype(np.float32) * 50, label=label)
    loss = float(n.blobs["loss"].data)
    assert np.isfinite(loss) and loss > 0
    n.backward()
    for layer in ("conv1", "hc_cv_0", "hc_cv_5", "fc1_matting", "embedding"):
        g = n.params[layer][0].diff
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, layer
