"""TwoImageData (segaware fork, first commit a758ed3): pairs of images from "first second" lines,
both transformed alike (DataTransformer::TransformBoth): one mirror coin and one crop for the pair.

Behaviour of the original kept here:
- Only the first image gets mean subtraction and scale; the second is copied as read (0..255).
- Images smaller than crop_size are padded at the bottom/right: the first with the mean values, the
  second with 255 whatever ignore_label is (the original hard-codes it).
- Both images are read with cv::imread and resized with cv::resize (bilinear) when new_height/new_width
  are set, so a label map given as the second image is interpolated too.
- Only crop_size is read (not crop_height/crop_width) and there are no scale_factors.
Deviations: a palette PNG as a gray second image gives its palette indices (as ImageSegData here),
where OpenCV would give the palette colours' luminance; random draws come from numpy (see
data/transformer.py). When padding is needed and no mean_value is given the original reads past its
mean vector; here the padding is 0.
"""
import numpy as np
from PIL import Image

from caffe_layers.training.data import DataLayer, read_list
from caffe_layers.training.data.transformer import Transformer, read_image
from caffe_layers.layers import register
from caffe_layers.formats.proto import pb


def read_second(path, new_height, new_width, is_color, layer_name):
    """The second image as HxWxC uint8 (BGR when colour), resized bilinearly as cv::resize would."""
    if is_color:
        return read_image(path, new_height, new_width, True, layer_name)
    try:
        img = Image.open(path)
        a = np.asarray(img) if img.mode in ("L", "P") else np.asarray(img.convert("L"))
    except OSError as err:
        raise ValueError(f"layer {layer_name!r}: could not load image {str(path)!r}: {err}") from None
    if new_height > 0 and new_width > 0:
        a = np.asarray(Image.fromarray(a.astype(np.uint8), "L").resize((new_width, new_height), Image.BILINEAR))
    return a[:, :, None].astype(np.uint8)


@register("TwoImageData")
class TwoImageData(DataLayer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = self.ip = param.image_data_param
        self.tp = param.transform_param
        q = param.two_image_data_param
        self.colors = (q.first_is_color, q.second_is_color)
        if (p.new_height > 0) != (p.new_width > 0):
            raise ValueError(f"layer {self.name!r}: set new_height and new_width together")
        if p.batch_size < 1:
            raise ValueError(f"layer {self.name!r}: image_data_param.batch_size must be >= 1")
        if len(param.top) not in (1, 2):
            raise ValueError(f"layer {self.name!r}: TwoImageData has tops data and optionally label")
        if self.tp.HasField("crop_height") or self.tp.HasField("crop_width") or len(self.tp.scale_factors):
            raise ValueError(f"layer {self.name!r}: TwoImageData reads crop_size only (no crop_height/"
                             f"crop_width/scale_factors)")
        tp = pb.TransformationParameter()
        tp.CopyFrom(self.tp)
        tp.ClearField("force_color")  # TransformBoth neither reads nor checks force_color/force_gray
        self.transform = Transformer(tp, phase, self.rng, self.name)
        self._start_list([(r[0], r[1]) for r in read_list(p.source, self.name, 2)], "lines")
        img, lab = self._read(self.pos)
        crop = self.tp.crop_size
        size = (crop, crop) if crop else img.shape[:2]
        self.shapes = [(p.batch_size, img.shape[2], *size), (p.batch_size, lab.shape[2], *size)]
        self.shapes = self.shapes[:len(param.top)]

    def _read(self, i):
        p = self.ip
        first, second = self.lines[i]
        img = read_image(p.root_folder + first, p.new_height, p.new_width, self.colors[0], self.name)
        lab = read_second(p.root_folder + second, p.new_height, p.new_width, self.colors[1], self.name)
        if img.shape[:2] != lab.shape[:2]:
            raise ValueError(f"layer {self.name!r}: {second} is {lab.shape[:2]}, {first} is {img.shape[:2]}; "
                             f"the two images must have the same size")
        return img, lab

    def transform_both(self, img, lab):
        """TransformBoth: (C, H', W') float32 data and (C2, H', W') float32 second image."""
        mean = self.transform.mean
        if mean is not None:
            # the original indexes the mean with the image's own (padded) size
            crop = self.tp.crop_size
            size = [img.shape[2], max(img.shape[0], crop), max(img.shape[1], crop)]
            if list(mean.shape) != size:
                raise ValueError(f"layer {self.name!r}: mean_file shape {list(mean.shape)} must equal "
                                 f"the image's {size}")
        # the second image is padded with 255 whatever ignore_label is, and gets no mean nor scale
        data, second = self.transform(img, lab, ignore_label=255)
        return data, np.ascontiguousarray(second.transpose(2, 0, 1))

    def load_batch(self):
        p = self.ip
        data, labels = [], []
        for _ in range(p.batch_size):
            d, l = self.transform_both(*self._read(self.pos))
            if data and (d.shape != data[0].shape or l.shape != labels[0].shape):
                raise ValueError(f"layer {self.name!r}: {self.lines[self.pos][0]} gives {d.shape}, the batch's "
                                 f"first image {data[0].shape}; set crop_size or new_height/new_width")
            data.append(d)
            labels.append(l)
            self._advance()
        return [np.stack(data), np.stack(labels)][:len(self.shapes)]
