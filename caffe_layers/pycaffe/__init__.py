"""pycaffe's face: the names of BVLC's python/caffe/__init__.py, module for module (pycaffe, io, draw,
net_spec, coord_map, classifier, detector, proto.caffe_pb2). `caffe-layers run script.py` runs a
pycaffe script with `import caffe` resolving here."""
from importlib.metadata import PackageNotFoundError, version as _version

from caffe_layers.pycaffe.pycaffe import (Net, SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                          AdaDeltaSolver, AdamSolver, NCCL, Timer, get_solver)
from caffe_layers.pycaffe.mode import (init_log, log, set_mode_cpu, set_mode_gpu, set_device,
                                       layer_type_list, set_random_seed, solver_count, set_solver_count,
                                       solver_rank, set_solver_rank, set_multiprocess, has_nccl)
from caffe_layers.layers.base import Layer
from caffe_layers.pycaffe.proto.caffe_pb2 import TRAIN, TEST
from caffe_layers.pycaffe.classifier import Classifier
from caffe_layers.pycaffe.detector import Detector
from caffe_layers.pycaffe import io
from caffe_layers.pycaffe.net_spec import layers, params, NetSpec, to_proto

from caffe_layers.pycaffe.mode import install_glog_stderr as _install_glog_stderr

_install_glog_stderr()  # Caffe's log lines on stderr, as a pycaffe script shows them (GLOG_minloglevel quiets)

try:
    __version__ = _version("caffe_layers")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "NCCL", "Timer", "init_log", "log", "set_mode_cpu", "set_mode_gpu", "set_device",
           "Layer", "get_solver", "layer_type_list", "set_random_seed", "solver_count", "set_solver_count",
           "solver_rank", "set_solver_rank", "set_multiprocess", "has_nccl", "__version__", "TRAIN", "TEST",
           "Classifier", "Detector", "io", "layers", "params", "NetSpec", "to_proto"]
