"""Middlebury .flo optical-flow files.

Layout (little endian): float32 magic 202021.25 ("PIEH"), int32 width, int32 height, then
height * width (u, v) float32 pairs, row by row. Flow is returned as a (2, H, W) float32 array,
channel 0 = u (horizontal), channel 1 = v (vertical), as segaware's FloData layer stores it.
"""
from pathlib import Path

import numpy as np

MAGIC = np.float32(202021.25)
_HEADER = 12


def _read(path, size=-1):
    """The first `size` bytes of a file (all of it by default)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as err:
        raise FileNotFoundError(f"flo: cannot open {str(Path(path))!r}: {err.strerror}") from None


def _parse_header(path, head):
    """(width, height) from a .flo file's leading bytes, checking the magic number and the size."""
    path = Path(path)
    if len(head) < _HEADER:
        raise ValueError(f"flo: {str(path)!r} is too short for a .flo header ({len(head)} of 12 bytes)")
    magic = np.frombuffer(head, "<f4", 1)[0]
    if magic != MAGIC:
        raise ValueError(f"flo: {str(path)!r} is not a .flo file: magic {magic!r}, expected 202021.25")
    w, h = (int(v) for v in np.frombuffer(head, "<i4", 2, offset=4))
    if w < 1 or h < 1 or w > 100000 or h > 100000:
        raise ValueError(f"flo: {str(path)!r} has an invalid size {w}x{h}")
    return w, h


def read_flo_header(path):
    """(width, height) of a .flo file, checking the magic number and the size."""
    return _parse_header(path, _read(path, _HEADER))


def read_flo(path):
    """The flow of a .flo file as a float32 array of shape (2, H, W)."""
    data = _read(path)
    w, h = _parse_header(path, data)
    need = _HEADER + 8 * w * h
    if len(data) < need:
        raise ValueError(f"flo: {str(path)!r} is truncated: {len(data)} bytes, a {w}x{h} flow needs {need}")
    # extra trailing bytes are ignored, as the original reader never looks past the last pair
    uv = np.frombuffer(data, "<f4", 2 * w * h, offset=_HEADER).reshape(h, w, 2)
    return np.ascontiguousarray(uv.transpose(2, 0, 1)).astype(np.float32)


def write_flo(path, flow):
    """Write a (2, H, W) flow as a .flo file."""
    flow = np.asarray(flow, np.float32)
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"flo: write_flo expects a (2, H, W) array, got shape {flow.shape}")
    _, h, w = flow.shape
    with open(path, "wb") as f:
        f.write(MAGIC.astype("<f4").tobytes())
        f.write(np.array([w, h], "<i4").tobytes())
        f.write(flow.transpose(1, 2, 0).astype("<f4").tobytes())
