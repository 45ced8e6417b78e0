"""Reading and writing Caffe weights: binary .caffemodel (a NetParameter) and .caffemodel.h5.

Binary files are indexed first (a scan of the protobuf wire format over an mmap, touching only
the headers), so every error (truncation, corruption, count or shape mismatch) is found before
anything is copied; then the blob data is read straight into the parameters. Layer definitions
and shapes are decoded by protobuf itself; only the outer NetParameter -> layer -> BlobProto
nesting and the packed float arrays are handled here, which is what makes large files fast.
"""
import contextlib
import logging
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from google.protobuf.message import DecodeError

from caffe_layers.errors import CaffeLayersError, WeightsError, atomic_path, check_readable_file
from caffe_layers.formats.proto import check_blob_shape, pb

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NET_LAYER = 100  # NetParameter.layer
_LAYER_BLOBS = 7  # LayerParameter.blobs
# BlobProto fields
_NUM, _CHANNELS, _HEIGHT, _WIDTH, _DATA, _DIFF, _SHAPE, _DOUBLE_DATA, _DOUBLE_DIFF = range(1, 10)
_RAW_DATA_TYPE, _RAW_DATA = 10, 12  # OpenCV's proto (NVIDIA caffe's fp16 storage)
_RAW_TYPES = {0: np.float64, 1: np.float32, 2: np.float16}
# what protobuf's decoder raises on bad bytes (invalid UTF-8 in a string field is a UnicodeDecodeError)
_DECODE_ERRORS = (DecodeError, UnicodeDecodeError, ValueError, RecursionError)


# ---- wire-format scanning ----------------------------------------------------------------------
def _varint(buf, pos, end, path):
    result = shift = 0
    while True:
        if pos >= end:
            raise WeightsError(f"{path}: truncated or corrupt (a varint runs past byte {end})")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WeightsError(f"{path}: corrupt (malformed varint at byte {pos})")


def _fields(buf, start, end, path, what):
    """Yield (field number, wire type, value start, value end, field start) over buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WeightsError(f"{path}: corrupt {what} at byte {first} (field number 0)")
        if wire == 0:
            _, after = _varint(buf, pos, end, path)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end, path)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not used by caffe.proto; 6 and 7 do not exist
            raise WeightsError(f"{path}: not a binary Caffe NetParameter, or corrupt: invalid wire "
                               f"type {wire} in {what} at byte {first}{_text_hint(buf)}")
        if after > end:
            raise WeightsError(f"{path}: truncated: a field of {what} at byte {first} needs "
                               f"{after - first} bytes, only {end - first} are left")
        yield number, wire, pos, after, first
        pos = after


def _text_hint(buf):
    head = bytes(buf[:64])
    if head.lstrip().startswith((b"name", b"layer", b"input", b"#", b"force_backward")):
        return " (this looks like a text prototxt; weights are a binary .caffemodel)"
    return ""


@dataclass
class BlobRecord:
    """Where one BlobProto's values are: byte segments of `source` (an mmap or bytes)."""
    source: object
    shape: tuple = None  # from `shape`, or None
    legacy: list = None  # [num, channels, height, width] when any of them is present
    data: list = field(default_factory=list)  # [(start, end)] of float32 bytes
    double_data: list = field(default_factory=list)
    diff: list = field(default_factory=list)
    double_diff: list = field(default_factory=list)
    raw_data: list = field(default_factory=list)  # NVIDIA caffe / OpenCV: raw_data_type values
    raw_data_type: int = 0  # BlobProto.raw_data_type (Type: DOUBLE 0, FLOAT 1, FLOAT16 2)

    @property
    def dims(self):
        """The blob shape as Caffe's FromProto(reshape=true) sees it."""
        return tuple(self.legacy) if self.legacy is not None else tuple(self.shape or ())

    def values(self, diff=False):
        """(segments, numpy dtype, count): double_* wins when present, as in Blob::FromProto."""
        doubles, floats = (self.double_diff, self.diff) if diff else (self.double_data, self.data)
        segments, dtype = (doubles, np.float64) if doubles else (floats, np.float32)
        if not diff and not segments and self.raw_data:  # only when data is empty, as OpenCV reads it
            segments, dtype = self.raw_data, _RAW_TYPES.get(self.raw_data_type)
            if dtype is None:
                raise WeightsError(f"blob raw_data of type {self.raw_data_type}: only DOUBLE, FLOAT and "
                                   f"FLOAT16 values can be read")
        nbytes = sum(e - s for s, e in segments)
        return segments, dtype, nbytes // np.dtype(dtype).itemsize

    def read_into(self, out, segments):
        """Copy the segments into the flat array `out` (its dtype already the stored one)."""
        raw = out.view(np.uint8).reshape(-1)
        pos = 0
        for s, e in segments:
            raw[pos:pos + e - s] = np.frombuffer(self.source, np.uint8, e - s, s)
            pos += e - s


