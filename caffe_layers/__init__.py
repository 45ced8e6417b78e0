"""caffe_layers: Caffe nets (BVLC, DeepLab, segaware, SPN layers) in PyTorch.

`import caffe_layers as caffe` gives the pycaffe interface: caffe.Net(proto, weights, caffe.TEST),
caffe.set_mode_gpu(), net.blobs / net.params / net.forward / net.backward.
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

from caffe_layers.layers import known_types, register as register_layer  # noqa: E402
from caffe_layers.layers.base import Layer  # noqa: E402
from caffe_layers.pycaffe.mode import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402
from caffe_layers.engine.net import Net  # noqa: E402
from caffe_layers.pycaffe.net_spec import NetSpec, layers, params, to_proto  # noqa: E402; pycaffe's caffe.layers / caffe.params
from caffe_layers.formats.proto import TEST, TRAIN  # noqa: E402
from caffe_layers.pycaffe import io  # noqa: E402; pycaffe's caffe.io (Transformer, load_image, blobproto_to_array)

__all__ = ["Net", "Layer", "register_layer", "known_types", "TRAIN", "TEST",
           "set_mode_cpu", "set_mode_gpu", "set_device",
           "NetSpec", "layers", "params", "to_proto", "io"]
