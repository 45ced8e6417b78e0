"""Caffe's DataTransformer (transform_param) for HxWxC images in BGR order, and image reading.

Order per image, as the original: mirror coin, scale_factors choice, pad (with a label or second image only),
crop (random in TRAIN, centred in TEST), then (pixel - mean) * scale. Random numbers come from the
layer's numpy RandomState (seeded from random_seed), not Caffe's boost RNG, so random crops and
mirrors differ from the original's draws (their distribution is the same).
"""
from pathlib import Path

import numpy as np
from PIL import Image

from caffe_layers.errors import DataError
from caffe_layers.formats.proto import TRAIN, pb


def load_mean(path, layer_name):
    """A mean .binaryproto (BlobProto) as a (C, H, W) float32 array."""
    from caffe_layers.training.solver import blob_array

    blob = pb.BlobProto()
    try:
        blob.ParseFromString(Path(path).read_bytes())
    except OSError as err:
        raise FileNotFoundError(f"layer {layer_name!r}: cannot read mean_file {path!r}: {err}") from None
    except Exception as err:
        raise ValueError(f"layer {layer_name!r}: mean_file {path!r} is not a BlobProto ({err})") from None
    array = blob_array(blob, path)
    return array.reshape(array.shape[-3:]) if array.ndim >= 3 else array


_MAX_PIXELS = 2**31 - 1  # more than OpenCV's imread or a Caffe blob takes


def _open_image(path, mode, what, layer_name, new_height, new_width, resample):
    """A Pillow image in `mode`, resized when both sizes are given; any failure to decode it
    (Pillow raises many kinds) or to allocate it is a DataError naming the layer and the file."""
    if new_height > 0 and new_width > 0 and new_height * new_width > _MAX_PIXELS:
        raise DataError(f"layer {layer_name!r}: new_height x new_width {new_height}x{new_width} is "
                        f"too large")
    try:
        img = Image.open(path)
        img = img.convert(mode) if img.mode != mode else img
        if new_height > 0 and new_width > 0:
            img = img.resize((new_width, new_height), resample)
        return np.asarray(img)
    except FileNotFoundError as err:
        raise DataError(f"layer {layer_name!r}: {what} {str(path)!r} not found") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"layer {layer_name!r}: {what} {str(path)!r} is too large to decode: {err}") from err
    except MemoryError as err:
        raise DataError(f"layer {layer_name!r}: {what} {str(path)!r}: out of memory while decoding "
                        f"or resizing it") from err
    except Exception as err:
        raise DataError(f"layer {layer_name!r}: could not load {what} {str(path)!r}: "
                        f"{type(err).__name__}: {err}") from err


def read_image(path, new_height=0, new_width=0, is_color=True, layer_name="?"):
    """An image as HxWxC uint8 in BGR order (OpenCV's imread), resized when both sizes are given.

    Deviation: Pillow's bilinear resize, not OpenCV's (they differ slightly when shrinking).
    """
    a = _open_image(path, "RGB" if is_color else "L", "image", layer_name, new_height, new_width,
                    Image.BILINEAR)
    return a[:, :, ::-1].copy() if is_color else a[:, :, None].copy()


def read_label_image(path, new_height=0, new_width=0, layer_name="?"):
    """A label map as HxW uint8 (palette indices for palette PNGs, as OpenCV's grayscale read of
    VOC labels is not; the original reads them with cv::imread gray, which VOC's own scripts avoid
    by storing plain index PNGs)."""
    mode = None
    try:
        with Image.open(path) as probe:
            mode = probe.mode if probe.mode in ("L", "P") else "L"
    except Exception:
        mode = "L"  # _open_image reports the failure
    return _open_image(path, mode, "label", layer_name, new_height, new_width,
                       Image.NEAREST).astype(np.uint8)


def saturate_uint8(value):
    """OpenCV's saturate_cast<uchar>: what a label value becomes in an 8-bit label map."""
    return min(max(int(value), 0), 255)


