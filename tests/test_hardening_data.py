"""Bad input to the data layers and layer settings is one of the project's errors naming the layer
and the file (and line); the blob counts of every layer are Caffe's, checked once."""
import re

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_layers import Net
from caffe_layers.errors import DataError, PrototxtError
from caffe_layers.formats.proto import TEST, TRAIN
from golden import make_layer


@pytest.fixture
def images(tmp_path):
    rng = np.random.RandomState(0)
    for name in ("a.png", "b c.png"):
        Image.fromarray(rng.randint(0, 256, (4, 5, 3)).astype(np.uint8)).save(tmp_path / name)
    return tmp_path


def image_data(folder, list_text, extra="", list_bytes=None, phase=TEST):
    path = folder / "list.txt"
    path.write_bytes(list_bytes if list_bytes is not None else list_text.encode())
    text = (f'name: "imgs" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{path}" '
            f'root_folder: "{folder}/" batch_size: 2 {extra} }}')
    return make_layer(text, [], phase, dtype=torch.float32), path


def test_list_paths_may_hold_spaces(images):
    layer, _ = image_data(images, "a.png 3\nb c.png 7\n")
    _, label = layer()
    assert label.tolist() == [3, 7]


def test_non_numeric_label_names_the_line(images):
    with pytest.raises(DataError, match=r"'imgs': .*list.txt:2: expected 'path label' with an integer label"):
        image_data(images, "a.png 3\nb c.png seven\n")


def test_non_utf8_list_names_the_line(images):
    with pytest.raises(DataError, match=r"list.txt:2: not UTF-8"):
        image_data(images, "", list_bytes=b"a.png 1\n\xff.png 2\n")


def test_bad_image_settings(images):
    with pytest.raises(DataError, match="new_height x new_width 100000x100000 is too large"):
        image_data(images, "a.png 1\n", "new_height: 100000 new_width: 100000")
    (images / "seg.txt").write_text("a.png 0\n")
    for layer_type in ("ImageData", "ImageSegData"):
        with pytest.raises(DataError, match="batch_size must be >= 1"):
            make_layer(f'type: "{layer_type}" top: "d" top: "l" image_data_param {{ source: "{images}/seg.txt" '
                       f'root_folder: "{images}/" batch_size: 0 }}', [], TEST)


def test_decompression_bomb_and_broken_images(images, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # a 4x5 image is now a "bomb" (> 2x the limit)
    with pytest.raises(DataError, match=r"'imgs': image '.*a.png' is too large to decode"):
        image_data(images, "a.png 1\n")
    monkeypatch.undo()
    (images / "a.png").write_bytes((images / "a.png").read_bytes()[:40])
    with pytest.raises(DataError, match=r"'imgs': could not load image '.*a.png'"):
        image_data(images, "a.png 1\n")


def test_ignore_label_above_255_saturates_in_the_8_bit_label_map(images):
    (images / "seg.txt").write_text("a.png 0\n")
    text = (f'type: "ImageSegData" top: "data" top: "label" image_data_param {{ source: "{images}/seg.txt" '
            f'root_folder: "{images}/" batch_size: 1 label_type: NONE ignore_label: 300 }} '
            f'transform_param {{ crop_size: 6 }}')
    _, label = make_layer(text, [], TRAIN, dtype=torch.float32)()
    assert set(label.unique().tolist()) == {255.0}  # cv::Mat CV_8U: saturate_cast<uchar>(300)


def hdf5_data(folder, *files):
    lines = []
    for i, datasets in enumerate(files):
        path = folder / f"d{i}.h5"
        with h5py.File(path, "w") as f:
            for k, v in datasets.items():
                f[k] = v
        lines.append(str(path))
    (folder / "h5.txt").write_text("\n".join(lines) + "\n")
    text = f'name: "h5" type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{folder}/h5.txt" batch_size: 2 }}'
    return lambda: make_layer(text, [], TRAIN, dtype=torch.float32)


@pytest.mark.parametrize("files,message", [
    ([{"x": np.float32(3)}], r"dataset 'x' \(float32, shape \[\]\) is not a numeric array of rows"),
    ([{"x": np.zeros((0, 3), np.float32)}], "the datasets have no rows"),
    ([{"x": np.array([b"ab", b"cd"])}], r"dataset 'x' \(\|S2, shape \[2\]\) is not a numeric array of rows"),
    ([{"y": np.zeros((2, 3), np.float32)}], r"datasets \['x'\] missing"),
])
def test_bad_hdf5_data(tmp_path, files, message):
    with pytest.raises(DataError, match=rf"layer 'h5': HDF5 file .*d0.h5'?: {message}"):
        hdf5_data(tmp_path, *files)()


def test_hdf5_data_files_of_different_row_shapes(tmp_path):
    layer = hdf5_data(tmp_path, {"x": np.zeros((2, 3), np.float32)}, {"x": np.zeros((2, 4), np.float32)})()
    layer.prefetch = 0
    layer()
    with pytest.raises(DataError, match=r"d1.h5'?: rows of shapes \[\[4\]\], but the first file's are \[\[3\]\]"):
        layer()


# ---- layer settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: -1 } } }',
    'layer { name: "in" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 dim: -3 } } }',
])
def test_negative_dims_are_refused_by_the_layer_that_has_them(layer):
    with pytest.raises(PrototxtError, match=r"layer 'in': top 'x': invalid blob shape \[2, -\d\]"):
        make_layer(layer[len("layer {"):-1], [])
    with pytest.raises(PrototxtError, match=r"^layer 'in' \(\w+\) with bottoms \[\]: top 'x': invalid blob shape \[2, -\d\]"):
        Net(layer)


