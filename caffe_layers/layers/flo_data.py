"""FloData (segaware): a batch of optical-flow fields read from .flo files.

image_data_param: source (a list of .flo paths), root_folder (prefix, concatenated as in Caffe),
batch_size, shuffle, rand_skip. One top of shape (batch_size, 2, H, W).
"""
import numpy as np

from caffe_layers.training.data import DataLayer, read_list_lines
from caffe_layers.formats.flo import read_flo, read_flo_header
from caffe_layers.layers import register


@register("FloData")
class FloData(DataLayer):
    exact_bottoms = 0
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = self.ip = param.image_data_param
        if p.batch_size < 1:
            raise ValueError(f"layer {self.name!r}: image_data_param.batch_size must be >= 1")
        # every whitespace-separated token is a file, as the original reads `infile >> filename`
        files = [token for _, text in read_list_lines(p.source, self.name) for token in text.split()]
        self._start_list(files, "files")
        w, h = self._header(self.pos)
        self.shapes = [(p.batch_size, 2, h, w)]

    def _path(self, i):
        return self.ip.root_folder + self.lines[i]

    def _header(self, i):
        try:
            return read_flo_header(self._path(i))
        except (OSError, ValueError) as err:
            raise type(err)(f"layer {self.name!r}: {err}") from None

    def load_batch(self):
        batch = []
        for _ in range(self.ip.batch_size):
            try:
                batch.append(read_flo(self._path(self.pos)))
            except (OSError, ValueError) as err:
                raise type(err)(f"layer {self.name!r}: {err}") from None
            self._advance()
        shapes = {b.shape for b in batch}
        # the original sizes the batch from its first file and overruns memory on a larger one
        if len(shapes) > 1:
            raise ValueError(f"layer {self.name!r}: .flo files of different sizes {sorted(shapes)} in one batch")
        return [np.stack(batch)]