def _scan_blob(buf, start, end, path, where):
    rec = BlobRecord(buf)
    legacy = {}
    for number, wire, s, e, _ in _fields(buf, start, end, path, where):
        if number in (_NUM, _CHANNELS, _HEIGHT, _WIDTH) and wire == 0:
            value, _ = _varint(buf, s, e, path)
            legacy[number] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == _SHAPE and wire == 2:
            try:
                rec.shape = tuple(pb.BlobShape.FromString(bytes(buf[s:e])).dim)
            except _DECODE_ERRORS as err:
                raise WeightsError(f"{path}: corrupt shape of {where}: {err}") from err
        elif number in (_DATA, _DIFF) and wire in (2, 5):
            target = rec.data if number == _DATA else rec.diff
            if (e - s) % 4:
                raise WeightsError(f"{path}: corrupt {where}: {e - s} bytes of float data")
            target.append((s, e))
        elif number in (_DOUBLE_DATA, _DOUBLE_DIFF) and wire in (1, 2):
            target = rec.double_data if number == _DOUBLE_DATA else rec.double_diff
            if (e - s) % 8:
                raise WeightsError(f"{path}: corrupt {where}: {e - s} bytes of double data")
            target.append((s, e))
        elif number == _RAW_DATA and wire == 2:
            rec.raw_data.append((s, e))
        elif number == _RAW_DATA_TYPE and wire == 0:
            rec.raw_data_type = _varint(buf, s, e, path)[0]
    if legacy:
        rec.legacy = [legacy.get(k, 0) for k in (_NUM, _CHANNELS, _HEIGHT, _WIDTH)]
    check_blob_shape(rec.dims, f"{path}: {where}", WeightsError)
    return rec


@dataclass
class SourceLayer:
    """One layer of a weights file: its definition (without blobs) and its blob records."""
    param: object
    blobs: list

    @property
    def name(self):
        return self.param.name


def _blob_records_from_messages(blobs, path, layer_name):
    records = []
    for i, blob in enumerate(blobs):
        raw = blob.SerializeToString()
        records.append(_scan_blob(raw, 0, len(raw), path, f"layer {layer_name!r} blob {i}"))
    return records


