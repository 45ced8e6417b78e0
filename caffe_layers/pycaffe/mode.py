"""pycaffe's global mode: caffe.set_mode_cpu(), caffe.set_mode_gpu(), caffe.set_device(i)."""
import torch

_state = {"gpu": False, "device_id": 0}


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
