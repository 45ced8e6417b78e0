"""ImageData: images and integer labels from a list file of "path label" lines."""
import numpy as np

from caffe_layers.errors import DataError
from caffe_layers.training.data import DataLayer, read_labelled_list
from caffe_layers.training.data.transformer import Transformer
from caffe_layers.layers import register


@register("ImageData")
class ImageData(DataLayer):
    exact_bottoms = 0
    exact_tops = 2

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = self.ip = param.image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise ValueError(f"layer {self.name!r}: set new_height and new_width together")
        if p.batch_size < 1:
            raise DataError(f"layer {self.name!r}: image_data_param.batch_size must be >= 1")
        lines = [(path, float(label)) for path, label in read_labelled_list(p.source, self.name)]
        self.transform = Transformer(param.transform_param, phase, self.rng, self.name)
        self._start_list(lines, "images")
        img = self._read_image(self.pos)
        c, h, w = self.transform.out_shape(img.shape[2], *img.shape[:2])
        self.shapes = [(p.batch_size, c, h, w), (p.batch_size,)][:len(param.top)]

    def load_batch(self):
        data, labels = [], []
        for _ in range(self.ip.batch_size):
            data.append(self.transform(self._read_image(self.pos)))
            labels.append(self.lines[self.pos][1])
            self._advance()
        shapes = {d.shape for d in data}
        if len(shapes) > 1:
            raise ValueError(f"layer {self.name!r}: images of different sizes {sorted(shapes)} in one batch; "
                             f"set new_height/new_width or a crop")
        return [np.stack(data), np.asarray(labels, np.float32)][:len(self.shapes)]