def index_caffemodel(buf, path="<bytes>"):
    """(NetParameter without layers, [SourceLayer]) of a binary NetParameter in `buf`.

    V0/V1 nets are upgraded to V2 (as Caffe's ReadNetParamsFromBinaryFileOrDie does).
    """
    from caffe_layers.formats.upgrade import upgrade_net

    size = len(buf)
    if size == 0:
        raise WeightsError(f"{path}: empty file, expected a binary .caffemodel (NetParameter)")
    header, layers = [], []
    for number, wire, s, e, first in _fields(buf, 0, size, path, "NetParameter"):
        if number != _NET_LAYER or wire != 2:
            header.append(bytes(buf[first:e]))
            continue
        rest, records = [], []
        where = f"layer {len(layers)}"
        for n, w, bs, be, bfirst in _fields(buf, s, e, path, where):
            if n == _LAYER_BLOBS and w == 2:
                records.append(_scan_blob(buf, bs, be, path, f"{where} blob {len(records)}"))
            else:
                rest.append(bytes(buf[bfirst:be]))
        try:
            lp = pb.LayerParameter.FromString(b"".join(rest))
        except _DECODE_ERRORS as err:
            raise WeightsError(f"{path}: corrupt definition of {where}: {err}") from err
        layers.append(SourceLayer(lp, records))
    try:
        net = pb.NetParameter.FromString(b"".join(header))
    except _DECODE_ERRORS as err:
        raise WeightsError(f"{path}: not a binary Caffe NetParameter, or corrupt: {err}"
                           f"{_text_hint(buf)}") from err
    if len(net.layers):
        if layers:  # BVLC refuses; segaware's fork logs and drops the `layer` entries instead
            raise WeightsError(f"{path}: the file has both V2 'layer' and V1 'layers' entries")
        try:
            upgraded = upgrade_net(net, path)
        except ValueError as err:
            raise WeightsError(f"{path}: cannot upgrade its V0/V1 layers: {err}") from err
        for lp in upgraded.layer:
            records = _blob_records_from_messages(lp.blobs, path, lp.name)
            lp.ClearField("blobs")
            layers.append(SourceLayer(lp, records))
        net = upgraded
    if not layers:
        raise WeightsError(f"{path}: no layers found: not a Caffe .caffemodel{_text_hint(buf)}")
    del net.layer[:]
    return net, layers


class _Source:
    """An opened weights file: mmap for files, the bytes themselves otherwise."""

    def __init__(self, source):
        self.file = self.map = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.buf, self.path = source, "<bytes>"
            return
        self.path = check_readable_file(source, "weights file")
        try:
            self.file = open(self.path, "rb")
        except OSError as err:
            raise WeightsError(f"{self.path}: cannot open the weights file: {err.strerror}") from err
        if os.fstat(self.file.fileno()).st_size == 0:
            self.buf = b""
        else:
            self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
            self.buf = self.map

    def is_hdf5(self):
        return bytes(self.buf[:8]) == HDF5_SIGNATURE

    def read_segments(self, out, segments):
        """Fill flat array `out` from byte segments, with plain reads (no mmap pages kept)."""
        if self.file is None:
            return BlobRecord(self.buf).read_into(out, segments)
        raw = memoryview(out.view(np.uint8).reshape(-1))
        pos = 0
        for s, e in segments:
            self.file.seek(s)
            got = self.file.readinto(raw[pos:pos + e - s])
            if got != e - s:
                raise WeightsError(f"{self.path}: truncated while reading bytes {s}..{e}")
            pos += e - s

    def close(self):
        if self.map is not None:
            self.map.close()
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fill(src, rec, out, segments):
    """Read segments of a record: from the file when it indexes the file itself, otherwise from
    the record's own bytes (blobs of upgraded V0/V1 layers)."""
    if rec.source is src.buf:
        src.read_segments(out, segments)
    else:
        rec.read_into(out, segments)


def _read_record(src, rec, diff=False):
    segments, dtype, count = rec.values(diff)
    out = np.empty(count, dtype)
    _fill(src, rec, out, segments)
    return out


# ---- reading without a net ---------------------------------------------------------------------
def read_caffemodel(path, with_definition=False):
    """{layer name: [numpy arrays]} of a .caffemodel or .caffemodel.h5, without building a net.

    Arrays keep the stored dtype (float32, or float64 for double_data) and shape. With
    `with_definition`, returns (that dict, NetParameter with the layer definitions, blobs left out).
    """
    with _Source(path) as src:
        if src.is_hdf5():
            src.close()
            weights = _read_hdf5(src.path)
            net = pb.NetParameter()
            for name in weights:
                net.layer.add(name=name)
        else:
            net, layers = index_caffemodel(src.buf, src.path)
            weights = OrderedDict()
            for sl in layers:
                arrays = []
                for i, rec in enumerate(sl.blobs):
                    count = _count(rec.dims)
                    _check_count(rec, count, src.path, sl.name, i)
                    arrays.append(_read_record(src, rec).reshape(rec.dims))
                weights[sl.name] = arrays
                net.layer.add().CopyFrom(sl.param)
    return (weights, net) if with_definition else weights


