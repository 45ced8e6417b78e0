"""The project's exceptions for bad user input: one line naming the file (and line, layer, blob or
field) and what was expected. Readers and data layers raise only these; the cause stays chained.

This module imports nothing of the project, so every package can use it.
"""
import os
import tempfile
from contextlib import contextmanager


class CaffeLayersError(Exception):
    """Base class: a file, setting or value given by the user cannot be used."""


class PrototxtError(CaffeLayersError, ValueError):
    """A prototxt (net or solver) that cannot be read or does not describe a valid net."""


class WeightsError(CaffeLayersError, ValueError):
    """A weights file (.caffemodel, .caffemodel.h5) that cannot be read or does not fit the net."""


class SolverStateError(CaffeLayersError, ValueError):
    """A .solverstate or .solverstate.h5 that cannot be read or does not fit the solver."""


class DataError(CaffeLayersError, ValueError):
    """Input data (a list file, an image, an HDF5 data file, a data layer's setting) that cannot be used."""


class DeviceError(CaffeLayersError, RuntimeError):
    """A device that was asked for is not there."""


class TopReshaped(Exception):
    """Not an error: a data layer's batch does not fit its tops (engine/explicit.py); `values` are the new
    tops, `index` the step that made them, for the net to reshape its blobs and go on."""

    def __init__(self, values):
        super().__init__("a data layer's batch changed shape")
        self.values, self.index = values, None


def check_readable_file(path, what):
    """`path` as a str, or an error saying it does not exist or is a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} is a directory, expected a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def check_overwrite(path, force):
    """A user's file is replaced only when asked (--force)."""
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the folder of `path`; on success it is fsynced and renamed to
    `path`, on failure (or an interrupt) it is removed, so `path` is either the old file or the
    whole new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _new_file_mode(path):
    """The mode `path` has, or the one open() would give a new file (mkstemp's is 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path, data, mode="wb"):
    """Write bytes (or text with mode "w") to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            f.write(data)
