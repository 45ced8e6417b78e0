"""caffe_layers: Caffe nets (BVLC, DeepLab, segaware, SPN layers) in PyTorch.

`import caffe_layers as caffe` gives pycaffe's names (those of caffe_layers.pycaffe: caffe.Net(proto,
weights, caffe.TEST), caffe.SGDSolver, caffe.io, caffe.NetSpec...), plus this package's own
register_layer and known_types. `caffe-layers run script.py` runs a pycaffe script unchanged.
"""
import os

# OpenMP threads that wait by spinning take the cores a loaded machine lacks: a 2-thread forward then
# runs many times slower than a 1-thread one (benchmarks/bench_threads.py). Wait passively unless the
# user chose otherwise; OpenMP reads this when torch loads it, so only if caffe_layers comes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def _thread_count():
    """CAFFE_LAYERS_NUM_THREADS, when set: torch's intra-op thread count for every net."""
    value = os.environ.get("CAFFE_LAYERS_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CAFFE_LAYERS_NUM_THREADS={value!r}: expected a positive number of threads")
    return int(value)


_threads = _thread_count()
if _threads is not None:
    torch.set_num_threads(_threads)


def _keep_freed_memory():
    """glibc gives each freed block above its mmap threshold (32 MiB at most) back to the system and trims its
    heap's top, so every forward touched its large blobs' pages afresh (vgg deploy 321: ~65k page faults, 0.1 s
    of system time a forward; embs deploy a quarter of its CPU time). Freed memory stays in the heap for the next
    blobs instead (up to 2 GiB free at its top), unless CAFFE_LAYERS_KEEP_FREED_MEMORY=0 or the user tuned
    glibc's malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES)."""
    value = os.environ.get("CAFFE_LAYERS_KEEP_FREED_MEMORY", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"CAFFE_LAYERS_KEEP_FREED_MEMORY={value!r}: expected 1 (default) or 0")
    tuned = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
    if value == "0" or tuned or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (ValueError, OSError):
        return
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    limit = 2**31 - 1  # (an int)
    mallopt(-3, limit)  # M_MMAP_THRESHOLD: large blocks from the heap, reused
    mallopt(-1, limit)  # M_TRIM_THRESHOLD


_keep_freed_memory()

from caffe_layers.layers import known_types, register as register_layer  # noqa: E402
from caffe_layers.pycaffe import *  # noqa: E402,F401,F403  (pycaffe's names, __all__ of caffe_layers.pycaffe)
from caffe_layers.pycaffe import __all__ as _pycaffe_names, __version__, proto  # noqa: E402,F401
from caffe_layers.pycaffe.mode import set_device  # noqa: E402,F401
from caffe_layers.layers.base import Layer  # noqa: E402
from caffe_layers.engine.graph import TorchNet  # noqa: E402  (the torch face)

__all__ = list(_pycaffe_names) + ["register_layer", "known_types", "proto", "Layer", "TorchNet"]
