"""The caffe protobuf module, generated from proto/caffe.proto at build time."""
try:
    from caffe_layers.formats import caffe_pb2 as pb
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "caffe_layers/formats/caffe_pb2.py is missing: it is generated from proto/caffe.proto by the build. "
        "Run `pip install -e .` (or `python setup.py build_py`) in the repository root."
    ) from err

TRAIN = pb.TRAIN
TEST = pb.TEST
INT_MAX = 2**31 - 1
MAX_BLOB_AXES = 32  # Caffe's kMaxBlobAxes


def check_blob_shape(dims, where, error):
    """Caffe's Blob::Reshape checks: at most 32 axes, each >= 0, the count (up to the first 0 axis)
    at most INT_MAX."""
    count, valid = 1, len(dims) <= MAX_BLOB_AXES
    for d in dims:
        valid = valid and d >= 0 and (count == 0 or d <= INT_MAX // count)
        count *= d
    if not valid:
        raise error(f"{where}: invalid blob shape {list(dims)} (expected at most {MAX_BLOB_AXES} "
                    f"axes, each >= 0, at most {INT_MAX} values)")


def phase_value(phase):
    """Accept caffe.TRAIN / caffe.TEST or the strings 'train' / 'test'."""
    if isinstance(phase, str):
        key = phase.upper()
        if key not in ("TRAIN", "TEST"):
            raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
        return pb.Phase.Value(key)
    if phase not in (TRAIN, TEST):
        raise ValueError(f"phase must be caffe.TRAIN or caffe.TEST, got {phase!r}")
    return int(phase)
caffe_pb2 = pb  # pycaffe scripts use `from caffe.proto import caffe_pb2`
