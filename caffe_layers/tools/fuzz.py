"""Fuzzing the readers: seeded, format-aware mutations of each reader's input, each input run in a
forked child with a memory cap and a timeout, and classified as

  ok       the reader accepted it
  clean    one of the project's errors (caffe_layers.errors), or a ValueError/OSError family error
           raised by a `raise` in the project's own code, with a one-line message (what the engine
           wraps is judged by the wrapped exception)
  unclean  any other exception: raised inside Python, numpy, torch, h5py, protobuf or Pillow
           (or by a non-`raise` line of ours, e.g. an IndexError), or a message of several lines
  oom      the memory cap was reached while allocating (reported apart: a resource limit)
  crash    the child died of a signal or without a report
  hang     the child used more than the timeout in CPU time, or ten times it in wall time (it is
           killed): CPU time, so that a busy machine does not turn a slow input into a hang

One worker process imports everything once and forks a child per input (a fresh interpreter per
input would cost ~1.5 s of imports). Run: python -m caffe_layers.tools.fuzz --per-reader 10000
"""
import argparse
import faulthandler
import json
import linecache
import os
import random
import re
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from pathlib import Path

OUTCOMES = ("ok", "clean", "unclean", "oom", "crash", "hang")
PROJECT = str(Path(__file__).resolve().parents[1])
ENGINE = str(Path(PROJECT) / "engine")
_CLEAN_TYPES = (ValueError, OSError, NotImplementedError)
_INTERESTING_INTS = ["0", "-1", "1", "-2147483648", "2147483647", "2147483648", "4294967296",
                     "9223372036854775807", "9223372036854775808", "-9223372036854775809", "100000"]
_INTERESTING_FLOATS = ["1e309", "-1e309", "nan", "inf", "-inf", "1e-45", "-0.0", "3.5", "-0.5", "1e38"]
_INTERESTING_VARINTS = [0, 1, 127, 128, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


# ---- classification (in the child) --------------------------------------------------------------
def _is_allocation_failure(err):
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "std::bad_alloc" in text))


def classify(err):
    """(outcome, where, message) of an exception a reader raised. The engine's wrapper (a net adds
    the layer and its bottoms to whatever a layer's setup raised) is transparent: the wrapped
    exception is judged."""
    from caffe_layers.errors import CaffeLayersError

    frames = traceback.extract_tb(err.__traceback__)
    if err.__cause__ is not None and frames and frames[-1].filename.startswith(ENGINE):
        outcome, where, message = classify(err.__cause__)
        return outcome, where, f"{type(err).__name__}: {err}" if outcome == "clean" else message
    last = frames[-1] if frames else None
    where = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
    message = f"{type(err).__name__}: {err}"
    if _is_allocation_failure(err):
        return "oom", where, message
    one_line = "\n" not in str(err).strip()
    if isinstance(err, CaffeLayersError):
        return ("clean" if one_line else "unclean"), where, message
    ours = last is not None and last.filename.startswith(PROJECT)
    deliberate = ours and linecache.getline(last.filename, last.lineno).strip().startswith("raise")
    if isinstance(err, _CLEAN_TYPES) and deliberate and one_line:
        return "clean", where, message
    return "unclean", where, message


def _child(run, path, memory_mb, report_fd):
    faulthandler.disable()  # a crash is measured, not reported on the parent's stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        run(path)
        report = ("ok", "", "")
    except BaseException as err:  # noqa: B902 - every exception is what is measured here
        report = classify(err)
    os.write(report_fd, json.dumps(report).encode()[:60000])
    os._exit(0)


def _cpu_seconds(pid):
    """User and system CPU time of a live process (0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_isolated(run, path, timeout=10.0, memory_mb=1024):
    """Run `run(path)` in a forked child; returns (outcome, where, message)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(run, path, memory_mb, write_fd)
        finally:
            os._exit(3)
    os.close(write_fd)
    start = time.monotonic()
    chunks, deadline, hung = [], start + timeout, False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            left = timeout - _cpu_seconds(pid)
            if left > 0 and time.monotonic() - start < 10 * timeout:  # it waited for a CPU
                deadline = time.monotonic() + left
                continue
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if hung:
        return "hang", "", f"killed after {timeout:g} s of CPU time or {10 * timeout:g} s"
    if os.WIFSIGNALED(status):
        return "crash", "", f"signal {os.WTERMSIG(status)}"
    try:
        return tuple(json.loads(b"".join(chunks)))
    except ValueError:
        return "crash", "", f"no report (exit status {os.WEXITSTATUS(status)})"


