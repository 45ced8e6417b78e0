"""pycaffe's process-wide functions (those of _caffe.cpp): set_mode_cpu/gpu, set_device, set_random_seed,
the solver count/rank, init_log/log, has_nccl and layer_type_list."""
import logging

import torch

_state = {"gpu": False, "device_id": 0, "solver_count": 1, "solver_rank": 0, "multiprocess": False}
_log = logging.getLogger("caffe")


def set_mode_cpu():
    _state["gpu"] = False


def set_mode_gpu():
    if not torch.cuda.is_available():
        raise RuntimeError("caffe.set_mode_gpu(): no CUDA device is available to torch")
    _state["gpu"] = True


def set_device(device_id):
    _state["device_id"] = int(device_id)


def device():
    """Where new nets are placed."""
    return torch.device("cuda", _state["device_id"]) if _state["gpu"] else torch.device("cpu")


def set_random_seed(seed):
    """Seed the random numbers of fillers, dropout and the data layers' shuffles (Caffe's RNG)."""
    torch.manual_seed(int(seed))


def solver_count():
    return _state["solver_count"]


def set_solver_count(count):
    _state["solver_count"] = int(count)


def solver_rank():
    return _state["solver_rank"]


def set_solver_rank(rank):
    _state["solver_rank"] = int(rank)


def set_multiprocess(multiprocess):
    _state["multiprocess"] = bool(multiprocess)


def init_log(level=None, pipe=None):
    """Caffe's glog setup: INFO lines to stderr (level: glog's minimum level, 0 = INFO ... 3 = FATAL)."""
    levels = [logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    logging.basicConfig(format="%(levelname).1s%(asctime)s %(name)s] %(message)s", datefmt="%m%d %H:%M:%S")
    logging.getLogger().setLevel(levels[min(int(level or 0), 3)])


def log(message):
    _log.info("%s", message)


def has_nccl():
    return False


def layer_type_list():
    """The registered layer types, sorted as Caffe's LayerRegistry lists them."""
    from caffe_layers.layers import known_types

    return known_types()
