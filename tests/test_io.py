"""caffe_layers.pycaffe.io: pycaffe's caffe.io (Transformer, load_image, resize_image, blob and datum protos)."""
import numpy as np
import pytest
import torch
from PIL import Image

import caffe_layers as caffe
from caffe_layers.formats.proto import pb


def test_exposed_as_caffe_io():
    assert caffe.io.Transformer is not None and callable(caffe.io.load_image)


def test_preprocess_order_and_deprocess():
    rng = np.random.default_rng(0)
    img = rng.random((4, 5, 3)).astype(np.float32)
    keep = img.copy()
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    mean = np.array([104.0, 117.0, 123.0])
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    out = t.preprocess("data", img)
    # float32 steps, as pycaffe's in-place arithmetic: swap after transpose, raw scale, mean, input scale
    chw = img.transpose(2, 0, 1)[[2, 1, 0]].copy()
    chw *= np.float32(255)
    chw -= mean[:, None, None]
    chw *= 0.5
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, chw)
    np.testing.assert_array_equal(img, keep)  # the caller's image is left alone
    np.testing.assert_allclose(t.deprocess("data", out), img, rtol=1e-5, atol=1e-6)


def test_transformer_errors_and_mean_resize():
    t = caffe.io.Transformer({"data": [1, 3, 4, 4]})
    with pytest.raises(KeyError, match="not one of the net inputs"):
        t.set_raw_scale("label", 1)
    with pytest.raises(ValueError, match="channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="transpose order"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(ValueError, match="mean has 2 channels"):
        t.set_mean("data", np.zeros(2))
    # a full mean of another size is standardised and resized to the input (its minimum stays exact;
    # other values blend with the zero border, as skimage's mode 'constant' does)
    t.set_mean("data", np.full((3, 8, 8), 7.0) + np.arange(3)[:, None, None])
    assert t.mean["data"].shape == (3, 4, 4)
    np.testing.assert_array_equal(t.mean["data"][0], np.full((4, 4), 7.0))
    assert 8.5 < t.mean["data"][2].max() <= 9.0 and t.mean["data"][2].min() > 7.0
    # a list shape still means "same size": no resize of an image that already fits
    img = np.random.default_rng(1).random((4, 4, 3)).astype(np.float32)
    t2 = caffe.io.Transformer({"data": [1, 3, 4, 4]})
    np.testing.assert_array_equal(t2.preprocess("data", img), img)


def test_resize_image_like_skimage():
    rng = np.random.default_rng(2)
    im = rng.random((6, 8, 3)).astype(np.float32) * 10 + 5
    out = caffe.io.resize_image(im, (12, 16))
    assert out.shape == (12, 16, 3) and out.dtype == np.float32
    # skimage resize (order 1, mode 'constant') on the [0,1]-standardised image: bilinear with half-pixel
    # centres inside, blending with 0 beyond the border; then scaled back
    lo, hi = im.min(), im.max()
    std = torch.as_tensor((im - lo) / (hi - lo)).permute(2, 0, 1)[None].double()
    bil = torch.nn.functional.interpolate(std, size=(12, 16), mode="bilinear", align_corners=False)[0]
    bil = bil.permute(1, 2, 0).numpy() * (hi - lo) + lo
    np.testing.assert_allclose(out[1:-1, 1:-1], bil[1:-1, 1:-1], rtol=1e-5)
    # first column: x = -0.25 takes 3/4 of column 0 (torch clamps there) and 1/4 of the zero padding
    np.testing.assert_allclose(out[1:-1, 0] - lo, 0.75 * (bil[1:-1, 0] - lo), rtol=1e-5)
    np.testing.assert_allclose(out[0, 0], 0.75 * 0.75 * (im[0, 0] - lo) + lo, rtol=1e-5)
    # constant images stay constant; other channel counts use scipy's zoom
    np.testing.assert_array_equal(caffe.io.resize_image(np.full((3, 3, 1), 2.5), (5, 4)), np.full((5, 4, 1), 2.5))
    assert caffe.io.resize_image(rng.random((4, 4, 2)), (8, 6)).shape == (8, 6, 2)
    # shrinking applies skimage's Gaussian anti-aliasing: a checkerboard averages out
    board = (np.indices((16, 16)).sum(0) % 2).astype(np.float32)[:, :, None].repeat(3, 2)
    small = caffe.io.resize_image(board, (4, 4))
    assert abs(small[1:3, 1:3].mean() - 0.5) < 0.05 and small[1:3, 1:3].std() < 0.05


def test_load_image(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = caffe.io.load_image(str(tmp_path / "rgb.png"))
    assert img.dtype == np.float32 and img.shape == (5, 4, 3)
    np.testing.assert_array_equal(img, (rgb / 255.0).astype(np.float32))
    gray = caffe.io.load_image(str(tmp_path / "rgb.png"), color=False)
    np.testing.assert_allclose(gray[:, :, 0], rgb @ np.array([0.2125, 0.7154, 0.0721]) / 255, rtol=1e-6)
    g = rng.integers(0, 256, (3, 2), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    tiled = caffe.io.load_image(str(tmp_path / "g.png"))
    assert tiled.shape == (3, 2, 3) and (tiled[:, :, 2] == g / np.float32(255)).all()
    assert caffe.io.load_image(str(tmp_path / "g.png"), color=False).shape == (3, 2, 1)
    rgba = rng.integers(0, 256, (2, 2, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(caffe.io.load_image(str(tmp_path / "a.png")),
                                  (rgba[:, :, :3] / 255.0).astype(np.float32))


def test_blobproto_and_datum():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = caffe.io.array_to_blobproto(a, diff=-a)
    assert list(blob.shape.dim) == [2, 3, 4]
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), a)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), -a)
    legacy = pb.BlobProto(num=1, channels=2, height=3, width=4)
    legacy.data.extend(range(24))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 3, 4)
    s = caffe.io.arraylist_to_blobprotovector_str([a, a[0]])
    back = caffe.io.blobprotovector_str_to_arraylist(s)
    assert [b.shape for b in back] == [(2, 3, 4), (3, 4)]
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    d = caffe.io.array_to_datum(u8, label=3)
    assert d.label == 3 and d.data == u8.tobytes()
    np.testing.assert_array_equal(caffe.io.datum_to_array(d), u8)
    f = caffe.io.array_to_datum(a)
    np.testing.assert_array_equal(caffe.io.datum_to_array(f), a)
    with pytest.raises(ValueError, match="3-axis"):
        caffe.io.array_to_datum(a[0])


def test_oversample():
    im = np.arange(5 * 6 * 1, dtype=np.float32).reshape(5, 6, 1)
    crops = caffe.io.oversample([im], (3, 4))
    assert crops.shape == (10, 3, 4, 1)
    np.testing.assert_array_equal(crops[0], im[:3, :4])
    np.testing.assert_array_equal(crops[3], im[2:, 2:])
    np.testing.assert_array_equal(crops[5], im[:3, :4][:, ::-1])