class Transformer:
    def __init__(self, param, phase, rng, layer_name="?"):
        self.p, self.phase, self.rng, self.name = param, phase, rng, layer_name
        if param.force_color and param.force_gray:
            raise ValueError(f"layer {layer_name!r}: cannot set both force_color and force_gray")
        if param.HasField("mean_file") and len(param.mean_value):
            raise ValueError(f"layer {layer_name!r}: give mean_file or mean_value, not both")
        if param.HasField("crop_size") and (param.HasField("crop_height") or param.HasField("crop_width")):
            raise ValueError(f"layer {layer_name!r}: give crop_size or crop_height and crop_width")
        self.crop_h = param.crop_height if param.HasField("crop_height") else param.crop_size
        self.crop_w = param.crop_width if param.HasField("crop_width") else param.crop_size
        self.mean = load_mean(param.mean_file, layer_name) if param.HasField("mean_file") else None
        self.mean_values = list(param.mean_value)

    def out_shape(self, channels, height, width):
        if self.crop_h and self.crop_w:
            return channels, self.crop_h, self.crop_w
        return channels, height, width

    def _rand(self, n):
        return int(self.rng.randint(n))

    def __call__(self, img, seg=None, ignore_label=255):
        """(C, H', W') float32 data, and the (H', W') float32 label when `seg` is given (an HxWxC `seg`,
        TwoImageData's second image, comes back (H', W', C))."""
        img = np.asarray(img, dtype=np.float64)
        if img.ndim == 2:
            img = img[:, :, None]
        channels = img.shape[2]
        mirror = bool(self.p.mirror) and self._rand(2) == 1
        if seg is not None and len(self.p.scale_factors):
            factor = self.p.scale_factors[self._rand(len(self.p.scale_factors))]
            if factor != 1:
                h, w = int(img.shape[0] * factor), int(img.shape[1] * factor)
                img = np.stack([np.asarray(Image.fromarray(img[:, :, c].astype(np.float32)).resize(
                    (w, h), Image.BILINEAR)) for c in range(channels)], axis=2).astype(np.float64)
                seg = np.asarray(Image.fromarray(seg).resize((w, h), Image.NEAREST))
        means = self.mean_values
        if means and len(means) not in (1, channels):
            raise ValueError(f"layer {self.name!r}: give 1 mean_value or {channels}, got {len(means)}")
        if len(means) == 1:
            means = means * channels
        height, width = img.shape[:2]
        if seg is not None and self.crop_h:
            pad_h, pad_w = max(self.crop_h - height, 0), max(self.crop_w - width, 0)
            if pad_h or pad_w:  # pad bottom/right with the mean (0 after subtraction) and ignore_label
                fill = np.array(means if means else [0.0] * channels)
                padded = np.empty((height + pad_h, width + pad_w, channels))
                padded[...] = fill
                padded[:height, :width] = img
                img = padded
                seg = np.pad(seg, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (seg.ndim - 2),
                             constant_values=saturate_uint8(ignore_label) if seg.dtype == np.uint8
                             else ignore_label)
                height, width = img.shape[:2]
        h_off = w_off = 0
        if self.crop_h and self.crop_w:
            if height < self.crop_h or width < self.crop_w:
                raise ValueError(f"layer {self.name!r}: image {height}x{width} is smaller than the crop "
                                 f"{self.crop_h}x{self.crop_w}")
            if self.phase == TRAIN:
                h_off = self._rand(height - self.crop_h + 1)
                w_off = self._rand(width - self.crop_w + 1)
            else:
                h_off, w_off = (height - self.crop_h) // 2, (width - self.crop_w) // 2
            img = img[h_off:h_off + self.crop_h, w_off:w_off + self.crop_w]
            if seg is not None:
                seg = seg[h_off:h_off + self.crop_h, w_off:w_off + self.crop_w]
        data = img.astype(np.float32).transpose(2, 0, 1)
        if self.mean is not None:
            if self.mean.shape[0] != channels or self.mean.shape[1] < h_off + data.shape[1] \
                    or self.mean.shape[2] < w_off + data.shape[2]:
                raise ValueError(f"layer {self.name!r}: mean_file shape {list(self.mean.shape)} does not fit "
                                 f"a {channels}x{height}x{width} image")
            data = data - self.mean[:, h_off:h_off + data.shape[1], w_off:w_off + data.shape[2]]
        elif means:
            data = data - np.asarray(means, np.float32)[:, None, None]
        if self.p.scale != 1:
            data = data * np.float32(self.p.scale)
        if mirror:
            data = data[:, :, ::-1]
            seg = seg[:, ::-1] if seg is not None else None
        data = np.ascontiguousarray(data, dtype=np.float32)
        if seg is None:
            return data
        return data, np.ascontiguousarray(seg, dtype=np.float32)
