"""pycaffe's process-wide functions (those of _caffe.cpp): set_mode_cpu/gpu, set_device, set_random_seed,
the solver count/rank, init_log/log, has_nccl and layer_type_list."""
import logging
import os
import sys
import threading
import time

import torch

from caffe_layers.errors import DeviceError

_state = {"gpu": False, "device_id": 0, "solver_count": 1, "solver_rank": 0, "multiprocess": False,
          "generation": 0}
_log = logging.getLogger("caffe")


def _switch(**changes):
    """Change the mode settings; a change of the device counts as a new mode generation (nets and solvers
    built before it move there at their next pycaffe call, as Caffe picks Forward_gpu or Forward_cpu from
    Caffe::mode() at each call)."""
    before = device()
    _state.update(changes)
    if device() != before:
        _state["generation"] += 1


def generation():
    """How many times the mode's device has changed (a net or solver compares it with the one it last saw)."""
    return _state["generation"]


def set_mode_cpu():
    _switch(gpu=False)


def set_mode_gpu():
    if not torch.cuda.is_available():
        raise RuntimeError("caffe.set_mode_gpu(): no CUDA device is available to torch")
    _switch(gpu=True)


def set_device(device_id):
    """As Caffe::SetDevice: a device that is not there is an error (Caffe's cudaSetDevice, or its
    CPU-only build, stops there), not something found out at the first GPU net."""
    device_id = int(device_id)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= device_id < count:
        raise DeviceError(f"caffe.set_device({device_id}): "
                          + (f"torch sees {count} CUDA device(s), 0..{count - 1}" if count
                             else "no CUDA device is available to torch"))
    _switch(device_id=device_id)


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
    logging.basicConfig(format="%(levelname).1s%(asctime)s %(name)s] %(message)s", datefmt="%m%d %H:%M:%S")
    logging.getLogger().setLevel(_GLOG_LEVELS[min(int(level or 0), 3)])


def log(message):
    _log.info("%s", message)


_GLOG_LEVELS = [logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]


class GlogStderr(logging.Handler):
    """What a pycaffe script shows without InitGoogleLogging: glog's lines on stderr, from GLOG_minloglevel
    (0 INFO, the default; 1 WARNING; 2 ERROR; 3 FATAL) up, after glog's own warning line:
    "I1201 15:04:05.123456  4242 solver.py:242] Iteration 0, loss = 0.693147". Silent where the program set
    up logging itself (a handler on the root logger: caffe-layers' commands, init_log, pytest)."""

    announced = False

    def emit(self, record):
        if logging.getLogger().handlers:
            return
        try:
            minimum = _GLOG_LEVELS[min(max(int(os.environ.get("GLOG_minloglevel", "0")), 0), 3)]
        except ValueError:
            minimum = logging.INFO
        if record.levelno < minimum:
            return
        try:
            stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
            micros = int(record.created % 1 * 1e6)
            line = (f"{record.levelname[0]}{stamp}.{micros:06d} {threading.get_native_id():>5} "
                    f"{os.path.basename(record.pathname)}:{record.lineno}] {record.getMessage()}\n")
            if not GlogStderr.announced:
                GlogStderr.announced = True
                line = "WARNING: Logging before InitGoogleLogging() is written to STDERR\n" + line
            sys.stderr.write(line)
        except Exception:
            self.handleError(record)


def install_glog_stderr():
    """Give the project's loggers ("caffe_layers.*" and pycaffe's "caffe") the GlogStderr handler, at INFO
    where no level was set (once; done when the pycaffe face is imported)."""
    for name in ("caffe_layers", "caffe"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, GlogStderr) for h in logger.handlers):
            logger.addHandler(GlogStderr())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def has_nccl():
    return False


def layer_type_list():
    """The registered layer types, sorted as Caffe's LayerRegistry lists them."""
    from caffe_layers.layers import known_types

    return known_types()
