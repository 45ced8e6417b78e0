"""Bad input to the readers (prototxt, .caffemodel(.h5), .solverstate(.h5)) is one of the project's
errors, one line naming the file; lr policies compute as C++ doubles; writes are atomic."""
import logging
import math
import os

import h5py
import numpy as np
import pytest
import torch

from caffe_layers import Net
from caffe_layers.errors import (CaffeLayersError, PrototxtError, SolverStateError, WeightsError,
                                 atomic_path)
from caffe_layers.formats import prototxt, weights
from caffe_layers.formats.proto import pb
from caffe_layers.formats.prototxt import read_net
from caffe_layers.formats.weights import load_weights, read_caffemodel, write_caffemodel, write_hdf5
from caffe_layers.training.solver import learning_rate
from test_solver import _param, toy_solver, write_data

NET = """name: "tiny"
layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 4 bias_term: false } }
layer { name: "ip2" type: "InnerProduct" bottom: "y" top: "z"
        inner_product_param { num_output: 2 bias_term: false } }
"""


def test_old_names_are_the_hierarchy():
    assert prototxt.PrototxtError is PrototxtError and weights.WeightsError is WeightsError
    for cls in (PrototxtError, WeightsError, SolverStateError):
        assert issubclass(cls, CaffeLayersError) and issubclass(cls, ValueError)


