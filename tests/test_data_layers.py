"""Data layers: list files, transform_param, label maps, LMDB, memory arrays, HDF5, prefetch."""
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_layers.training.data.transformer import Transformer
from caffe_layers.formats.proto import TEST, TRAIN, pb
from golden import make_layer


def image(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture
def images(tmp_path):
    for i in range(3):
        Image.fromarray(image(6, 7, i)).save(tmp_path / f"im{i}.png")  # RGB on disk
        Image.fromarray((np.arange(42).reshape(6, 7) % 5 + i).astype(np.uint8)).save(tmp_path / f"lb{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"im{i}.png {i + 3}\n" for i in range(3)))
    (tmp_path / "seg.txt").write_text("".join(f"im{i}.png lb{i}.png\n" for i in range(3)))
    return tmp_path


def run(layer, n=1):
    """The next n batches of a data layer, each a tuple of numpy tops."""
    batches = []
    for _ in range(n):
        tops = layer()
        batches.append(tuple(t.numpy() for t in (tops if isinstance(tops, tuple) else (tops,))))
    return batches


def test_image_data_bgr_mean_scale_center_crop(images):
    text = (f'type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{images}/list.txt" '
            f'root_folder: "{images}/" batch_size: 2 }} transform_param {{ crop_size: 4 scale: 0.5 '
            f'mean_value: 10 mean_value: 20 mean_value: 30 }}')
    layer = make_layer(text, [], TEST, dtype=torch.float32)
    assert layer.top_shapes([]) == [(2, 3, 4, 4), (2,)]
    data, label = layer()
    bgr = image(6, 7, 0)[1:5, 1:5, ::-1].astype(np.float32).transpose(2, 0, 1)  # centre crop: offsets 1, 1
    expected = (bgr - np.array([10, 20, 30], np.float32)[:, None, None]) * 0.5
    np.testing.assert_array_equal(data[0].numpy(), expected)
    np.testing.assert_array_equal(label.numpy(), [3, 4])
    data, label = layer()  # wraps around the list
    np.testing.assert_array_equal(label.numpy(), [5, 3])


def test_transformer_train_mirror_and_crop_are_consistent():
    p = pb.TransformationParameter(mirror=True, crop_size=3)
    img = image(5, 5, 1)
    seen = set()
    t = Transformer(p, TRAIN, np.random.RandomState(0))
    for _ in range(20):
        out = t(img)
        full = img[:, :, :].astype(np.float32).transpose(2, 0, 1)
        hits = [(h, w, m) for h in range(3) for w in range(3) for m in (0, 1)
                if np.array_equal(out, (full[:, h:h + 3, w:w + 3][:, :, ::-1] if m else full[:, h:h + 3, w:w + 3]))]
        assert hits, "output is not a (mirrored) crop of the input"
        seen.add(hits[0][2])
    assert seen == {0, 1}


def test_mean_file_binaryproto(tmp_path):
    mean = np.arange(3 * 5 * 5, dtype=np.float32).reshape(3, 5, 5)
    blob = pb.BlobProto(channels=3, height=5, width=5, num=1)
    blob.data.extend(mean.ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    p = pb.TransformationParameter(mean_file=str(tmp_path / "mean.binaryproto"), crop_size=3)
    img = image(5, 5, 2)
    out = Transformer(p, TEST, np.random.RandomState(0))(img)
    expected = img.astype(np.float32).transpose(2, 0, 1)[:, 1:4, 1:4] - mean[:, 1:4, 1:4]
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="mean_file or mean_value"):
        Transformer(pb.TransformationParameter(mean_file="x", mean_value=[1]), TEST, None, "L")


def test_image_seg_data_pads_with_mean_and_ignore(images):
    text = (f'type: "ImageSegData" top: "data" top: "label" top: "dim" image_data_param {{ '
            f'source: "{images}/seg.txt" root_folder: "{images}/" batch_size: 1 label_type: PIXEL ignore_label: 255 }} '
            f'transform_param {{ crop_size: 8 mean_value: 1 mean_value: 2 mean_value: 3 }}')
    layer = make_layer(text, [], TEST, dtype=torch.float32)
    assert layer.top_shapes([]) == [(1, 3, 8, 8), (1, 1, 8, 8), (1, 1, 1, 2)]
    data, label, dim = layer()
    # padded to 8x8 bottom/right, then the centre crop of an 8x8 image is the whole of it
    np.testing.assert_array_equal(label[0, 0, :6, :7].numpy(), np.arange(42).reshape(6, 7) % 5)
    assert (label[0, 0, 6:, :].numpy() == 255).all() and (label[0, 0, :, 7].numpy() == 255).all()
    assert (data[0, :, 6:, :].numpy() == 0).all()  # the pad is the mean, zero after subtraction
    np.testing.assert_array_equal(dim.numpy().ravel(), [6, 7])


def test_hdf5_data_cycles_files_and_checks(tmp_path):
    for k in range(2):
        with h5py.File(tmp_path / f"{k}.h5", "w") as f:
            f["x"] = np.arange(3 * 2, dtype=np.float32).reshape(3, 2) + 100 * k
    (tmp_path / "l.txt").write_text(f"{tmp_path}/0.h5\n{tmp_path}/1.h5\n")
    layer = make_layer(f'type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/l.txt" batch_size: 2 }}',
                       [], dtype=torch.float32)
    firsts = [float(layer()[0, 0]) for _ in range(4)]
    assert firsts == [0, 4, 102, 0]  # batches: rows 0-1 | row 2 of file 0, row 0 of file 1 | 1-2 | 0-1
    assert layer._prefetch.thread is None  # Caffe's HDF5DataLayer reads in Forward: no prefetch thread
    with pytest.raises(ValueError, match="layer 'L'.*datasets \\['y'\\] missing"):
        make_layer(f'type: "HDF5Data" top: "x" top: "y" hdf5_data_param {{ source: "{tmp_path}/l.txt" '
                   f'batch_size: 2 }}', [])


def test_hdf5_data_batch_longer_than_its_file(tmp_path):
    with h5py.File(tmp_path / "0.h5", "w") as f:
        f["x"] = np.arange(3, dtype=np.float32).reshape(3, 1)
    (tmp_path / "l.txt").write_text(f"{tmp_path}/0.h5\n")
    layer = make_layer(f'type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/l.txt" batch_size: 5 }}',
                       [], dtype=torch.float32)
    assert [layer().ravel().tolist() for _ in range(2)] == [[0, 1, 2, 0, 1], [2, 0, 1, 2, 0]]


def test_sharding_reads_every_world_th_batch(tmp_path):
    with h5py.File(tmp_path / "0.h5", "w") as f:
        f["x"] = np.arange(12, dtype=np.float32).reshape(12, 1)
    (tmp_path / "l.txt").write_text(f"{tmp_path}/0.h5\n")
    text = f'type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/l.txt" batch_size: 2 }}'
    ranks = []
    for rank in range(2):
        layer = make_layer(text, [], dtype=torch.float32)
        layer.set_shard(rank, 2)
        ranks.append([layer().ravel().tolist() for _ in range(3)])
    assert ranks[0] == [[0, 1], [4, 5], [8, 9]] and ranks[1] == [[2, 3], [6, 7], [10, 11]]


def test_memory_data(tmp_path):
    layer = make_layer('type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 '
                       'channels: 1 height: 2 width: 2 }', [], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="reset"):
        layer()
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    layer.reset(data, np.arange(4))
    d, l = layer()
    np.testing.assert_array_equal(d.numpy(), data[:2])
    d, l = layer()
    np.testing.assert_array_equal(l.numpy(), [2, 3])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        layer.reset(data[:3], np.arange(3))


def test_lmdb_data(tmp_path):
    import lmdb
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i in range(3):
            d = pb.Datum(channels=3, height=4, width=4, label=i, data=image(4, 4, i).transpose(2, 0, 1).tobytes())
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    text = (f'type: "Data" top: "data" top: "label" data_param {{ source: "{tmp_path}/db" batch_size: 2 '
            f'backend: LMDB }} transform_param {{ scale: 0.25 }}')
    layer = make_layer(text, [], TEST, dtype=torch.float32)
    d, l = layer()
    np.testing.assert_array_equal(d[1].numpy(), image(4, 4, 1).transpose(2, 0, 1).astype(np.float32) * 0.25)
    np.testing.assert_array_equal(l.numpy(), [0, 1])
    d, l = layer()
    np.testing.assert_array_equal(l.numpy(), [2, 0])


def test_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="layer .L.*cannot open source list"):
        make_layer(f'type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{tmp_path}/no.txt" '
                   f'batch_size: 1 }}', [])