# ---- mutators ---------------------------------------------------------------------------------
def mutate_bytes(rng, data, others=()):
    """One to four generic byte-level mutations."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(data)
        kind = rng.randrange(8)
        pos = rng.randrange(n + 1)
        if kind == 0 and n:
            data[min(pos, n - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and n:
            data[min(pos, n - 1)] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            del data[pos:pos + rng.randint(1, 16)]
        elif kind == 4:
            piece = data[pos:pos + rng.randint(1, 32)]
            data[pos:pos] = piece
        elif kind == 5:
            del data[pos:]
        elif kind == 6 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            data[pos:] = other[cut:]
        elif kind == 7 and n >= 4:
            p = min(pos, n - 4)
            data[p:p + 4] = struct.pack("<I", rng.choice(_INTERESTING_VARINTS) & 0xFFFFFFFF)
    return bytes(data)


_NUMBER = re.compile(rb"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?")
_STRING = re.compile(rb'"[^"\n]*"')


def mutate_text(rng, data, vocabulary=(), others=()):
    """Token-aware mutations of prototxt or list-file text."""
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(10)
        i = rng.randrange(len(lines))
        line = lines[i]
        if kind in (0, 1):
            numbers = list(_NUMBER.finditer(line))
            if numbers:
                m = rng.choice(numbers)
                value = rng.choice(_INTERESTING_INTS + (_INTERESTING_FLOATS if kind else [])).encode()
                lines[i] = line[:m.start()] + value + line[m.end():]
        elif kind == 2:
            strings = list(_STRING.finditer(line))
            if strings and vocabulary:
                m = rng.choice(strings)
                lines[i] = line[:m.start()] + b'"' + rng.choice(vocabulary).encode() + b'"' + line[m.end():]
        elif kind == 3:
            del lines[i]
        elif kind == 4:
            lines.insert(i, line)
        elif kind == 5:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == 6:
            pos = rng.randrange(len(line) + 1)
            lines[i] = line[:pos] + rng.choice([b"\xff", b"\xc3", b"#", b"${X}", b"{", b"}", b":", b" ",
                                                b"\t", b"\x00", b'"', b"\\"]) + line[pos:]
        elif kind == 7 and others:
            lines.insert(i, rng.choice(rng.choice(others).split(b"\n")))
        elif kind == 8 and vocabulary:
            lines.insert(i, f"{rng.choice(vocabulary)}: {rng.choice(_INTERESTING_INTS)}".encode())
        else:
            return mutate_bytes(rng, b"\n".join(lines), others)
    return b"\n".join(lines)


# ---- targets ----------------------------------------------------------------------------------
SEED_NETS = [
    """name: "a"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 weight_filler { type: "gaussian" std: 0.1 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "slice1" type: "Slice" bottom: "pool1" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 2 } }
