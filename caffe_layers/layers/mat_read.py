"""MatRead (segaware / DeepLab v2): a data layer that reads one blob per image from .mat files.

File names: prefix + name + "_blob_0.mat", with name the first token of each line of `source` (less
`strip` trailing characters), or "iter_<k>" when no source is given. Each forward reads batch_size
files; the counter wraps to the first name at the end of the list (no wrap without a source).
"""
from pathlib import Path

import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.matio import read_blob_mat


def read_name_list(source, strip, what):
    """First token of each line, minus `strip` trailing characters (MatRead/MatWrite `source`)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: failed to open source file {source}")
    if strip < 0:
        raise ValueError(f"{what}: strip cannot be negative, got {strip}")
    names = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split()
        name = tokens[0] if tokens else ""  # the original reads "" from a blank line, then fails
        if len(name) <= strip:
            raise ValueError(f"{what}: {source}:{lineno}: too much stripping ({strip} characters of {name!r})")
        names.append(name[:len(name) - strip])
    return names


@register("MatRead")
class MatRead(Layer):
    exact_bottoms = 0
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.mat_read_param
        if p.batch_size <= 0:
            raise ValueError(f"MatRead layer {self.name!r}: batch_size must be positive, got {p.batch_size}")
        self.prefix, self.batch_size = p.prefix, p.batch_size
        self.names = read_name_list(p.source, p.strip, f"MatRead layer {self.name!r}") if p.HasField("source") else None
        if self.names is not None and not self.names:
            raise ValueError(f"MatRead layer {self.name!r}: source {p.source} lists no files")
        self.iter = 0
        self.register_buffer("_marker", torch.empty(0), persistent=False)
        # The original sizes the top from the first listed file (without a source it indexes an empty
        # list, undefined behaviour); here the first file is iter_0 then.
        first = read_blob_mat(self._path(0), self._what)
        if first.shape[0] != 1:
            raise ValueError(f"{self._what}: {self._path(0)} holds {first.shape[0]} images; expected 1")
        self.shape = (self.batch_size,) + first.shape[1:]

    @property
    def _what(self):
        return f"MatRead layer {self.name!r}"

    def _path(self, k):
        name = self.names[k] if self.names is not None else f"iter_{k}"
        return f"{self.prefix}{name}_blob_0.mat"

    def top_shapes(self, bottom_shapes):
        return [self.shape]

    def forward(self):
        images = []
        for _ in range(self.batch_size):
            if self.names is not None and self.iter >= len(self.names):
                self.iter = 0
            path = self._path(self.iter)
            blob = read_blob_mat(path, self._what)
            if blob.shape != (1,) + self.shape[1:]:
                raise ValueError(f"{self._what}: {path} has shape {list(blob.shape)}, expected "
                                 f"{[1] + list(self.shape[1:])} (the first file's)")
            images.append(torch.from_numpy(blob))
            self.iter += 1
        return torch.cat(images).to(device=self._marker.device, dtype=self._marker.dtype)
