"""The caffe protobuf module, generated from proto/caffe.proto at build time."""
import os

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
    at most INT_MAX; and, for a large blob, that this process can allocate it at all (Caffe would die
    of bad_alloc when it touches the data)."""
    count, valid = 1, len(dims) <= MAX_BLOB_AXES
    for d in dims:
        valid = valid and d >= 0 and (count == 0 or d <= INT_MAX // count)
        count *= d
    if not valid:
        raise error(f"{where}: invalid blob shape {list(dims)} (expected at most {MAX_BLOB_AXES} "
                    f"axes, each >= 0, at most {INT_MAX} values)")
    nbytes = 4 * count  # float32, the smallest blob type
    if nbytes > _WEIGHED_BLOB_BYTES and nbytes > (limit := memory_limit())[0]:
        raise error(f"{where}: shape {list(dims)} needs {nbytes / 2**30:.1f} GiB, more than this process "
                    f"can allocate ({limit[0] / 2**30:.1f} GiB: {limit[1]})")


_WEIGHED_BLOB_BYTES = 2**28  # smaller blobs are not weighed against the process's memory


def memory_limit():
    """(bytes, what limits them): the most this process can allocate: its address-space limit (RLIMIT_AS)
    less what it maps now, or else physical memory plus swap (the kernel refuses an allocation past it)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            return soft - mapped, "its address-space limit, RLIMIT_AS, less what it maps"
        swap = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    swap = int(line.split()[1]) * 1024
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + swap, "physical memory and swap"
    except (ImportError, OSError, ValueError):  # not Linux: nothing is weighed
        return float("inf"), "not known"


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