# what h5py raises on corrupt files, dangling links and objects of the wrong kind
_HDF5_ERRORS = (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError, MemoryError)


@contextlib.contextmanager
def reading_hdf5(path, error, what):
    """An HDF5 file open for reading; h5py's failures, at the open or while the body reads corrupt
    objects, become `error` naming the file."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise error(f"{path}: cannot read {what}: {err}") from err
    with f:
        try:
            yield f
        except CaffeLayersError:
            raise
        except _HDF5_ERRORS as err:
            raise error(f"{path}: cannot read {what} (corrupt file?): {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def _hdf5_data(path):
    """The /data group of Caffe HDF5 weights, the file open for reading."""
    import h5py

    with reading_hdf5(path, WeightsError, "HDF5 weights") as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise WeightsError(f"{path}: an HDF5 file without the /data group Caffe's weights have")
        yield data


def _hdf5_layer_blobs(path, name, group):
    """{blob index: dataset} of /data/<name>, each checked (a group of datasets named 0, 1, ...,
    numeric, of a valid blob shape) before anything is read."""
    import h5py

    where = f"{path}: /data/{name}"
    if not isinstance(group, h5py.Group):
        raise WeightsError(f"{where} is not a group (expected a group of blobs 0, 1, ...)")
    blobs = {}
    for key in group.keys():
        if not key.isdigit():
            raise WeightsError(f"{where}/{key}: blob names must be 0, 1, 2...")
        dataset = group.get(key)
        if not isinstance(dataset, h5py.Dataset):
            kind = "a dangling link" if dataset is None else "not a dataset"
            raise WeightsError(f"{where}/{key} is {kind} (expected a blob's dataset)")
        if dataset.dtype.kind not in "fiu":
            raise WeightsError(f"{where}/{key} has unsupported dtype {dataset.dtype}")
        check_blob_shape(dataset.shape, f"{where}/{key}", WeightsError)
        blobs[int(key)] = dataset
    return dict(sorted(blobs.items()))


def _read_dataset(path, name, i, dataset):
    """A dataset's values in native byte order (Caffe reads big-endian files too)."""
    try:
        array = np.asarray(dataset[()])
    except MemoryError as err:
        raise WeightsError(f"{path}: /data/{name}/{i}: shape {list(dataset.shape)} needs "
                           f"{dataset.size * dataset.dtype.itemsize} bytes, more than can be "
                           f"allocated") from err
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _read_hdf5(path):
    weights = OrderedDict()
    with _hdf5_data(path) as data:
        for name, group in data.items():  # h5py iterates in name order, as Caffe does
            if isinstance(name, bytes):  # h5py's name for one that is not UTF-8; a net's names are
                raise WeightsError(f"{path}: /data/{name!r}: a layer name that is not UTF-8")
            blobs = _hdf5_layer_blobs(path, name, group)
            if list(blobs) != list(range(len(blobs))):
                raise WeightsError(f"{path}: /data/{name}: blobs {list(blobs)}, expected 0..{len(blobs) - 1}")
            weights[name] = [_read_dataset(path, name, i, d) for i, d in blobs.items()]
    return weights


def _count(dims):
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _check_count(rec, count, path, layer, i):
    _, _, stored = rec.values()
    if stored != count:
        raise WeightsError(f"{path}: layer {layer!r} blob {i}: shape {list(rec.dims)} needs {count} "
                           f"values, the file holds {stored} (corrupt or truncated blob)")
    _, _, stored_diff = rec.values(diff=True)
    if stored_diff not in (0, count):
        raise WeightsError(f"{path}: layer {layer!r} blob {i}: {stored_diff} diff values for "
                           f"{count} data values")


