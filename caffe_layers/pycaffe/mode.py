"""pycaffe's global mode: caffe.set_mode_cpu(), caffe.set_mode_gpu(), caffe.set_device(i)."""
import torch

from caffe_layers.errors import DeviceError

_state = {"gpu": False, "device_id": 0}


def set_mode_cpu():
    _state["gpu"] = False


def set_mode_gpu():
    if not torch.cuda.is_available():
        raise RuntimeError("caffe.set_mode_gpu(): no CUDA device is available to torch")
    _state["gpu"] = True


def set_device(device_id):
    """As Caffe::SetDevice: a device that is not there is an error (Caffe's cudaSetDevice, or its
    CPU-only build, stops there), not something found out at the first GPU net."""
    device_id = int(device_id)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= device_id < count:
        raise DeviceError(f"caffe.set_device({device_id}): "
                          + (f"torch sees {count} CUDA device(s), 0..{count - 1}" if count
                             else "no CUDA device is available to torch"))
    _state["device_id"] = device_id


def device():
    """Where new nets are placed."""
    return torch.device("cuda", _state["device_id"]) if _state["gpu"] else torch.device("cpu")
