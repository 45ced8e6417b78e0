"""MemoryData: batches from arrays given with `reset(data, labels)` (pycaffe's set_input_arrays)."""
import numpy as np

from caffe_layers.training.data import DataLayer
from caffe_layers.layers import register


@register("MemoryData")
class MemoryData(DataLayer):
    exact_bottoms = 0
    exact_tops = 2

    prefetch = 0  # the arrays can be replaced between batches

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.memory_data_param
        self.batch_size = p.batch_size
        self.shape = (p.channels, p.height, p.width)
        if self.batch_size < 1 or min(self.shape) < 1:
            raise ValueError(f"layer {self.name!r}: memory_data_param needs batch_size, channels, height, "
                             f"width > 0")
        self.shapes = [(self.batch_size,) + self.shape, (self.batch_size,)][:len(param.top)]
        self.data, self.labels, self.pos = None, None, 0

    def reset(self, data, labels):
        data = np.asarray(data, np.float32)
        labels = np.asarray(labels, np.float32).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.shape:
            raise ValueError(f"layer {self.name!r}: data must be N x {' x '.join(map(str, self.shape))}, "
                             f"got {list(data.shape)}")
        if len(data) % self.batch_size or len(labels) != len(data):
            raise ValueError(f"layer {self.name!r}: need a multiple of batch_size {self.batch_size} items and "
                             f"one label each; got {len(data)} items, {len(labels)} labels")
        self.data, self.labels, self.pos = data, labels, 0

    set_input_arrays = reset

    def load_batch(self):
        if self.data is None:
            raise RuntimeError(f"layer {self.name!r}: MemoryData needs reset(data, labels) before forward")
        s = slice(self.pos, self.pos + self.batch_size)
        self.pos = (self.pos + self.batch_size) % len(self.data)
        return [self.data[s], self.labels[s]][:len(self.shapes)]
