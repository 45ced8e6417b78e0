"""CAFFE_LAYERS_NUM_THREADS sets torch's thread count; OpenMP waits passively unless the user chose."""
import os
import subprocess
import sys

import pytest

import caffe_layers

PROBE = "import os, caffe_layers, torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"


def probe(**env):
    run_env = {k: v for k, v in os.environ.items() if k not in ("CAFFE_LAYERS_NUM_THREADS", "OMP_WAIT_POLICY")}
    run_env.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], env=run_env, capture_output=True, text=True)


def test_thread_count_and_wait_policy():
    assert probe(CAFFE_LAYERS_NUM_THREADS="1").stdout.split() == ["1", "PASSIVE"]
    assert probe(CAFFE_LAYERS_NUM_THREADS="3", OMP_WAIT_POLICY="ACTIVE").stdout.split() == ["3", "ACTIVE"]


def test_bad_thread_count(monkeypatch):
    for value in ("two", "0", "-1"):
        monkeypatch.setenv("CAFFE_LAYERS_NUM_THREADS", value)
        with pytest.raises(ValueError, match=f"CAFFE_LAYERS_NUM_THREADS='{value}': expected a positive number"):
            caffe_layers._thread_count()


RECORDER = '''
import torch
import caffe_layers as caffe

class Threads(caffe.Layer):
    """top = bottom; records torch's intra-op thread count at each forward and backward."""
    seen = []

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        Threads.seen.append(("forward", torch.get_num_threads()))
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        Threads.seen.append(("backward", torch.get_num_threads()))
        bottom[0].diff[...] = top[0].diff
'''


def recording_net(tmp_path, shape):
    (tmp_path / "thread_recorder.py").write_text(RECORDER)
    dims = " ".join(f"dim: {d}" for d in shape)
    (tmp_path / "net.prototxt").write_text(f'''
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
        layer {{ name: "rec" type: "Python" bottom: "data" top: "rec"
                 python_param {{ module: "thread_recorder" layer: "Threads" }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "rec" top: "ip"
                 inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "loss" }}
        force_backward: true''')
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.01 lr_policy: "fixed" max_iter: 2 '
                                              'display: 0 snapshot_after_train: false')  # (Caffe reads `net` from the cwd)
    return tmp_path


@pytest.mark.parametrize("shape, inside", [((10, 4), 1), ((2, 1, 150, 150), 3)])
def test_tiny_nets_run_the_pycaffe_face_on_one_thread(tmp_path, shape, inside):
    """A net below TINY_NET_NUMEL in every blob and parameter runs forward, backward and solver steps on one
    intra-op thread (torch's pool is not woken for its tiny ops) and gives the thread count back; a bigger
    net keeps it."""
    import torch
    from caffe_layers import pycaffe as caffe

    folder = recording_net(tmp_path, shape)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        net = caffe.Net(str(folder / "net.prototxt"), caffe.TRAIN)
        recorder = type(net.layers[1].module.py)
        recorder.seen.clear()
        net.forward()
        net.backward()
        solver = caffe.get_solver(str(folder / "solver.prototxt"))
        solver.step(1)
        assert torch.get_num_threads() == 3
        assert [kind for kind, _ in recorder.seen][:3] == ["forward", "backward", "forward"]  # (the step's)
        assert {threads for _, threads in recorder.seen} == {inside}
    finally:
        torch.set_num_threads(before)
