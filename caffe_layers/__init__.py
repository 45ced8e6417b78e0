"""caffe_layers: Caffe nets (BVLC, DeepLab, segaware, SPN layers) in PyTorch.

`import caffe_layers as caffe` gives pycaffe's names (those of caffe_layers.pycaffe: caffe.Net(proto,
weights, caffe.TEST), caffe.SGDSolver, caffe.io, caffe.NetSpec...), plus this package's own
register_layer and known_types. `caffe-layers run script.py` runs a pycaffe script unchanged.
"""
from caffe_layers.layers import known_types, register as register_layer
from caffe_layers.pycaffe import *  # noqa: F401,F403  (pycaffe's names, __all__ of caffe_layers.pycaffe)
from caffe_layers.pycaffe import __all__ as _pycaffe_names, __version__, proto  # noqa: F401
from caffe_layers.pycaffe.mode import set_device  # noqa: F401

__all__ = list(_pycaffe_names) + ["register_layer", "known_types", "proto"]