# ---- loading into a net ------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What load_weights did: layers copied, file layers with weights the net lacks (`ignored`),
    file layers without weights the net lacks (`ignored_empty`, e.g. Caffe's Split layers) and
    learnable net layers the file lacks (`missing`)."""
    path: str
    copied: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    ignored_empty: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    loaded: set = field(default_factory=set)  # ids of the parameter tensors written

    @property
    def complete(self):
        return not self.ignored and not self.missing


def _shape_equals(param_shape, rec):
    """Caffe's Blob::ShapeEquals: legacy num/channels/height/width are compared with the blob's
    shape padded with leading 1s to 4 axes, so a (1, 1, M, N) InnerProduct weight fits (M, N)."""
    if rec.legacy is not None:
        if len(param_shape) > 4:
            return False
        return tuple(rec.legacy) == (1,) * (4 - len(param_shape)) + tuple(param_shape)
    return tuple(rec.shape or ()) == tuple(param_shape)


def _net_layers(net):
    """{name: (layer module, [(blob, owns it)])}, first layer of each name (Caffe's lookup)."""
    seen, out = set(), OrderedDict()
    for layer in net.layer_modules:
        blobs = []
        for p in layer.blobs:
            blobs.append((p, id(p) not in seen))
            seen.add(id(p))
        out.setdefault(layer.name, (layer, blobs))
    return out


def load_weights(net, path, strict=False, progress=False):
    """Copy weights from a .caffemodel / .caffemodel.h5 into `net`, matched by layer name.

    As Caffe's CopyTrainedLayersFrom: file layers the net lacks are ignored, net layers the file
    lacks keep their values; a blob count or shape mismatch is an error. With `strict`, ignored
    layers with weights and learnable layers missing from the file are errors too. Nothing is
    copied unless the whole file checks out. Returns a LoadReport.
    """
    targets = _net_layers(net)
    with _Source(path) as src:
        report = LoadReport(src.path)
        if src.is_hdf5():
            src.close()
            plan = _plan_hdf5(targets, src.path, report)
        else:
            _, layers = index_caffemodel(src.buf, src.path)
            plan = _plan_binary(targets, layers, src, report)
        found = {name for name, *_ in plan}
        report.missing = [n for n, (_, blobs) in targets.items()
                          if any(own for _, own in blobs) and n not in found]
        for name in report.ignored + report.ignored_empty:
            log.info("%s: ignoring source layer %s (not in net %r)", src.path, name, net.name)
        if report.missing:  # one line: Caffe's loading is lenient, and a truncated file looks like this
            log.warning("%s: %d learnable layer(s) of net %r not in the file keep their values: %s "
                        "(a file cut short loads like this; strict=True, Net(strict_weights=True) or "
                        "convert --strict refuse it)", src.path, len(report.missing), net.name,
                        ", ".join(report.missing))
        if strict and not report.complete:
            raise WeightsError(f"{src.path}: strict load into net {net.name!r}: layers in the file "
                               f"but not in the net: {report.ignored}; learnable layers of the net "
                               f"not in the file: {report.missing}")
        total = sum(p.numel() * p.element_size() for _, copies in plan for p, _ in copies)
        with torch.no_grad(), _progress(progress, total, f"loading {src.path}") as bar:
            for name, copies in plan:
                for param, fetch in copies:
                    fetch(param)
                    report.loaded.add(id(param))
                    bar.update(param.numel() * param.element_size())
                if copies and name not in report.copied:
                    report.copied.append(name)
    return report


def _mismatch(path, layer, i, expected, found):
    return WeightsError(
        f"{path}: cannot copy param {i} of layer {layer!r}: shape mismatch, the net expects "
        f"{list(expected)}, the file has {list(found)}. To learn this layer from scratch rather "
        f"than copy it, rename the layer.")


def _plan_binary(targets, layers, src, report):
    path, plan = src.path, []
    for sl in layers:
        if sl.name not in targets:
            (report.ignored if sl.blobs else report.ignored_empty).append(sl.name)
            continue
        _, blobs = targets[sl.name]
        if len(blobs) != len(sl.blobs):
            raise WeightsError(f"{path}: incompatible number of blobs for layer {sl.name!r}: the net "
                               f"has {len(blobs)}, the file has {len(sl.blobs)}")
        copies = []
        for i, ((param, _), rec) in enumerate(zip(blobs, sl.blobs)):
            shape = tuple(param.shape)
            if not _shape_equals(shape, rec):
                raise _mismatch(path, sl.name, i, shape, rec.dims)
            _check_count(rec, param.numel(), path, sl.name, i)
            copies.append((param, lambda p, rec=rec: _copy_into(p, src, rec)))
        plan.append((sl.name, copies))
    return plan


def _copy_into(param, src, rec):
    """Read a record into a parameter; straight into its memory when it is a CPU tensor of the
    stored dtype. Values are rounded to the parameter's dtype, as Blob::FromProto's casts do."""
    segments, dtype, _ = rec.values()
    view = param.detach()
    if view.device.type == "cpu" and view.is_contiguous() and view.numpy().dtype == dtype:
        _fill(src, rec, view.numpy().reshape(-1), segments)
        torch.autograd.graph.increment_version(view)  # written behind torch's back: kept folded weights must see it
    else:
        view.copy_(torch.from_numpy(_read_record(src, rec)).reshape(view.shape))
    _, _, d_count = rec.values(diff=True)
    if d_count:  # Blob::FromProto loads stored diffs too
        diff = _read_record(src, rec, diff=True)
        param.grad = torch.from_numpy(diff).reshape(param.shape).to(param.dtype).to(param.device)


def _plan_hdf5(targets, path, report):
    """Every blob is read and converted before anything is copied: a load is all or nothing."""
    plan = []
    with _hdf5_data(path) as data:
        for name, group in data.items():
            blobs = _hdf5_layer_blobs(path, name, group)
            if name not in targets:
                (report.ignored if blobs else report.ignored_empty).append(name)
                continue
            _, params = targets[name]
            if len(blobs) > len(params) or any(i >= len(params) for i in blobs):
                raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}: the "
                                   f"net has {len(params)}, the file has {len(blobs)}")
            copies = []
            for i, (param, owns) in enumerate(params):
                if i not in blobs:
                    if not owns:  # a shared blob: its owner layer carries the values
                        continue
                    raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}: "
                                       f"blob {i} is missing")
                # the original fork reshapes the blob to the dataset (hdf5_load_nd_dataset with
                # reshape); BVLC checks the shape, and so do we, as a mismatch is a user error
                if tuple(blobs[i].shape) != tuple(param.shape):
                    raise _mismatch(path, name, i, param.shape, blobs[i].shape)
                value = torch.from_numpy(np.ascontiguousarray(_read_dataset(path, name, i, blobs[i])))
                copies.append((param, _tensor_fetch(value.to(param.dtype))))
            plan.append((name, copies))
    return plan


