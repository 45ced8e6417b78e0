"""Solvers: Caffe's update rules and lr policies, golden trajectories of the original fork,
snapshots and resume, signals, and 2-process data-parallel training on gloo."""
import math
import os
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.proto import pb
from caffe_layers.training.solver import Solver, SignalActions, learning_rate
from golden import GOLDEN, assert_matches

TRAIN = GOLDEN / "train"
CASES = sorted(p.name for p in TRAIN.iterdir()) if TRAIN.is_dir() else []


@register("_SolverTestAffineLoss")
class AffineLoss(Layer):
    """Test-only loss: mean over the batch of 0.5 * |x W + b - y|^2 (two learnable blobs)."""

    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        n_in, n_out = math.prod(bottom_shapes[0][1:]), math.prod(bottom_shapes[1][1:])
        g = torch.Generator().manual_seed(3)
        self.blobs.append(torch.nn.Parameter(torch.randn(n_in, n_out, generator=g) * 0.3))
        self.blobs.append(torch.nn.Parameter(torch.randn(n_out, generator=g) * 0.1))

    def forward(self, x, y):
        r = x.flatten(1) @ self.blobs[0] + self.blobs[1] - y.flatten(1)
        return 0.5 * (r * r).sum() / x.shape[0]


def write_data(folder, rows=8, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(rows, 3).astype(np.float32)
    y = (x @ np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 1.0]]) + 0.3).astype(np.float32)
    with h5py.File(folder / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    (folder / "list.txt").write_text(str(folder / "d.h5") + "\n")
    return x, y


def toy_solver(folder, solver_text, batch=2, **kwargs):
    net = f"""name: "toy"
    layer {{ name: "data" type: "HDF5Data" top: "x" top: "y"
             hdf5_data_param {{ source: "{folder / 'list.txt'}" batch_size: {batch} }} }}
    layer {{ name: "fit" type: "_SolverTestAffineLoss" bottom: "x" bottom: "y" top: "loss"
             param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }} }}"""
    param = pb.SolverParameter()
    from google.protobuf import text_format
    text_format.Parse(solver_text, param)
    param.net_param.CopyFrom(text_format.Parse(net, pb.NetParameter()))
    param.snapshot_prefix = str(folder / "snap")
    return Solver(param, **kwargs)


# ---- learning-rate policies -------------------------------------------------------------------
def _param(text):
    from google.protobuf import text_format
    return text_format.Parse(text, pb.SolverParameter())


@pytest.mark.parametrize("text,expected", [
    ('lr_policy: "fixed" base_lr: 0.1', lambda it: 0.1),
    ('lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 3', lambda it: 0.1 * 0.5 ** (it // 3)),
    ('lr_policy: "exp" base_lr: 0.1 gamma: 0.9', lambda it: 0.1 * 0.9 ** it),
    ('lr_policy: "inv" base_lr: 0.1 gamma: 0.1 power: 0.75', lambda it: 0.1 * (1 + 0.1 * it) ** -0.75),
    ('lr_policy: "poly" base_lr: 0.1 power: 0.9 max_iter: 10', lambda it: 0.1 * (1 - it / 10) ** 0.9),
    ('lr_policy: "sigmoid" base_lr: 0.1 gamma: -0.5 stepsize: 4',
     lambda it: 0.1 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies(text, expected):
    param = _param(text)
    for it in range(10):
        rate, _ = learning_rate(param, it, 0)
        assert rate == pytest.approx(expected(it), rel=1e-6)


def test_multistep_takes_one_step_per_iteration():
    param = _param('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 2 stepvalue: 3')
    step, rates = 0, []
    for it in range(5):
        rate, step = learning_rate(param, it, step)
        rates.append(rate)
    assert rates == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    # the quirk: resuming at iteration 5 with current_step 0 catches up one step per iteration
    assert learning_rate(param, 5, 0) == (pytest.approx(0.1), 1)


def test_unknown_policy_and_type_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lr_policy 'bogus'"):
        learning_rate(_param('lr_policy: "bogus"'), 0, 0)
    write_data(tmp_path)
    with pytest.raises(ValueError, match="unknown type 'Foo'"):
        toy_solver(tmp_path, 'type: "Foo" base_lr: 0.1 lr_policy: "fixed"')


# ---- update rules against an independent float64 reference ----------------------------------
def reference_run(x, y, w, b, p, kind, iters, batch=2, iter_size=1, clip=-1.0, decay=0.0, l1=False):
    """Caffe's rules written out directly with numpy (float64) on the toy least-squares problem."""
    params, lr_mults, decay_mults = [w.copy(), b.copy()], [1.0, 2.0], [1.0, 0.0]
    hist = [np.zeros_like(q) for q in params] * 1
    hist2 = [np.zeros_like(q) for q in params]
    row = 0
    for it in range(iters):
        grads = [np.zeros_like(q) for q in params]
        for _ in range(iter_size):
            idx = [(row + i) % len(x) for i in range(batch)]
            row = (row + batch) % len(x)
            xb, yb = x[idx].astype(np.float64), y[idx].astype(np.float64)
            r = xb @ params[0] + params[1] - yb
            grads[0] += xb.T @ r / batch
            grads[1] += r.sum(0) / batch
        norm = math.sqrt(sum((g * g).sum() for g in grads))
        if clip >= 0 and norm > clip:
            grads = [g * clip / norm for g in grads]
        rate = p["lr"]
        for i in range(2):
            g = grads[i] / iter_size
            if decay * decay_mults[i]:
                g = g + decay * decay_mults[i] * (np.sign(params[i]) if l1 else params[i])
            lr = rate * lr_mults[i]
            if kind == "SGD":
                hist[i] = p["momentum"] * hist[i] + lr * g
                upd = hist[i]
            elif kind == "Nesterov":
                old = hist[i]
                hist[i] = p["momentum"] * hist[i] + lr * g
                upd = (1 + p["momentum"]) * hist[i] - p["momentum"] * old
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g * g
                upd = lr * g / (np.sqrt(hist[i]) + p["delta"])
            elif kind == "RMSProp":
                hist[i] = p["rms_decay"] * hist[i] + (1 - p["rms_decay"]) * g * g
                upd = lr * g / (np.sqrt(hist[i]) + p["delta"])
            elif kind == "AdaDelta":
                m = p["momentum"]
                hist[i] = m * hist[i] + (1 - m) * g * g
                s = g * np.sqrt((hist2[i] + p["delta"]) / (hist[i] + p["delta"]))
                hist2[i] = m * hist2[i] + (1 - m) * s * s
                upd = lr * s
            elif kind == "Adam":
                b1, b2, t = p["momentum"], p["momentum2"], it + 1
                hist[i] = b1 * hist[i] + (1 - b1) * g
                hist2[i] = b2 * hist2[i] + (1 - b2) * g * g
                upd = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * hist[i] / (np.sqrt(hist2[i]) + p["delta"])
            params[i] = params[i] - upd
    return params


RULES = [
    ("SGD", 'momentum: 0.9', {"lr": 0.05, "momentum": 0.9}),
    ("Nesterov", 'momentum: 0.8', {"lr": 0.05, "momentum": 0.8}),
    ("AdaGrad", 'delta: 1e-6', {"lr": 0.05, "delta": 1e-6}),
    ("RMSProp", 'delta: 1e-6 rms_decay: 0.9', {"lr": 0.05, "delta": 1e-6, "rms_decay": 0.9}),
    ("AdaDelta", 'delta: 1e-6 momentum: 0.95', {"lr": 0.05, "delta": 1e-6, "momentum": 0.95}),
    ("Adam", 'momentum: 0.9 momentum2: 0.999 delta: 1e-8', {"lr": 0.05, "momentum": 0.9, "momentum2": 0.999,
                                                            "delta": 1e-8}),
]


@pytest.mark.parametrize("kind,extra,p", RULES, ids=[r[0] for r in RULES])
def test_update_rules_match_reference(tmp_path, kind, extra, p):
    x, y = write_data(tmp_path)
    solver = toy_solver(tmp_path, f'type: "{kind}" base_lr: 0.05 lr_policy: "fixed" {extra} '
                                  f'weight_decay: 0.01 max_iter: 7')
    w0, b0 = (q.detach().double().numpy().copy() for q in solver.params)
    solver.step(7)
    ref = reference_run(x, y, w0, b0, p, kind, 7, decay=0.01)
    for ours, theirs in zip(solver.params, ref):
        np.testing.assert_allclose(ours.detach().double().numpy(), theirs, rtol=2e-5, atol=2e-6)


def test_param_diffs_hold_the_update_after_a_step(tmp_path):
    # as Caffe's ComputeUpdateValue: the diff becomes the update (SGD: the new history), then data -= diff
    write_data(tmp_path)
    solver = toy_solver(tmp_path, 'type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01')
    solver.step(1)
    views = [q.grad.numpy() for q in solver.params]  # pycaffe's diff views stay the diffs
    before = [q.detach().clone() for q in solver.params]
    solver.step(1)
    for q, h, view, old in zip(solver.params, solver.history, views, before):
        torch.testing.assert_close(q.grad, h, rtol=0, atol=0)
        np.testing.assert_array_equal(view, h.numpy())
        torch.testing.assert_close(q.detach(), old - h, rtol=0, atol=0)


def test_iter_size_clipping_and_l1(tmp_path):
    x, y = write_data(tmp_path)
    solver = toy_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.5 iter_size: 3 '
                                  'clip_gradients: 0.4 weight_decay: 0.02 regularization_type: "L1"')
    w0, b0 = (q.detach().double().numpy().copy() for q in solver.params)
    solver.step(5)
    # clipping sees the gradient summed over iter_size (before the 1/iter_size normalisation)
    ref = reference_run(x, y, w0, b0, {"lr": 0.1, "momentum": 0.5}, "SGD", 5, iter_size=3, clip=0.4,
                        decay=0.02, l1=True)
    for ours, theirs in zip(solver.params, ref):
        np.testing.assert_allclose(ours.detach().double().numpy(), theirs, rtol=2e-5, atol=2e-6)


def test_average_loss_and_display_log(tmp_path, caplog):
    write_data(tmp_path)
    solver = toy_solver(tmp_path, 'base_lr: 0.01 lr_policy: "fixed" display: 1 average_loss: 3')
    seen = []
    solver.callbacks.append(lambda s, loss: seen.append((loss, s.smoothed_loss)))
    with caplog.at_level("INFO", logger="caffe_layers.training.solver"):
        solver.step(5)
    losses = [l for l, _ in seen]
    for k, (_, smoothed) in enumerate(seen):
        window = losses[max(0, k - 2):k + 1]
        assert smoothed == pytest.approx(sum(window) / len(window), rel=1e-6)
    assert "Iteration 4, loss = " in caplog.text and "Iteration 4, lr = 0.01" in caplog.text
    assert "Train net output #0: loss = " in caplog.text


# ---- golden trajectories of the original fork ------------------------------------------------
def golden_solver(case, tmp_path, monkeypatch):
    from caffe_layers.formats.weights import load_weights

    folder = TRAIN / case
    monkeypatch.chdir(folder)  # the net reads ./data.txt -> data.h5, as the original run did
    param = pb.SolverParameter()
    from google.protobuf import text_format
    text_format.Parse((folder / "solver.prototxt").read_text(), param)
    param.snapshot_prefix = str(tmp_path / "snap")
    solver = Solver(param)
    load_weights(solver.net, str(folder / "init.caffemodel"))
    return solver


@pytest.mark.parametrize("case", CASES)
def test_golden_trajectory(case, tmp_path, monkeypatch):
    traj = dict(np.load(TRAIN / case / "trajectory.npz"))
    solver = golden_solver(case, tmp_path, monkeypatch)
    losses = []
    solver.callbacks.append(lambda s, loss: losses.append(
        [float(s.last_values["distloss"].detach()), float(s.last_values["loss"].detach())]))
    solver.solve()
    n = len([k for k in traj if k.startswith("loss:")])
    assert len(losses) >= n
    for it in range(n):
        assert_matches(losses[it], traj[f"loss:{it}"], rtol=1e-3, what=f"{case} loss at iteration {it}")
    params = solver.net.params
    for key, ref in traj.items():
        if key.startswith("param:"):
            _, layer, i = key.split(":")
            assert_matches(params[layer][int(i)].data, ref, rtol=1e-3, what=f"{case} {key}")
    # the snapshot written after training holds the original's history blobs
    ours, theirs = pb.SolverState(), pb.SolverState()
    ours.ParseFromString((tmp_path / "snap_iter_12.solverstate").read_bytes())
    theirs.ParseFromString((TRAIN / case / "snap_iter_12.solverstate").read_bytes())
    assert (ours.iter, ours.current_step) == (theirs.iter, theirs.current_step)
    assert len(ours.history) == len(theirs.history)
    for i, (a, b) in enumerate(zip(ours.history, theirs.history)):
        assert list(a.shape.dim) == list(b.shape.dim)
        assert_matches(np.array(a.data), np.array(b.data), rtol=1e-3, what=f"{case} history {i}")


@pytest.mark.parametrize("case", CASES[:1])
def test_restore_golden_solverstate(case, tmp_path, monkeypatch):
    solver = golden_solver(case, tmp_path, monkeypatch)
    solver.restore(TRAIN / case / "snap_iter_12.solverstate")
    assert solver.iter == 12
    traj = dict(np.load(TRAIN / case / "trajectory.npz"))
    for key, ref in traj.items():
        if key.startswith("param:"):
            _, layer, i = key.split(":")
            np.testing.assert_allclose(solver.net.params[layer][int(i)].data, ref, rtol=1e-6, atol=1e-7)


# ---- snapshots and resume --------------------------------------------------------------------
@pytest.mark.parametrize("fmt,resume_data,split", [("BINARYPROTO", "restart", 4), ("HDF5", "skip", 3)])
def test_resume_equals_uninterrupted(tmp_path, fmt, resume_data, split):
    write_data(tmp_path)  # 8 rows, batch 2: iteration 4 starts a new epoch, iteration 3 does not
    text = (f'type: "Adam" base_lr: 0.05 lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 5 '
            f'momentum: 0.9 momentum2: 0.999 max_iter: 7 snapshot_format: {fmt}')
    full = toy_solver(tmp_path, text, resume_data=resume_data)
    full.solve()
    first = toy_solver(tmp_path, text.replace("max_iter: 7", f"max_iter: {split}"))
    first.solve()  # snapshot_after_train writes snap_iter_<split>
    ext = ".solverstate.h5" if fmt == "HDF5" else ".solverstate"
    assert (tmp_path / f"snap_iter_{split}{ext}").exists()
    resumed = toy_solver(tmp_path, text, resume_data=resume_data)
    resumed.solve(str(tmp_path / f"snap_iter_{split}{ext}"))
    assert resumed.iter == full.iter == 7 and resumed.current_step == full.current_step
    for a, b in zip(resumed.params, full.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(resumed.history, full.history):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_restore_rejects_wrong_history(tmp_path):
    write_data(tmp_path)
    sgd = toy_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"')
    _, state = sgd.snapshot()
    adam = toy_solver(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed"')
    with pytest.raises(ValueError, match="2 history blobs, but this Adam solver"):
        adam.restore(state)


def test_signal_snapshots_then_stops(tmp_path):
    write_data(tmp_path)
    solver = toy_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" max_iter: 100 snapshot_after_train: true')
    with SignalActions() as actions:
        solver.action = actions
        solver.callbacks.append(lambda s, loss: s.iter == 3 and os.kill(os.getpid(), signal.SIGHUP))
        solver.callbacks.append(lambda s, loss: s.iter == 5 and os.kill(os.getpid(), signal.SIGINT))
        solver.solve()
    assert solver.iter == 5
    assert (tmp_path / "snap_iter_3.solverstate").exists()  # SIGHUP: snapshot, go on
    assert (tmp_path / "snap_iter_5.solverstate").exists()  # SIGINT: stop, snapshot after train
    assert not (tmp_path / "snap_iter_6.solverstate").exists()


# ---- data parallel ---------------------------------------------------------------------------
def _worker(rank, folder, port, out):
    import torch.distributed as dist
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        solver = toy_solver(Path(folder), 'type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 '
                                          'iter_size: 1 max_iter: 5 snapshot_after_train: false')
        solver.step(5)
        if rank == 0:
            torch.save([q.detach() for q in solver.params], out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_with_double_iter_size(tmp_path):
    import socket
    write_data(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    # the single-process run first: the forked workers then inherit its imports (torch.func is slow)
    single = toy_solver(tmp_path, 'type: "SGD" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 iter_size: 2')
    single.step(5)
    mp.start_processes(_worker, args=(str(tmp_path), port, out), nprocs=2, join=True, start_method="fork")
    for a, b in zip(torch.load(out), single.params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
