"""HDF5Data: rows of the datasets named by the tops, from the .h5 files listed in `source`."""
import h5py
import numpy as np

from caffe_layers.training.data import DataLayer, read_list, resolve
from caffe_layers.layers import register


@register("HDF5Data")
class HDF5Data(DataLayer):
    prefetch = 0  # Caffe's HDF5DataLayer reads in Forward (no prefetch thread: a small net's GIL handoffs cost more)

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.hdf5_data_param
        if param.HasField("transform_param"):
            raise ValueError(f"layer {self.name!r}: HDF5Data does not transform data")
        if p.batch_size < 1:
            raise ValueError(f"layer {self.name!r}: hdf5_data_param.batch_size must be >= 1")
        self.batch_size, self.shuffle, self.tops = p.batch_size, p.shuffle, list(param.top)
        self.files = [resolve(row[0], p.source) for row in read_list(p.source, self.name)]
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(self.file_order)
        self.current_file = 0
        self._load(self.files[self.file_order[0]])
        self.shapes = [(self.batch_size,) + a.shape[1:] for a in self.arrays]

    def _load(self, path):
        try:
            with h5py.File(path, "r") as f:
                missing = [t for t in self.tops if t not in f]
                if missing:
                    raise KeyError(f"datasets {missing} missing (has {list(f)})")
                self.arrays = [np.asarray(f[t], dtype=np.float32) for t in self.tops]
        except (OSError, KeyError) as err:
            raise ValueError(f"layer {self.name!r}: cannot read HDF5 file {str(path)!r}: {err}") from None
        num = self.arrays[0].shape[0]
        for t, a in zip(self.tops, self.arrays):
            if a.ndim < 1 or a.shape[0] != num:
                raise ValueError(f"layer {self.name!r}: {path}: dataset {t!r} has shape {a.shape}; "
                                 f"every dataset needs {num} rows")
        self.rows = np.arange(num)
        if self.shuffle:
            self.rng.shuffle(self.rows)
        self.current_row = 0

    def load_batch(self):
        out = [np.empty((self.batch_size,) + a.shape[1:], np.float32) for a in self.arrays]
        for i in range(self.batch_size):
            if self.current_row == len(self.rows):
                if len(self.files) > 1:
                    self.current_file += 1
                    if self.current_file == len(self.files):
                        self.current_file = 0
                        if self.shuffle:
                            self.rng.shuffle(self.file_order)
                    self._load(self.files[self.file_order[self.current_file]])
                self.current_row = 0
                if self.shuffle:
                    self.rng.shuffle(self.rows)
            for o, a in zip(out, self.arrays):
                o[i] = a[self.rows[self.current_row]]
            self.current_row += 1
        return out