layer { name: "cat1" type: "Concat" bottom: "s2" bottom: "s1" top: "cat1" concat_param { axis: 1 } }
layer { name: "sum1" type: "Eltwise" bottom: "cat1" bottom: "pool1" top: "sum1" eltwise_param { operation: SUM coeff: 1 coeff: -1 } }
layer { name: "lrn1" type: "LRN" bottom: "sum1" top: "lrn1" lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "ip1" type: "InnerProduct" bottom: "lrn1" top: "ip1" inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" softmax_param { axis: 1 } }
""",
    """name: "b"
layer { name: "dummy" type: "DummyData" top: "x" top: "label"
  dummy_data_param { shape { dim: 2 dim: 4 dim: 6 dim: 6 } shape { dim: 2 dim: 1 dim: 6 dim: 6 }
                     data_filler { type: "uniform" min: -1 max: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "interp" type: "Interp" bottom: "x" top: "big" interp_param { zoom_factor: 2 } }
layer { name: "crop" type: "Crop" bottom: "big" bottom: "x" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "im2col" type: "Im2col" bottom: "crop" top: "cols" convolution_param { kernel_size: 3 pad: 1 } }
layer { name: "resh" type: "Reshape" bottom: "cols" top: "resh" reshape_param { shape { dim: 0 dim: -1 dim: 6 } } }
layer { name: "flat" type: "Flatten" bottom: "resh" top: "flat" flatten_param { axis: 1 } }
layer { name: "power" type: "Power" bottom: "x" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "tile" type: "Tile" bottom: "label" top: "tiled" tile_param { axis: 1 tiles: 4 } }
layer { name: "prod" type: "Eltwise" bottom: "pow" bottom: "tiled" top: "prod" eltwise_param { operation: PROD } }
layer { name: "drop" type: "Dropout" bottom: "prod" top: "prod" dropout_param { dropout_ratio: 0.5 } }
layer { name: "deconv" type: "Deconvolution" bottom: "prod" top: "up"
  convolution_param { num_output: 2 kernel_size: 3 stride: 1 pad: 1 group: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "up" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 normalization: VALID } }
""",
]
_NET_WORDS = ["name", "type", "bottom", "top", "num_output", "kernel_size", "pad", "stride", "axis", "dim",
              "group", "dilation", "tiles", "slice_point", "coeff", "local_size", "zoom_factor", "offset",
              "ignore_label", "include", "phase", "lr_mult", "loss_weight", "propagate_down", "input_dim"]


def _layer_types():
    from caffe_layers.layers import registry

    names = getattr(registry, "names", None)
    return sorted(names()) if callable(names) else []


class Target:
    """One reader: seed inputs, a mutator and the call that reads a file (run in the child)."""

    def __init__(self, name, suffix, seeds, mutate, run):
        self.name, self.suffix, self.seeds, self.mutate, self.run = name, suffix, seeds, mutate, run


def prototxt_target(work):
    import torch

    from caffe_layers import Net

    vocabulary = _NET_WORDS + ["data", "conv1", "x", "label", "Convolution", "Input", "InnerProduct",
                               "Pooling", "Eltwise", "Concat", "Slice", "Reshape", "DummyData", ""]
    seeds = [s.encode() for s in SEED_NETS]

    def run(path):
        net = Net(path)
        with torch.no_grad():
            net.forward()

    return Target("prototxt", ".prototxt", seeds,
                  lambda rng, d: mutate_text(rng, d, vocabulary, seeds), run)


def _weights_net():
    from caffe_layers import Net

    return Net(SEED_NETS[0])


def _mutate_netparameter(rng, data):
    """Structural mutations of a binary NetParameter: blob shapes, counts, names, layer lists."""
    from caffe_layers.formats.proto import pb

    net = pb.NetParameter.FromString(data)
    layers = [l for l in net.layer if len(l.blobs)]
    layer = rng.choice(layers)
    blob = rng.choice(layer.blobs)
    kind = rng.randrange(7)
    if kind == 0:
        dims = list(blob.shape.dim)
        if dims:
            dims[rng.randrange(len(dims))] = rng.choice([-1, 0, 2**31, 2**40, -2**62, 2**62])
        blob.shape.ClearField("dim")
        blob.shape.dim.extend(dims)
    elif kind == 1:
        del blob.data[rng.randrange(len(blob.data) + 1):]
    elif kind == 2:
        blob.num, blob.channels = rng.choice([(1, -1), (2**30, 4), (0, 1)])
    elif kind == 3:
        blob.double_data.extend(blob.data)
        if rng.random() < 0.5:
            blob.ClearField("data")
    elif kind == 4:
        layer.name = rng.choice(["", "conv2", "QQQQ", layer.name * 2])
    elif kind == 5:
        del net.layer[rng.randrange(len(net.layer)):]
    else:
        net.layer.add().CopyFrom(rng.choice(net.layer))
    out = net.SerializeToString()
    if b"QQQQ" in out and rng.random() < 0.7:
        out = out.replace(b"QQQQ", b"Q\xff\xfeQ")  # invalid UTF-8 in a string field
    return out


def caffemodel_target(work):
    from caffe_layers.formats.weights import load_weights, read_caffemodel

    net = _weights_net()
    seed = work / "seed.caffemodel"
    net.save(str(seed))
    seeds = [seed.read_bytes()]

    def mutate(rng, data):
        if rng.random() < 0.4:
            try:
                return _mutate_netparameter(rng, data)
            except Exception:  # the seed is always parseable; a mutated one may not be
                pass
        return mutate_bytes(rng, data, seeds)

    def run(path):
        read_caffemodel(path, with_definition=True)
        load_weights(net, path)

    return Target("caffemodel", ".caffemodel", seeds, mutate, run)


# HDF5 files are built from a spec, {name: array | dict | ("link", target) | ("huge", shape)}, so that
# mutations can change structure (a dataset where a group belongs, a dangling link, a dtype, a shape).
def _write_h5(path, spec):
    import h5py

    with h5py.File(path, "w") as f:
        def build(group, tree):
            for key, value in tree.items():
                if isinstance(value, dict):
                    build(group.create_group(key), value)
                elif isinstance(value, tuple) and value[0] == "link":
                    group[key] = h5py.SoftLink(value[1])
                elif isinstance(value, tuple) and value[0] == "huge":
                    group.create_dataset(key, shape=value[1], dtype="f4", chunks=True, compression="gzip")
                else:
                    group[key] = value
        build(f, spec)


def _mutate_spec(rng, spec):
    import copy

    import numpy as np

    spec = copy.deepcopy(spec)
    paths = []

    def walk(tree, prefix):
        for key, value in tree.items():
            paths.append((tree, key))
            if isinstance(value, dict):
                walk(value, prefix + "/" + key)
    walk(spec, "")
    for _ in range(rng.randint(1, 3)):
        tree, key = rng.choice(paths)
        if key not in tree:
            continue
        value = tree[key]
        kind = rng.randrange(9)
        if kind == 0:
            del tree[key]
        elif kind == 1:
            tree[key] = {"0": np.zeros(2, np.float32)} if not isinstance(value, dict) else np.zeros(3, np.float32)
        elif kind == 2:
            tree[rng.choice(["x", "-1", "01", "7", key + "_"])] = tree.pop(key)
        elif kind == 3:
            tree[key] = ("link", "/nowhere")
        elif kind == 4:
            tree[key] = ("huge", rng.choice([(2**16, 2**16), (2**31,), (0, 3), (2**20, 2**8)]))
        elif kind == 5 and isinstance(value, np.ndarray):
            with warnings.catch_warnings():  # casting complex or huge values: that is the point
                warnings.simplefilter("ignore")
                tree[key] = value.astype(rng.choice([">f4", "f8", "i4", "u1", "bool", "c8", "S4", "f2"]))
        elif kind == 6 and isinstance(value, np.ndarray):
            tree[key] = rng.choice([np.float32(1.5), np.zeros((0,) + value.shape[1:], value.dtype),
                                    value.reshape(-1), value[..., None], np.bytes_("x")])
        elif kind == 7:
            tree[key] = rng.choice([np.int32(-1), np.bytes_(b"\xff\xfe"), np.zeros(3, np.float32),
                                    np.array([1, 2], np.int64), np.float64(2.5)])
        else:
            tree[rng.choice(["extra", "9", "0"])] = np.ones(4, np.float32)
    return spec


def _h5_target(name, suffix, work, spec, run):
    seed = work / f"seed{suffix}"
    _write_h5(seed, spec)
    seeds = [seed.read_bytes()]
    scratch = work / f"mutant{suffix}"

    def mutate(rng, data):
        if rng.random() < 0.7:
            _write_h5(scratch, _mutate_spec(rng, spec))
            data = scratch.read_bytes()
            return data if rng.random() < 0.8 else mutate_bytes(rng, data)
        return mutate_bytes(rng, data, seeds)

    return Target(name, suffix, seeds, mutate, run)


def _spec_of_weights(net):
    return {"data": {l.name: {str(i): p.detach().numpy().copy() for i, p in enumerate(l.blobs)}
                     for l in net.layer_modules}}


def caffemodel_h5_target(work):
    from caffe_layers.formats.weights import load_weights, read_caffemodel

    net = _weights_net()

    def run(path):
        read_caffemodel(path)
        load_weights(net, path)

    return _h5_target("caffemodel.h5", ".caffemodel.h5", work, _spec_of_weights(net), run)


def _toy_solver(work, hdf5):
    import h5py
    import numpy as np
    from google.protobuf import text_format

    from caffe_layers.formats.proto import pb
    from caffe_layers.training.solver import Solver

    with h5py.File(work / "train.h5", "w") as f:
        f["data"] = np.random.RandomState(0).randn(4, 3).astype(np.float32)
        f["label"] = np.zeros((4, 2), np.float32)
    (work / "train.txt").write_text(str(work / "train.h5") + "\n")
    param = text_format.Parse(f'''
        base_lr: 0.1 lr_policy: "fixed" type: "Adam" snapshot_prefix: "{work / 'snap'}"
        snapshot_format: {"HDF5" if hdf5 else "BINARYPROTO"}
        net_param {{ name: "toy"
          layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
                  hdf5_data_param {{ source: "{work / 'train.txt'}" batch_size: 2 }} }}
          layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "y" inner_product_param {{ num_output: 2 }} }}
          layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "label" top: "loss" }} }}''',
        pb.SolverParameter())
    solver = Solver(param)
    solver.iter = 7
    return solver


def solverstate_target(work):
    from caffe_layers.formats.proto import pb

    solver = _toy_solver(work, hdf5=False)
    _, state = solver.snapshot()
    seeds = [Path(state).read_bytes()]

    def structural(rng, data):
        msg = pb.SolverState.FromString(data)
        kind = rng.randrange(5)
        blob = rng.choice(msg.history)
        if kind == 0:
            blob.shape.ClearField("dim")
            blob.shape.dim.extend(rng.choice([[-1, -2], [2**31, 1], [2**62, 2**62, 0], [3]]))
        elif kind == 1:
            del blob.data[rng.randrange(len(blob.data) + 1):]
        elif kind == 2:
            msg.learned_net = rng.choice(["", "QQQQ", "missing.caffemodel", "/", "a\x00b"])
        elif kind == 3:
            msg.iter, msg.current_step = rng.choice([(-5, 0), (2**31 - 1, -1), (0, 2**31 - 1)])
        else:
            del msg.history[rng.randrange(len(msg.history)):]
        return msg.SerializeToString().replace(b"QQQQ", b"Q\xff\xfeQ")

    def mutate(rng, data):
        if rng.random() < 0.4:
            try:
                return structural(rng, data)
            except Exception:
                pass
        return mutate_bytes(rng, data, seeds)

    return Target("solverstate", ".solverstate", seeds, mutate, solver.restore)


def solverstate_h5_target(work):
    import numpy as np

    solver = _toy_solver(work, hdf5=True)
    model, _ = solver.snapshot()
    spec = {"iter": np.int32(7), "current_step": np.int32(0), "learned_net": np.bytes_(model),
            "history": {str(i): h.numpy().copy() for i, h in enumerate(solver.history)}}
    return _h5_target("solverstate.h5", ".solverstate.h5", work, spec, solver.restore)


def _image_seeds():
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    seeds = []
    for fmt, size in (("PNG", (5, 4)), ("JPEG", (6, 5)), ("PNG", (5, 4)), ("BMP", (5, 4))):
        out = io.BytesIO()
        Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(out, fmt)
        seeds.append(out.getvalue())
    return seeds


def _mutate_png_size(rng, data):
    """A PNG whose header claims another size (a decompression bomb, or zero), CRC fixed."""
    at = data.find(b"IHDR")
    if at < 0:
        return data
    width, height = rng.choice([(0, 4), (2**31 - 1, 2**31 - 1), (100000, 100000), (5, 40000), (1, 1)])
    body = b"IHDR" + struct.pack(">II", width, height) + data[at + 12:at + 17]
    return data[:at] + body + struct.pack(">I", zlib.crc32(body)) + data[at + 21:]


def _image_layer(list_path, work, extra=""):
    from google.protobuf import text_format

    from caffe_layers.formats.proto import TRAIN, pb
    from caffe_layers.layers.image_data import ImageData

    def run():
        param = text_format.Parse(f'''name: "images" type: "ImageData" top: "data" top: "label"
            image_data_param {{ source: "{list_path}" batch_size: 2 root_folder: "{work}/" {extra} }}
            transform_param {{ crop_size: 3 mirror: true mean_value: 100 }}''', pb.LayerParameter())
        layer = ImageData(param, [], TRAIN)
        layer.load_batch()
        layer.load_batch()
    return run


def images_target(work):
    seeds = _image_seeds()
    list_path = work / "images.txt"

    def mutate(rng, data):
        if data.startswith(b"\x89PNG") and rng.random() < 0.2:
            return _mutate_png_size(rng, data)
        return mutate_bytes(rng, data, seeds)

    def run(path):
        list_path.write_text(f"{Path(path).name} 1\n{Path(path).name} 0\n")
        _image_layer(list_path, work)()

    return Target("images", ".img", seeds, mutate, run)


def list_target(work):
    seeds_images = _image_seeds()
    names = ["a.png", "b c.png", "d.jpg"]
    for name, data in zip(names, seeds_images):
        (work / name).write_bytes(data)
    seeds = [b"a.png 0\nb c.png 1\nd.jpg 2\n", b"a.png 3\nd.jpg 0\n"]
    vocabulary = names + ["missing.png", "", " ", "a.png 1 2"]

    def run(path):
        _image_layer(path, work, extra="shuffle: false new_height: 4 new_width: 4")()

    return Target("list", ".txt", seeds, lambda rng, d: mutate_text(rng, d, vocabulary, seeds), run)


TARGETS = {"prototxt": prototxt_target, "caffemodel": caffemodel_target,
           "caffemodel.h5": caffemodel_h5_target, "solverstate": solverstate_target,
           "solverstate.h5": solverstate_h5_target, "list": list_target, "images": images_target}


# ---- the campaign -----------------------------------------------------------------------------
def fuzz(names, per_reader, seed=0, timeout=10.0, memory_mb=1024, examples=3, progress=None, every=0,
         keep=None):
    """{target: {"counts": Counter of outcomes, "examples": {outcome: [(where, message)]}, "seconds": wall
    time}}; `progress(name, result)` is called as each reader is done, and every `every` inputs. Inputs that
    end neither ok nor clean are written to folder `keep` (when given) as <reader>-<index>-<outcome><suffix>."""
    import logging

    import torch

    torch.set_num_threads(1)  # forked children must not inherit a thread pool's locks
    if keep:
        os.makedirs(keep, exist_ok=True)
    logging.disable(logging.CRITICAL)
    results = {}
    with tempfile.TemporaryDirectory(prefix="caffe-layers-fuzz-") as tmp:
        for name in names:
            work = Path(tmp) / name.replace(".", "_")
            work.mkdir()
            target = TARGETS[name](work)
            rng = random.Random(f"{seed}:{name}")
            counts, found, start = Counter(), {}, time.monotonic()
            path = work / f"input{target.suffix}"
            for data in target.seeds:  # the seeds must load; this also warms lazy initialisation up
                path.write_bytes(data)  # once in the parent instead of in every child
                target.run(str(path))
            for i in range(per_reader):
                data = target.seeds[i % len(target.seeds)] if i < len(target.seeds) else \
                    target.mutate(rng, rng.choice(target.seeds))
                path.write_bytes(data)
                outcome, where, message = run_isolated(target.run, str(path), timeout, memory_mb)
                counts[outcome] += 1
                if outcome not in ("ok", "clean"):
                    if keep:
                        Path(keep, f"{name}-{i}-{outcome}{target.suffix}").write_bytes(data)
                    kept = found.setdefault(outcome, {})
                    if where not in kept and len(kept) < 50:
                        kept[where] = message[:300]
                if progress and every and (i + 1) % every == 0 and i + 1 < per_reader:
                    progress(name, {"counts": counts, "seconds": time.monotonic() - start, "done": i + 1})
            results[name] = {"counts": counts, "examples": {k: list(v.items())[:examples] if examples
                                                            else list(v.items()) for k, v in found.items()},
                             "seconds": time.monotonic() - start}
            if progress:
                progress(name, results[name])
    logging.disable(logging.NOTSET)
    return results


def table(results, seed=0):
    rows = [f"{'reader':<16}" + "".join(f"{o:>9}" for o in OUTCOMES) + f"{'total':>9}{'seed':>6}{'wall s':>8}"]
    for name, r in results.items():
        c = r["counts"]
        rows.append(f"{name:<16}" + "".join(f"{c[o]:>9}" for o in OUTCOMES) + f"{sum(c.values()):>9}"
                    f"{seed:>6}{r['seconds']:>8.0f}")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-reader", type=int, default=1000, help="inputs per reader (default 1000)")
    parser.add_argument("--reader", action="append", choices=sorted(TARGETS), help="only these readers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory cap per input")
    parser.add_argument("--show", type=int, default=5, help="examples shown per bad outcome")
    parser.add_argument("--every", type=int, default=0, help="print the counts every this many inputs")
    parser.add_argument("--keep", metavar="FOLDER", help="write the inputs that end neither ok nor clean here")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def progress(name, result):
        if "done" in result:
            print(f"{name}: {result['done']} done: {dict(result['counts'])} ({result['seconds']:.0f} s)", flush=True)
            return
        for outcome, items in result["examples"].items():
            for where, message in items:
                print(f"{name} {outcome} at {where}: {message}", flush=True)
        print(f"{name}: {dict(result['counts'])} ({time.monotonic() - start:.0f} s)", flush=True)

    results = fuzz(args.reader or list(TARGETS), args.per_reader, args.seed, args.timeout, args.memory_mb,
                   args.show, progress, args.every, args.keep)
    print(table(results, args.seed))
    print(f"{time.monotonic() - start:.0f} s")
    bad = sum(r["counts"][o] for r in results.values() for o in ("unclean", "crash", "hang"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
