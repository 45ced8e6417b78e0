"""TwoImageData (segaware a758ed3): image pairs transformed alike (TransformBoth)."""
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_layers.formats.proto import TEST, TRAIN
from golden import make_layer


def rgb(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def gray(h, w, seed):
    return (np.random.RandomState(100 + seed).randint(0, 6, (h, w)) * 40).astype(np.uint8)


@pytest.fixture
def pairs(tmp_path):
    for i in range(3):
        Image.fromarray(rgb(6, 7, i)).save(tmp_path / f"a{i}.png")
        Image.fromarray(gray(6, 7, i)).save(tmp_path / f"b{i}.png")
        Image.fromarray(rgb(6, 7, 50 + i)).save(tmp_path / f"c{i}.png")
    (tmp_path / "gray.txt").write_text("".join(f"a{i}.png b{i}.png\n" for i in range(3)))
    (tmp_path / "color.txt").write_text("".join(f"a{i}.png c{i}.png\n" for i in range(3)))
    return tmp_path


def layer_text(root, source, batch=1, transform="", extra="", two=""):
    return (f'type: "TwoImageData" top: "data" top: "label" image_data_param {{ source: "{root}/{source}" '
            f'root_folder: "{root}/" batch_size: {batch} {extra} }} transform_param {{ {transform} }} '
            f'two_image_data_param {{ {two} }}')


def test_mean_and_scale_apply_to_the_first_image_only(pairs):
    layer = make_layer(layer_text(pairs, "gray.txt", 2, "scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30"),
                       [], TEST, dtype=torch.float32)
    assert layer.top_shapes([]) == [(2, 3, 6, 7), (2, 1, 6, 7)]
    data, label = layer()
    for i in range(2):
        bgr = rgb(6, 7, i)[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)
        np.testing.assert_array_equal(data[i].numpy(), (bgr - np.float32([10, 20, 30])[:, None, None]) * 0.5)
        np.testing.assert_array_equal(label[i, 0].numpy(), gray(6, 7, i))  # no mean, no scale
    data, label = layer()  # wraps around the list
    np.testing.assert_array_equal(label[1, 0].numpy(), gray(6, 7, 0))


def test_color_second_image_and_pad_with_mean_and_255(pairs):
    text = layer_text(pairs, "color.txt", 1, "crop_size: 8 mean_value: 1 mean_value: 2 mean_value: 3",
                      "ignore_label: 7", "second_is_color: true")
    layer = make_layer(text, [], TEST, dtype=torch.float32)  # pads with 255 whatever ignore_label is
    assert layer.top_shapes([]) == [(1, 3, 8, 8), (1, 3, 8, 8)]
    data, label = layer()
    np.testing.assert_array_equal(label[0, :, :6, :7].numpy(), rgb(6, 7, 50)[:, :, ::-1].transpose(2, 0, 1))
    assert (label[0, :, 6:].numpy() == 255).all() and (label[0, :, :, 7].numpy() == 255).all()
    assert (data[0, :, 6:].numpy() == 0).all() and (data[0, :, :, 7].numpy() == 0).all()  # mean pad


def test_train_crop_and_mirror_are_shared_by_the_pair(pairs):
    # the second image is the first one's gray copy, so the pair must stay aligned under crop and mirror
    for i in range(3):
        Image.fromarray(rgb(6, 7, i)[:, :, 0]).save(pairs / f"r{i}.png")
    (pairs / "same.txt").write_text("".join(f"a{i}.png r{i}.png\n" for i in range(3)))
    torch.manual_seed(3)
    layer = make_layer(layer_text(pairs, "same.txt", 3, "crop_size: 4 mirror: true"), [], TRAIN, dtype=torch.float32)
    seen_mirror = set()
    for _ in range(4):
        data, label = layer()
        np.testing.assert_array_equal(data[:, 2].numpy(), label[:, 0].numpy())  # channel 2 of BGR is R
        for n in range(3):
            d = data[n, 2].numpy()
            for i in range(3):  # find the crop in its source image, plain or mirrored
                src = rgb(6, 7, i)[:, :, 0].astype(np.float32)
                for mirrored, img in ((False, src), (True, src[:, ::-1])):
                    if any((img[y:y + 4, x:x + 4] == d).all() for y in range(3) for x in range(4)):
                        seen_mirror.add(mirrored)
    assert seen_mirror == {False, True}


def test_resize_is_bilinear_for_both_images(pairs):
    layer = make_layer(layer_text(pairs, "gray.txt", 1, "", "new_height: 3 new_width: 4"), [], TEST,
                       dtype=torch.float32)
    _, label = layer()
    nearest = np.asarray(Image.fromarray(gray(6, 7, 0)).resize((4, 3), Image.NEAREST))
    bilinear = np.asarray(Image.fromarray(gray(6, 7, 0)).resize((4, 3), Image.BILINEAR))
    np.testing.assert_array_equal(label[0, 0].numpy(), bilinear)
    assert not np.array_equal(bilinear, nearest)


def test_errors_name_the_layer(pairs, tmp_path):
    Image.fromarray(gray(5, 7, 0)).save(pairs / "small.png")
    (pairs / "bad.txt").write_text("a0.png small.png\n")
    with pytest.raises(ValueError, match="'L'.*same size"):
        make_layer(layer_text(pairs, "bad.txt"), [], TEST)
    (pairs / "one.txt").write_text("a0.png\n")
    with pytest.raises(ValueError, match="'L'.*expected 2 columns"):
        make_layer(layer_text(pairs, "one.txt"), [], TEST)
    with pytest.raises(FileNotFoundError, match="'L'.*source list"):
        make_layer(layer_text(pairs, "missing.txt"), [], TEST)
    with pytest.raises(ValueError, match="crop_size only"):
        make_layer(layer_text(pairs, "gray.txt", 1, "crop_height: 4 crop_width: 4"), [], TEST)