# ---- prototxt ----------------------------------------------------------------------------------
def test_non_utf8_byte_in_a_comment_is_accepted_elsewhere_named(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(b"# caf\xe9 model\n" + NET.encode())
    assert read_net(path).layer[1].name == "ip1"
    path.write_bytes(NET.encode().replace(b'"tiny"', b'"t\xffiny"'))
    with pytest.raises(PrototxtError, match=rf"^{path}:1:9: byte 0xff is not UTF-8"):
        read_net(path)


def test_a_path_with_a_colon_or_brace_is_a_path_when_the_file_exists(tmp_path):
    path = tmp_path / "a:b{c}.prototxt"
    path.write_text(NET)
    assert read_net(str(path)).name == "tiny"


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_net(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        Net(NET, weights=str(tmp_path))


def test_variables_in_comments_are_left_alone():
    text = NET.replace('name: "tiny"', 'name: "${NAME}" # a ${COMMENTED} variable')
    assert prototxt.substitute(text, {"NAME": "n"}).startswith('name: "n" # a ${COMMENTED} variable')
    assert read_net(text, {"NAME": "n"}).name == "n"
    hashed = NET.replace('name: "tiny"', 'name: "a#${NAME}"')  # a # inside a string is no comment
    assert read_net(hashed, {"NAME": "n"}).name == "a#n"


# ---- .caffemodel -------------------------------------------------------------------------------
def caffemodel_with_blob(path, blob):
    net = pb.NetParameter(name="x")
    layer = net.layer.add(name="ip1", type="InnerProduct")
    layer.blobs.add().CopyFrom(blob)
    path.write_bytes(net.SerializeToString())
    return path


@pytest.mark.parametrize("dims", [[-1, -4], [2**62, 2**62, 4, 0], [2**31, 1]])
def test_invalid_blob_dims_are_weights_errors(tmp_path, dims):
    blob = pb.BlobProto(data=[1.0, 2.0, 3.0, 4.0])
    blob.shape.dim.extend(dims)
    path = caffemodel_with_blob(tmp_path / "w.caffemodel", blob)
    with pytest.raises(WeightsError, match=rf"{path}: layer 0 blob 0: invalid blob shape"):
        read_caffemodel(path)


def test_v1_name_that_is_not_utf8(tmp_path):
    good = pb.NetParameter(name="x")
    good.layers.add(name="AAAA", type=pb.V1LayerParameter.RELU)
    raw = good.SerializeToString().replace(b"AAAA", b"A\xff\xfeA")
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(raw)
    with pytest.raises(WeightsError, match=str(path)):
        read_caffemodel(path)


def test_zero_dim_parameters_round_trip(tmp_path):
    path = tmp_path / "scalar.caffemodel"
    write_caffemodel(path, {"lam": [np.float32(0.25), np.zeros((2, 0), np.float32)]})
    arrays = read_caffemodel(path)["lam"]
    assert arrays[0].shape == () and arrays[0] == np.float32(0.25)
    assert arrays[1].shape == (2, 0)


def test_truncated_file_says_so_once(tmp_path, caplog):
    net = Net(NET)
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    data = path.read_bytes()
    first = pb.NetParameter()
    first.ParseFromString(data)
    keep = pb.NetParameter(name=first.name)
    keep.layer.extend(first.layer[:2])  # cut at a layer boundary: ip2 is lost
    path.write_bytes(keep.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="caffe_layers.formats.weights"):
        report = load_weights(Net(NET), str(path))
    assert report.missing == ["ip2"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "ip2" in lines[0] and "strict" in lines[0]
    with pytest.raises(WeightsError, match="strict"):
        load_weights(Net(NET), str(path), strict=True)


# ---- .caffemodel.h5 ----------------------------------------------------------------------------
def h5_weights(path, build):
    with h5py.File(path, "w") as f:
        build(f.create_group("data"))
    return path


@pytest.mark.parametrize("build,message", [
    (lambda d: d.create_dataset("ip1", data=np.zeros(3)), r"/data/ip1 is not a group"),
    (lambda d: d.create_group("ip1").create_dataset("w", data=np.zeros(3)), r"/data/ip1/w: blob names"),
    (lambda d: d.create_group("ip1").__setitem__("0", h5py.SoftLink("/nowhere")), r"/data/ip1/0 is a dangling link"),
    (lambda d: d.create_group("ip1").create_group("0"), r"/data/ip1/0 is not a dataset"),
    (lambda d: d.create_group("ip1").create_dataset("0", data=np.array([b"x"])), r"/data/ip1/0 has unsupported dtype"),
    (lambda d: d.create_group("ip1").create_dataset("0", shape=(2**20, 2**12), dtype="f4",
                                                    compression="gzip"), r"/data/ip1/0: invalid blob shape"),
])
def test_bad_hdf5_weights_are_weights_errors(tmp_path, build, message):
    path = h5_weights(tmp_path / "w.caffemodel.h5", build)
    with pytest.raises(WeightsError, match=rf"^{path}: {message}"):
        read_caffemodel(path)
    with pytest.raises(WeightsError, match=rf"^{path}: {message}"):
        load_weights(Net(NET), str(path))


def test_hdf5_layer_name_that_is_not_utf8(tmp_path):
    path = h5_weights(tmp_path / "w.caffemodel.h5",
                      lambda d: d.create_group(b"ip\xff").create_dataset("0", data=np.zeros(3, np.float32)))
    with pytest.raises(WeightsError, match=rf"^{path}: /data/b'ip\\xff': a layer name that is not UTF-8$"):
        read_caffemodel(path)
    report = load_weights(Net(NET), str(path))  # as Caffe: a name no layer of the net has
    assert report.ignored == [b"ip\xff"]


def test_big_endian_hdf5_weights_load(tmp_path):
    values = np.arange(12, dtype=">f4").reshape(4, 3)
    path = h5_weights(tmp_path / "w.caffemodel.h5", lambda d: d.create_group("ip1").create_dataset("0", data=values))
    net = Net(NET)
    load_weights(net, str(path))
    assert torch.equal(net.state_dict()["ip1.0"], torch.arange(12.0).reshape(4, 3))
    assert read_caffemodel(path)["ip1"][0].dtype == np.float32


def test_hdf5_load_is_all_or_nothing(tmp_path):
    """Every blob is read and converted before the first copy (a big-endian ip2 failed after ip1
    had been overwritten); a blob that cannot be used leaves the net as it was."""
    def build(dtype):
        def fill(d):
            d.create_group("ip1").create_dataset("0", data=np.ones((4, 3), np.float32))
            d.create_group("ip2").create_dataset("0", data=np.full((2, 4), 2, dtype))
        return fill
    net = Net(NET)
    load_weights(net, str(h5_weights(tmp_path / "be.caffemodel.h5", build(">f4"))))
    assert (net.state_dict()["ip1.0"] == 1).all() and (net.state_dict()["ip2.0"] == 2).all()
    net = Net(NET)
    before = net.state_dict()["ip1.0"].clone()
    with pytest.raises(WeightsError, match="ip2/0 has unsupported dtype"):
        load_weights(net, str(h5_weights(tmp_path / "c.caffemodel.h5", build("c8"))))
    assert torch.equal(net.state_dict()["ip1.0"], before)


# ---- .solverstate(.h5) -------------------------------------------------------------------------
@pytest.fixture
def solver(tmp_path):
    write_data(tmp_path)
    return toy_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"')


def test_missing_solverstate_is_not_found(solver, tmp_path):
    with pytest.raises(FileNotFoundError, match="solver state not found"):
        solver.restore(str(tmp_path / "missing.solverstate"))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        solver.restore(str(tmp_path))


def state_bytes(solver, edit):
    _, state = solver.snapshot()
    msg = pb.SolverState.FromString(open(state, "rb").read())
    edit(msg)
    return state, msg.SerializeToString()


def test_solverstate_negative_history_dims(solver):
    def edit(msg):
        del msg.history[0].shape.dim[:]
        msg.history[0].shape.dim.extend([-3, -2])
    state, raw = state_bytes(solver, edit)
    open(state, "wb").write(raw)
    with pytest.raises(SolverStateError, match=rf"^{state}: history blob 0: invalid blob shape \[-3, -2\]"):
        solver.restore(state)


def test_solverstate_learned_net_not_utf8(solver):
    state, raw = state_bytes(solver, lambda msg: setattr(msg, "learned_net", "QQQQ"))
    open(state, "wb").write(raw.replace(b"QQQQ", b"Q\xff\xfeQ"))
    with pytest.raises(SolverStateError, match=rf"^{state}: "):
        solver.restore(state)


def test_solverstate_cut_before_current_step(solver):
    state, raw = state_bytes(solver, lambda msg: setattr(msg, "current_step", 3))
    cut = raw[:raw.rindex(b"\x20\x03")]  # field 4 (current_step), varint 3: Caffe writes it last
    open(state, "wb").write(cut)
    with pytest.raises(SolverStateError, match=rf"^{state}: SolverState without current_step"):
        solver.restore(state)


def test_missing_learned_net(solver, tmp_path):
    state, raw = state_bytes(solver, lambda msg: setattr(msg, "learned_net", "gone.caffemodel"))
    open(state, "wb").write(raw)
    with pytest.raises(SolverStateError, match="learned_net 'gone.caffemodel' is not found"):
        solver.restore(state)


def hdf5_state(solver, tmp_path, edit):
    path = tmp_path / "s.solverstate.h5"
    with h5py.File(path, "w") as f:
        f["iter"], f["current_step"], f["learned_net"] = np.int32(3), np.int32(0), np.bytes_("")
        group = f.create_group("history")
        for i, h in enumerate(solver.history):
            group[str(i)] = h.numpy()
        edit(f)
    return str(path)


@pytest.mark.parametrize("edit,message", [
    (lambda f: f.__delitem__("iter"), r"/iter must be a scalar dataset"),
    (lambda f: f.__delitem__("current_step"), r"/current_step must be a scalar dataset"),
    (lambda f: f.__delitem__("history"), r"no /history group"),
    (lambda f: (f.__delitem__("iter"), f.__setitem__("iter", np.bytes_("3"))), r"/iter must be"),
    (lambda f: (f.__delitem__("learned_net"), f.__setitem__("learned_net", np.int32(1))), r"/learned_net must"),
    (lambda f: (f.__delitem__("history/0"), f["history"].create_dataset("0", shape=(2**16, 2**16), dtype="f4",
                                                                          compression="gzip")),
     r"history blob 0 has 4294967296 values, expected 6"),
    (lambda f: f["history"].create_dataset("x", data=np.zeros(1)), r"/history holds"),
])
def test_bad_hdf5_solverstate(solver, tmp_path, edit, message):
    path = hdf5_state(solver, tmp_path, edit)
    with pytest.raises(SolverStateError, match=rf"^{path}: {message}"):
        solver.restore(path)


def test_hdf5_solverstate_round_trips(solver, tmp_path):
    path = hdf5_state(solver, tmp_path, lambda f: None)
    solver.restore(path)
    assert solver.iter == 3


def test_not_hdf5_solverstate(solver, tmp_path):
    path = tmp_path / "junk.solverstate.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(SolverStateError, match=rf"^{path}: cannot read"):
        solver.restore(str(path))


# ---- lr policies as C++ double arithmetic ------------------------------------------------------
@pytest.mark.parametrize("text,it,expected", [
    ('lr_policy: "sigmoid" base_lr: 0.1 gamma: -0.5 stepsize: 0', 1426, 0.0),
    ('lr_policy: "sigmoid" base_lr: 0.1 gamma: 0.5 stepsize: 0', -3000, 0.0),
    ('lr_policy: "exp" base_lr: 0.1 gamma: 2', 2000, math.inf),
    ('lr_policy: "step" base_lr: 0.1 gamma: 10 stepsize: 1', 400, math.inf),
    ('lr_policy: "inv" base_lr: 0.1 gamma: -0.5 power: 0.75', 10, math.nan),
    ('lr_policy: "poly" base_lr: 0.1 power: 0.5 max_iter: 10', 20, math.nan),
    ('lr_policy: "poly" base_lr: 0.1 power: 2 max_iter: 10', 20, pytest.approx(0.1)),
    ('lr_policy: "poly" base_lr: 0.1 power: 1 max_iter: 0', 0, math.nan),
])
def test_lr_policies_never_raise(text, it, expected):
    rate, _ = learning_rate(_param(text), it, 0)
    assert isinstance(rate, float)
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(rate)
    else:
        assert rate == expected


def test_adam_with_a_negative_iteration(tmp_path):
    write_data(tmp_path)
    adam = toy_solver(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed"')
    adam.iter = -5
    adam.forward_backward()
    adam.apply_update()  # C++ gives nan parameters here, and no exception
    assert all(torch.isnan(p).all() for p in adam.params)


# ---- atomic writes -----------------------------------------------------------------------------
def test_atomic_path_keeps_the_old_file_and_no_temp_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_path(path) as tmp:
        open(tmp, "wb").write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask() or os.stat(path).st_mode & 0o777 == 0o644


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("hdf5", [False, True])
def test_snapshot_write_failure_leaves_the_previous_snapshot(solver, tmp_path, monkeypatch, hdf5):
    if hdf5:
        solver.param.snapshot_format = pb.SolverParameter.HDF5
    _, state = solver.snapshot()
    before = open(state, "rb").read()
    before_files = sorted(os.listdir(tmp_path))
    solver.history[0].fill_(7.0)
    # interrupted while the state file is being written (its weights file is written first)
    if hdf5:
        create_group = h5py.Group.create_group

        def interrupted(self, name, *args, **kwargs):
            if name == "history":
                raise KeyboardInterrupt
            return create_group(self, name, *args, **kwargs)
        monkeypatch.setattr(h5py.Group, "create_group", interrupted)
        with pytest.raises(KeyboardInterrupt):
            solver.snapshot()
    else:  # the old in-place write never reached an fsync: it had already replaced the file
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            solver.snapshot()
    assert open(state, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == before_files


def test_caffemodel_write_failure_leaves_no_temp(tmp_path):
    def arrays():
        yield np.zeros(3, np.float32)
        raise KeyboardInterrupt
    path = tmp_path / "w.caffemodel"
    with pytest.raises(KeyboardInterrupt):
        write_caffemodel(path, [(pb.LayerParameter(name="a"), arrays())])
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        write_hdf5(tmp_path / "w.h5", [(pb.LayerParameter(name="a"), arrays())])
    assert os.listdir(tmp_path) == []