def _tensor_fetch(value):
    def fetch(param):
        param.detach().copy_(value)
    return fetch


# ---- writing -----------------------------------------------------------------------------------
def _encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number, wire=2):
    return _encode_varint(number << 3 | wire)


def _blob_chunks(array):
    """The BlobProto of one array as Caffe's Blob::ToProto writes it (field order included):
    float32 -> data then shape; float64 -> shape then double_data."""
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    shape = pb.BlobShape(dim=list(array.shape)).SerializeToString()
    shape_field = _key(_SHAPE) + _encode_varint(len(shape)) + shape
    payload = memoryview(array.reshape(-1)).cast("B") if array.size else b""
    number = _DATA if array.dtype == np.float32 else _DOUBLE_DATA
    data_field = [_key(number) + _encode_varint(array.nbytes), payload] if array.size else []
    chunks = data_field + [shape_field] if number == _DATA else [shape_field] + data_field
    body = sum(len(c) for c in chunks)
    return [_key(_LAYER_BLOBS) + _encode_varint(body)] + chunks


def _layer_chunks(lp, arrays):
    """LayerParameter `lp` with `arrays` as its blobs, fields in number order as Caffe writes."""
    head, tail = pb.LayerParameter(), pb.LayerParameter()
    head.CopyFrom(lp)
    tail.CopyFrom(lp)
    for fd, _ in lp.ListFields():
        (tail if fd.number <= _LAYER_BLOBS else head).ClearField(fd.name)
    head.ClearField("blobs")
    chunks = [head.SerializeToString()]
    for array in arrays:
        chunks += _blob_chunks(array)
    chunks.append(tail.SerializeToString())
    body = sum(len(c) for c in chunks)
    return [_key(_NET_LAYER) + _encode_varint(body)] + chunks