@pytest.mark.parametrize("filler", ["xavier", "msra", "gaussian"])
def test_zero_channels_do_not_divide_by_zero(filler):
    net = Net(f'layer {{ name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param {{ shape {{ dim: 0 dim: 3 }} '
              f'shape {{ dim: 3 dim: 0 }} data_filler {{ type: "{filler}" }} }} }}')
    out = net.forward()
    assert tuple(out["x"].shape) == (0, 3) and tuple(out["y"].shape) == (3, 0)
    with pytest.raises(ValueError, match=r"'bn' \(BatchNorm\): the bottom \[2, 0, 3\] has 0 channels"):
        Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 0 dim: 3 } } }'
            'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }')


@pytest.mark.parametrize("text,bottoms,message", [
    ('name: "r" type: "ReLU" top: "y"', [(2, 3), (2, 3)], r"'r' \(ReLU\): takes exactly 1 bottom blob, got 2"),
    ('name: "e" type: "Eltwise" top: "y"', [(2, 3)], r"'e' \(Eltwise\): takes at least 2 bottom blobs, got 1"),
    ('name: "s" type: "Scale" top: "y"', [(2, 3)] * 3, r"'s' \(Scale\): takes at most 2 bottom blobs, got 3"),
    ('name: "c" type: "Concat" top: "y"', [], r"'c' \(Concat\): takes at least 1 bottom blob, got 0"),
    ('name: "l" type: "SoftmaxWithLoss" top: "a" top: "b" top: "c"', [(2, 3), (2,)],
     r"'l' \(SoftmaxWithLoss\): takes at most 2 top blobs, got 3"),
    ('name: "i" type: "InnerProduct" top: "a" top: "b" inner_product_param { num_output: 2 }', [(2, 3)],
     r"'i' \(InnerProduct\): takes exactly 1 top blob, got 2"),
    ('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } }', [(2, 3)],
     r"'d' \(DummyData\): takes exactly 0 bottom blobs, got 1"),
    ('name: "x" type: "Silence" top: "a"', [(2, 3)], r"'x' \(Silence\): takes exactly 0 top blobs, got 1"),
])
def test_blob_counts_are_caffes(text, bottoms, message):
    with pytest.raises(PrototxtError, match=message):
        make_layer(text, bottoms)


def test_a_loss_layer_may_leave_its_top_out():
    layer = make_layer('name: "l" type: "EuclideanLoss"', [(2, 3), (2, 3)])
    assert float(layer(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))) == 1.5


def test_a_top_too_large_for_a_blob_is_refused_by_the_net():
    with pytest.raises(PrototxtError, match=r"layer 'up' \(Interp\): top 'big': invalid blob shape \[1, 1, 65537, 65537\]"):
        Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }'
            'layer { name: "up" type: "Interp" bottom: "x" top: "big" interp_param { height: 65537 width: 65537 } }')


def test_divide_gpu_rule_compares_in_double():
    from caffe_layers.layers.divide import clamp_mask

    x = torch.tensor([-1e-6, 1e-6, -2e-6, 0.0], dtype=torch.float32)  # float32(+-1e-6) are inside +-1e-6
    mask, eps = clamp_mask(x, "gpu")
    assert mask.tolist() == [True, True, False, True] and eps == 1e-6


def test_set_device_without_a_gpu_refuses(monkeypatch):
    import caffe_layers
    from caffe_layers.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(DeviceError, match=r"caffe.set_device\(0\): no CUDA device is available to torch"):
        caffe_layers.set_device(0)


def test_set_device_past_the_last_gpu_refuses():
    import caffe_layers
    from caffe_layers.errors import DeviceError

    with pytest.raises(DeviceError, match=r"caffe.set_device\(99\)"):
        caffe_layers.set_device(99)


@pytest.mark.parametrize("filler,message", [('type: "uniform" min: 2 max: 1', "uniform filler needs min <= max"),
                                            ('type: "uniform" min: -inf max: 1', "uniform filler needs max - min finite"),
                                            ('type: "uniform" min: -3e38 max: 3e38', "uniform filler needs max - min finite"),
                                            ('type: "gaussian" std: -1', "gaussian filler needs std > 0")])
def test_filler_settings_are_checked(filler, message):
    with pytest.raises(ValueError, match=rf"layer 'ip': parameter blob 0: {message}"):
        Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }'
            f'layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
            f'        inner_product_param {{ num_output: 4 weight_filler {{ {filler} }} }} }}')


