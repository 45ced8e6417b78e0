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