def _write_atomic(path, write):
    """Write through a temporary file so a failure never leaves a partial weights file."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_caffemodel(path, layers, name="", progress=False):
    """Write a binary .caffemodel: `layers` is a list of (LayerParameter, [arrays]) or a
    {layer name: [arrays]} dict (layers then carry only their names)."""
    if isinstance(layers, dict):
        layers = [(pb.LayerParameter(name=n), arrays) for n, arrays in layers.items()]
    total = sum(np.asarray(a).nbytes for _, arrays in layers for a in arrays)

    def write(tmp):
        with open(tmp, "wb") as f, _progress(progress, total, f"writing {path}") as bar:
            if name:
                f.write(pb.NetParameter(name=name).SerializeToString())
            for lp, arrays in layers:
                for chunk in _layer_chunks(lp, [np.asarray(a) for a in arrays]):
                    f.write(chunk)
                bar.update(sum(np.asarray(a).nbytes for a in arrays))
    _write_atomic(path, write)


def write_hdf5(path, layers):
    """Write Caffe's HDF5 weights layout: /data/<layer>/<i>, every layer with a group."""
    import h5py

    if isinstance(layers, dict):
        layers = [(pb.LayerParameter(name=n), arrays) for n, arrays in layers.items()]

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            for lp, arrays in layers:
                group = data.require_group(lp.name)
                for i, a in arrays.items() if isinstance(arrays, dict) else enumerate(arrays):
                    group.create_dataset(str(i), data=np.asarray(a))
    _write_atomic(path, write)


def net_layers_for_saving(net, hdf5=False):
    """[(LayerParameter, arrays)] of a net, as Net::ToProto (every layer, all its blobs) or, for
    HDF5, Net::ToHDF5 (only blobs the layer owns: shared ones are written by their owner)."""
    out, seen = [], set()
    for layer in net.layer_modules:
        lp = pb.LayerParameter()
        lp.CopyFrom(layer.param)
        lp.ClearField("blobs")
        if getattr(layer, "is_loss", False) and not len(lp.loss_weight):
            lp.loss_weight.append(1.0)  # LossLayer::LayerSetUp writes its default into the param
        arrays = {} if hdf5 else []
        for i, p in enumerate(layer.blobs):
            value = p.detach().cpu().numpy()
            if hdf5:
                if id(p) not in seen:
                    arrays[i] = value
            else:
                arrays.append(value)
            seen.add(id(p))
        out.append((lp, arrays))
    return out


def is_hdf5_path(path):
    return os.fspath(path).endswith((".h5", ".hdf5"))


def save_weights(net, path, progress=False):
    """Write a net's weights as .caffemodel (V2, with the layer definitions, as pycaffe's
    net.save) or, for a path ending in .h5, as Caffe's HDF5 weights (net.save_hdf5)."""
    if is_hdf5_path(path):
        write_hdf5(path, net_layers_for_saving(net, hdf5=True))
    else:
        write_caffemodel(path, net_layers_for_saving(net), net.name, progress)


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _progress(enabled, total, desc):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