def test_settings_too_large_for_the_bottoms_name_the_layer():
    for layer in ('type: "Convolution" convolution_param { num_output: 1 kernel_size: 1 pad: 2147483647 }',
                  'type: "Im2col" convolution_param { kernel_size: 1 pad: 2147483647 }'):
        with pytest.raises(ValueError, match=r"layer 'c'.*(invalid blob shape|settings make a blob too large)"):
            Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }'
                f'layer {{ name: "c" bottom: "x" top: "y" {layer} }}')
    with pytest.raises(PrototxtError, match=r"layer 'ip': parameter blob 0: invalid blob shape \[4000000000, 3\]"):
        make_layer('name: "ip" type: "InnerProduct" top: "y" inner_product_param { num_output: 4000000000 }',
                   [(2, 3)])


def test_max_pooling_an_empty_batch():
    layer = make_layer('name: "p" type: "Pooling" top: "y" pooling_param { pool: MAX kernel_size: 2 }',
                       [(0, 4, 4, 4)])
    assert layer.top_shapes([(0, 4, 4, 4)]) == [(0, 4, 3, 3)]


def test_a_layers_error_keeps_its_type_through_the_net(tmp_path):
    (tmp_path / "h5.txt").write_text(f"{tmp_path}/d0.h5\n")
    with h5py.File(tmp_path / "d0.h5", "w") as f:
        f["y"] = np.zeros((2, 3), np.float32)
    with pytest.raises(DataError, match=r"^layer 'h5' \(HDF5Data\) with bottoms \[\]: HDF5 file .*datasets "
                                        r"\['x'\] missing[^\n]*$") as caught:
        Net(f'layer {{ name: "h5" type: "HDF5Data" top: "x" '
            f'hdf5_data_param {{ source: "{tmp_path}/h5.txt" batch_size: 2 }} }}')
    assert isinstance(caught.value.__cause__, DataError)
    with pytest.raises(FileNotFoundError, match=r"^layer 'd' \(ImageData\) with bottoms \[\]: cannot open "):
        Net(f'layer {{ name: "d" type: "ImageData" top: "x" top: "l" '
            f'image_data_param {{ source: "{tmp_path}/missing.txt" batch_size: 1 }} }}')
    net = Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }'
              'layer { name: "c" type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_size: 5 pad: 2 } }')
    with pytest.raises(PrototxtError, match=r"^layer 'c' \(Im2col\): top 'y': invalid blob shape \[1, 25, 16384, "):
        net.blobs["x"].reshape(1, 1, 16384, 16384)  # pycaffe's reshape infers again, checked as at build
    for shape in [(1, -1, 2, 2), (2**16, 2**16, 1, 1)]:  # the reshaped blob itself is named, not the next layer
        with pytest.raises(ValueError, match=r"^blob 'x': reshape: invalid blob shape"):
            net.blobs["x"].reshape(*shape)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_windows_past_the_image_are_not_read_from_a_padded_copy(method):
    # ceil((8 - 2) / 2**20) + 1 = 2 windows a side, the second starting 2**20 rows down: Caffe's loops see an
    # empty window there (MAX: -FLT_MAX and mask -1; AVE: 0 over Caffe's negative pool size)
    stride = 2**20
    tops = 'top: "y" top: "mask"' if method == "MAX" else 'top: "y"'
    layer = make_layer(f'name: "p" type: "Pooling" {tops} pooling_param {{ pool: {method} kernel_size: 2 '
                       f'stride: {stride} }}', [(1, 2, 8, 8)], dtype=torch.float32)
    x = torch.randn(1, 2, 8, 8)
    out = layer(x)
    y = out[0] if method == "MAX" else out
    assert y.shape == (1, 2, 2, 2)
    first = x[:, :, :2, :2].amax((2, 3)) if method == "MAX" else x[:, :, :2, :2].mean((2, 3))
    torch.testing.assert_close(y[:, :, 0, 0], first)
    empty = -torch.finfo(torch.float32).max if method == "MAX" else 0.0
    assert (y[:, :, 1, :] == empty).all() and (y[:, :, :, 1] == empty).all()
    if method == "MAX":
        assert (out[1][:, :, 1, :] == -1).all() and (out[1][:, :, :, 1] == -1).all()


def _build_and_run(text):
    with torch.no_grad():
        Net(text).forward()


def test_a_blob_larger_than_the_process_may_allocate_is_refused_before_allocating():
    from caffe_layers.tools.fuzz import run_isolated

    text = ('layer { name: "in" type: "DummyData" top: "x" dummy_data_param { shape { dim: 1 dim: 16384 '
            'dim: 32768 } } } layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')  # 2 GiB of float32
    outcome, _, message = run_isolated(lambda path: _build_and_run(text), "x", timeout=60.0, memory_mb=512)
    assert outcome == "clean", message
    assert re.search(r"^PrototxtError: layer 'in' \(DummyData\) with bottoms \[\]: top 'x': shape \[1, 16384, "
                     r"32768\] needs 2.0 GiB, more than this process can allocate \(0.\d GiB: its address-space "
                     r"limit, RLIMIT_AS", message), message
