"""pycaffe's runtime mode switch (caffe.set_mode_gpu/cpu after a net or solver is built) and Caffe's log lines
on stderr by default (GLOG_minloglevel quiets them)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import caffe_layers as caffe
from caffe_layers.engine.net import Net
from caffe_layers.pycaffe import mode

NET = """layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2
        weight_filler { type: "gaussian" std: 1 } } }"""


@pytest.fixture
def cpu_mode_after():
    yield
    mode._state.update(gpu=False, device_id=0)


def test_a_mode_switch_moves_a_built_net_at_its_next_forward(monkeypatch, cpu_mode_after):
    moves = []
    monkeypatch.setattr(Net, "to", lambda self, device: moves.append(torch.device(device)) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    net = Net(NET)
    net.forward()
    caffe.set_mode_cpu()  # no change of device: nothing to do
    net.forward()
    assert moves == []
    caffe.set_mode_gpu()
    assert moves == []  # Caffe switches at the next call, not at set_mode_gpu
    net.forward()
    net.backward()
    net.forward()
    assert moves == [torch.device("cuda", 0)]  # once
    caffe.set_device(1)
    net.backward()
    assert moves[-1] == torch.device("cuda", 1)
    late = Net(NET)  # built in GPU mode: placed at its build, not again at its forward
    count = len(moves)
    late.forward()
    assert len(moves) == count


def test_a_mode_switch_moves_a_built_solver_at_its_next_step(monkeypatch, tmp_path, cpu_mode_after):
    from caffe_layers.training.solver import Solver

    (tmp_path / "net.prototxt").write_text(NET.replace('top: "y"', 'top: "y"') +
                                          '\nlayer { name: "l" type: "EuclideanLoss" bottom: "y" bottom: "y" '
                                          'top: "loss" }')
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.1 '
                                              f'lr_policy: "fixed" max_iter: 2')
    moves = []
    monkeypatch.setattr(Solver, "to", lambda self, device: moves.append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    caffe.set_mode_gpu()
    solver.step(1)
    solver.step(1)
    assert moves == [torch.device("cuda", 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_set_mode_gpu_runs_the_next_forward_on_the_gpu(cpu_mode_after):
    torch.manual_seed(0)
    net = Net(NET)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    on_cpu = net.forward(x=x)["y"].copy()
    caffe.set_mode_gpu()
    on_gpu = net.forward(x=x)["y"].copy()
    assert net.device.type == "cuda" and net.params["ip"][0].shape == (2, 3)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-6)
    caffe.set_mode_cpu()
    net.forward(x=x)
    assert net.device.type == "cpu"


SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
import bench_nets
import caffe
path = bench_nets.logreg_solver({tmp!r})
solver = caffe.get_solver(str(path))
solver.param.display = 1
solver.step(2)
"""


@pytest.mark.parametrize("minloglevel", [None, "1"])
def test_solver_logs_as_glog_on_stderr_by_default(tmp_path, minloglevel):
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(bench=bench, tmp=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}
    if minloglevel is not None:
        env["GLOG_minloglevel"] = minloglevel
    done = subprocess.run([sys.executable, "-m", "caffe_layers.tools.cli", "run", str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if minloglevel == "1":
        assert "Iteration" not in done.stderr
        return
    lines = done.stderr.splitlines()
    assert lines[0] == "WARNING: Logging before InitGoogleLogging() is written to STDERR"
    glog = r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.py:\d+\] "
    for message in (r"Iteration 0, Testing net \(#0\)", r"    Test net output #0: accuracy = [\d.e-]+",
                    r"Iteration 0, loss = [\d.e-]+", r"    Train net output #1: loss = [\d.e-]+ \(\* 1 = [\d.e-]+ loss\)",
                    r"Iteration 0, lr = 0\.01", r"Iteration 1, loss = [\d.e-]+"):
        assert any(re.fullmatch(glog + message, line) for line in lines), (message, lines)
