"""Blobs in .mat files, as the segaware fork's util/matio_io.cpp writes and reads them.

A blob N x C x H x W is stored as the MATLAB variable "data" of class single with dims W x H x C x N:
MATLAB is column-major, so the bytes are exactly Caffe's row-major N, C, H, W order.
"""
from pathlib import Path

import numpy as np
import scipy.io


def read_blob_mat(path, what="MatRead"):
    """The "data" variable of a .mat file as an N x C x H x W float32 array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: MAT file not found: {path}")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False)
    except Exception as err:
        raise ValueError(f"{what}: cannot read MAT file {path}: {err}") from err
    if "data" not in mat:
        raise ValueError(f"{what}: field 'data' not present in MAT file {path}")
    data = mat["data"]
    # The original reads through matio with a class check: float blobs need a single array.
    if data.dtype != np.float32:
        raise ValueError(f"{what}: field 'data' in {path} must be single (float32), got {data.dtype}")
    if data.ndim > 4:
        raise ValueError(f"{what}: field 'data' in {path} cannot have more than 4 dims, got {data.shape}")
    dims = list(data.shape) + [1] * (4 - data.ndim)  # W, H, C, N (MATLAB drops trailing ones)
    w, h, c, n = dims
    flat = np.asarray(data).reshape(-1, order="F")
    return flat.reshape(n, c, h, w)


def write_blob_mat(path, blob):
    """Write an N x C x H x W array as the single variable "data" (dims W x H x C x N), uncompressed."""
    blob = np.asarray(blob, dtype=np.float32)
    if blob.ndim > 4:
        raise ValueError(f"MatWrite: a blob with more than 4 axes cannot be written to {path}")
    # Caffe's legacy num/channels/height/width read missing trailing axes as 1.
    blob = blob.reshape(tuple(blob.shape) + (1,) * (4 - blob.ndim))
    n, c, h, w = blob.shape
    data = np.asfortranarray(blob.reshape(-1).reshape((w, h, c, n), order="F"))
    scipy.io.savemat(str(path), {"data": data}, do_compression=False, oned_as="column")
