"""ImageSegData (DeepLab): images with label maps from "image label" lines; optional third top
with each image's (height, width) before cropping, clipped to the crop."""
import numpy as np

from caffe_layers.training.data import DataLayer, read_list
from caffe_layers.errors import DataError
from caffe_layers.training.data.transformer import Transformer, read_label_image, saturate_uint8
from caffe_layers.layers import register
from caffe_layers.formats.proto import pb


@register("ImageSegData")
class ImageSegData(DataLayer):
    exact_bottoms = 0  # tops: 3, but AutoTopBlobs lets a net give 2 (checked below)

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = self.ip = param.image_data_param
        if param.transform_param.HasField("mean_file"):
            raise ValueError(f"layer {self.name!r}: ImageSegData does not support mean_file")
        if (p.new_height > 0) != (p.new_width > 0):
            raise ValueError(f"layer {self.name!r}: set new_height and new_width together")
        if len(param.top) not in (2, 3):
            raise ValueError(f"layer {self.name!r}: ImageSegData has tops data, label and optionally data_dim")
        columns = 1 if p.label_type == pb.ImageDataParameter.NONE else 2
        if p.batch_size < 1:
            raise DataError(f"layer {self.name!r}: image_data_param.batch_size must be >= 1")
        lines = [(r[0], r[1] if len(r) > 1 else "") for r in read_list(p.source, self.name, columns)]
        self.transform = Transformer(param.transform_param, phase, self.rng, self.name)
        if p.label_type == pb.ImageDataParameter.IMAGE:
            for n, (_, label) in enumerate(lines, 1):
                if not label.lstrip("+-").isdigit():
                    raise DataError(f"layer {self.name!r}: {p.source}: entry {n}: the image label "
                                    f"{label!r} is not an integer")
        self._start_list(lines, "images")
        img = self._read_image(0)
        c, h, w = self.transform.out_shape(img.shape[2], *img.shape[:2])
        self.shapes = [(p.batch_size, c, h, w), (p.batch_size, 1, h, w), (p.batch_size, 1, 1, 2)]
        self.shapes = self.shapes[:len(param.top)]

    def load_batch(self):
        p = self.ip
        _, _, max_h, max_w = self.shapes[0]
        data, labels, dims = [], [], []
        for _ in range(p.batch_size):
            img = self._read_image(self.pos)
            dims.append([min(max_h, img.shape[0]), min(max_w, img.shape[1])])
            if p.label_type == pb.ImageDataParameter.PIXEL:
                seg = read_label_image(p.root_folder + self.lines[self.pos][1], p.new_height, p.new_width,
                                       self.name)
                if seg.shape != img.shape[:2]:
                    raise ValueError(f"layer {self.name!r}: label {self.lines[self.pos][1]} is "
                                     f"{seg.shape}, image is {img.shape[:2]}")
            else:  # IMAGE: one label for the whole image; NONE: ignore_label everywhere
                value = int(self.lines[self.pos][1]) if p.label_type == pb.ImageDataParameter.IMAGE \
                    else p.ignore_label
                seg = np.full(img.shape[:2], saturate_uint8(value), np.uint8)  # an 8-bit map, as cv::Mat
            d, l = self.transform(img, seg, p.ignore_label)
            if d.shape[1:] != (max_h, max_w):
                raise ValueError(f"layer {self.name!r}: image {self.lines[self.pos][0]} gives {d.shape[1:]}, "
                                 f"expected {(max_h, max_w)}; set a crop size")
            data.append(d)
            labels.append(l[None])
            self._advance()
        out = [np.stack(data), np.stack(labels), np.asarray(dims, np.float32).reshape(-1, 1, 1, 2)]
        return out[:len(self.shapes)]
