"""HDF5Data: rows of the datasets named by the tops, from the .h5 files listed in `source`."""
import h5py
import numpy as np

from caffe_layers.errors import DataError
from caffe_layers.training.data import DataLayer, read_list, resolve
from caffe_layers.layers import register


@register("HDF5Data")
class HDF5Data(DataLayer):
    exact_bottoms = 0
    min_tops = 1
    prefetch = 0  # Caffe's HDF5DataLayer reads in Forward (no prefetch thread: a small net's GIL handoffs cost more)
    batch_views = True  # (rows in file order come as views of the file's arrays)

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
        where = f"layer {self.name!r}: HDF5 file {str(path)!r}"
        try:
            with h5py.File(path, "r") as f:
                missing = [t for t in self.tops if not isinstance(f.get(t), h5py.Dataset)]
                if missing:
                    raise DataError(f"{where}: datasets {missing} missing (has {list(f)})")
                for t in self.tops:
                    if f[t].ndim < 1 or f[t].dtype.kind not in "fiub":
                        raise DataError(f"{where}: dataset {t!r} ({f[t].dtype}, shape {list(f[t].shape)}) "
                                        f"is not a numeric array of rows")
                arrays = [np.asarray(f[t], dtype=np.float32) for t in self.tops]
        except DataError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, MemoryError) as err:
            raise DataError(f"{where}: cannot read it: {type(err).__name__}: {err}") from err
        num = arrays[0].shape[0]
        for t, a in zip(self.tops, arrays):
            if a.shape[0] != num:
                raise DataError(f"{where}: dataset {t!r} has shape {list(a.shape)}; every dataset "
                                f"needs {num} rows")
        if num == 0:
            raise DataError(f"{where}: the datasets have no rows")
        if hasattr(self, "arrays") and [a.shape[1:] for a in arrays] != [a.shape[1:] for a in self.arrays]:
            raise DataError(f"{where}: rows of shapes {[list(a.shape[1:]) for a in arrays]}, but the "
                            f"first file's are {[list(a.shape[1:]) for a in self.arrays]}")
        self.arrays = arrays
        self.rows = np.arange(num)
        if self.shuffle:
            self.rng.shuffle(self.rows)
        self.current_row = 0

    def load_batch(self):
        start, stop = self.current_row, self.current_row + self.batch_size
        if stop <= len(self.rows):  # the batch lies in the current file: one range of rows (a view in file order)
            rows = self.rows[start:stop] if self.shuffle else slice(start, stop)
            object.__setattr__(self, "current_row", stop)  # (an int: nn.Module's __setattr__ only costs more)
            return [a[rows] for a in self.arrays]
        parts = [[] for _ in self.arrays]  # per top, the row ranges of this batch (one unless it wraps)
        filled = 0
        while filled < self.batch_size:
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
            # the rows up to the batch's end or the file's, whichever comes first, in one copy
            n = min(self.batch_size - filled, len(self.rows) - self.current_row)
            rows = self.rows[self.current_row:self.current_row + n]
            for part, a in zip(parts, self.arrays):
                part.append(a[rows])
            filled += n
            self.current_row += n
        return [part[0] if len(part) == 1 else np.concatenate(part) for part in parts]
