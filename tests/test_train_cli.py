"""The train / test / time subcommands on a small HDF5 net."""
import logging

import h5py
import numpy as np
import pytest

from caffe_layers.tools.cli import main
from caffe_layers.formats.proto import pb

NET = """name: "cli"
layer { name: "data" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "${LIST}" batch_size: 4 } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


@pytest.fixture
def files(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randn(16, 3).astype(np.float32)
    y = (x @ rng.randn(3, 2) + 0.5).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    (tmp_path / "list.txt").write_text(str(tmp_path / "d.h5") + "\n")
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\n'
        f'max_iter: ${{ITERS}}\ndisplay: 5\nsnapshot: 10\nsnapshot_prefix: "{tmp_path / "snap"}"\n'
        f'test_iter: 2\ntest_interval: 10\nrandom_seed: 5\n')
    return tmp_path


def losses(text):
    return [float(line.split("loss = ")[1]) for line in text.splitlines()
            if "Iteration" in line and ", loss = " in line]


def test_train_logs_snapshots_and_loss_falls(files, caplog):
    args = ["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=20",
            "--set", f"LIST={files / 'list.txt'}", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    text = caplog.text
    assert "Iteration 0, lr = 0.1" in text and "Testing net (#0)" in text
    seen = losses(text)
    assert len(seen) >= 4 and seen[-1] < 0.5 * seen[0]
    for n in (10, 20):
        assert (files / f"snap_iter_{n}.caffemodel").exists()
        state = pb.SolverState()
        state.ParseFromString((files / f"snap_iter_{n}.solverstate").read_bytes())
        assert state.iter == n and len(state.history) == 2


def test_resume_and_weights_are_exclusive(files, caplog):
    common = ["--set", f"LIST={files / 'list.txt'}", "--no-progress"]
    assert main(["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=10"] + common) == 0
    caplog.clear()  # (the project's loggers log INFO by default: the first run's lines are not the resumed run's)
    with caplog.at_level(logging.INFO):
        assert main(["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=15",
                     "--snapshot", str(files / "snap_iter_10.solverstate")] + common) == 0
    assert "Restoring previous solver status" in caplog.text and "Iteration 10, lr" in caplog.text
    assert "Iteration 5, lr" not in caplog.text
    assert (files / "snap_iter_15.caffemodel").exists()
    with pytest.raises(SystemExit):
        main(["train", "--solver", "s", "--weights", "w", "--snapshot", "s"])


def test_unset_variable_is_a_clear_error(files, capsys):
    assert main(["train", "--solver", str(files / "solver.prototxt"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("caffe-layers train: error: ") and "${ITERS} is not set" in err and "\n" not in err
    with pytest.raises(ValueError, match=r"\$\{ITERS\} is not set"):  # --debug: the exception itself
        main(["--debug", "train", "--solver", str(files / "solver.prototxt"), "--no-progress"])


def test_test_and_time_commands(files, caplog):
    common = ["--set", f"LIST={files / 'list.txt'}"]
    assert main(["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=10",
                 "--no-progress"] + common) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["test", "--model", str(files / "net.prototxt"), "--weights",
                     str(files / "snap_iter_10.caffemodel"), "--iterations", "4"] + common) == 0
    assert "Batch 3, loss = " in caplog.text and "loss = " in caplog.text.splitlines()[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["time", "--model", str(files / "net.prototxt"), "--iterations", "2"] + common) == 0
    assert "fc\tforward:" in caplog.text and "fc\tbackward:" in caplog.text
    assert "Average Forward-Backward" in caplog.text


def test_train_level_and_stage_set_the_train_nets_state(files, caplog):
    """As caffe.cpp's train: --level sets and --stage adds to the solver's train_state."""
    (files / "net.prototxt").write_text(NET + 'layer { name: "loss2" type: "EuclideanLoss" bottom: "fc" bottom: "y" '
                                        'top: "loss2" include { phase: TRAIN stage: "extra" min_level: 1 } }\n')
    common = ["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=1",
              "--set", f"LIST={files / 'list.txt'}", "--no-progress", "--stage", "extra"]
    with caplog.at_level(logging.INFO):
        assert main(common + ["--level", "1"]) == 0
    assert "Train net output #1: loss2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(common) == 0  # level 0: the rule's min_level 1 excludes the layer
    assert "loss2" not in caplog.text


@pytest.mark.parametrize("spec,expected", [
    ("0,1", "--gpu 0,1: no CUDA device is available to torch (data-parallel training on NCCL needs one GPU per "
            "process); set CAFFE_LAYERS_CPU_FALLBACK=1 to run on the CPU instead"),
    ("all", "--gpu all: no CUDA device is available to torch (data-parallel training on NCCL needs one GPU per "
            "process); set CAFFE_LAYERS_CPU_FALLBACK=1 to run on the CPU instead"),
    ("0", "--gpu 0: no CUDA device is available to torch; set CAFFE_LAYERS_CPU_FALLBACK=1 to run on the CPU instead"),
    ("0,0", "--gpu 0,0: GPU 0 named twice; data-parallel training runs one NCCL process per GPU (NCCL refuses two "
            "ranks on one device)")])
def test_gpu_request_without_a_gpu_refuses_in_one_line(files, monkeypatch, spec, expected):
    """Asking for NCCL data-parallel training (several GPUs) where torch sees none, or one GPU twice, stops
    before any process starts, with one line naming the request."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CAFFE_LAYERS_CPU_FALLBACK", raising=False)
    args = ["train", "--solver", str(files / "solver.prototxt"), "--set", "ITERS=2",
            "--set", f"LIST={files / 'list.txt'}", "--no-progress", "--gpu", spec]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert str(err.value) == expected


def test_a_backend_refusing_its_setup_stops_in_one_line(monkeypatch):
    """NCCL refuses two ranks on one GPU at its first collective: start_group makes that one line naming the
    rank and the device (here gloo, one rank, and a refusing all_reduce stand in for it)."""
    import socket

    import torch
    import torch.distributed as dist

    from caffe_layers.tools.train import start_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def refuse(*args, **kwargs):
        raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, invalid usage\nLast error:\n"
                                    "Duplicate GPU detected : rank 0 and rank 1 both on CUDA device 1000")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    with pytest.raises(SystemExit) as err:
        start_group("gloo", torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    assert str(err.value) == ("rank 0: torch.distributed (gloo) refused to start on cpu: Duplicate GPU detected : "
                              "rank 0 and rank 1 both on CUDA device 1000")
    assert not dist.is_initialized()
