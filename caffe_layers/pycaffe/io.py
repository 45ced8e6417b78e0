"""pycaffe's caffe.io: input preprocessing (Transformer, load_image, resize_image) and blob/datum protos.

After `import caffe_layers as caffe`, `caffe.io.Transformer({'data': net.blobs['data'].data.shape})`
prepares images exactly as pycaffe scripts do, so their dumped references can be matched.
Images are read with Pillow and resized with scipy.ndimage the way scikit-image (>= 0.19) `resize` does
(pycaffe's own dependency), so no scikit-image is needed.
"""
import numpy as np
from scipy import ndimage

from caffe_layers.formats.proto import pb


# ---- protos ------------------------------------------------------------------------------------------------
def blobproto_to_array(blob, return_diff=False):
    """A BlobProto's data (or diff) as an array; legacy num/channels/height/width give 4 axes."""
    data = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None):
    """An N-d array (and optionally its diff, same shape) as a BlobProto with a `shape`."""
    arr = np.asarray(arr)
    blob = pb.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    vec = pb.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(a) for a in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data):
    vec = pb.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr, label=None):
    """A C x H x W array as a Datum: uint8 arrays as bytes, others as float_data."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum: expected a 3-axis C x H x W array, got shape {arr.shape}")
    datum = pb.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum):
    """A Datum's values as C x H x W (uint8 from `data`, else float64 from `float_data`); not the label."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data).astype(float).reshape(shape)


# ---- images ------------------------------------------------------------------------------------------------
def load_image(filename, color=True):
    """An image as float32 in [0, 1], H x W x 3 (RGB) or, with color=False, H x W x 1 (intensity)."""
    from PIL import Image

    with Image.open(filename) as im:
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        elif im.mode == "LA":
            im = im.convert("RGBA")
        arr = np.asarray(im)
    if arr.dtype == np.bool_:
        img = arr.astype(np.float64)
    elif arr.dtype.kind == "u":
        img = arr / float(np.iinfo(arr.dtype).max)  # skimage's img_as_float
    elif arr.dtype.kind == "i":  # Pillow's 32-bit integer mode "I" (16-bit PNGs): values 0..65535
        img = arr / 65535.0 if arr.max() > 255 else arr / 255.0
    else:
        img = arr.astype(np.float64)
    if not color and img.ndim == 3:
        img = img[:, :, :3] @ np.array([0.2125, 0.7154, 0.0721])  # skimage's rgb2gray weights
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _skimage_resize(im, new_dims, order):
    """skimage.transform.resize(im, new_dims, order=order, mode='constant') for an H x W x K float image:
    Gaussian anti-aliasing when shrinking (sigma = (factor - 1) / 2), grid-mode zoom, clipped to the input range."""
    out_shape = tuple(int(d) for d in new_dims) + im.shape[2:]
    factors = np.asarray(im.shape, dtype=float) / np.asarray(out_shape, dtype=float)
    image = im
    if any(o < i for o, i in zip(out_shape, im.shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        image = ndimage.gaussian_filter(im, sigma, cval=0, mode="constant")
    out = ndimage.zoom(image, 1 / factors, order=order, mode="grid-constant", cval=0, grid_mode=True)
    lo, hi = min(im.min(), 0), max(im.max(), 0)  # mode 'constant': the cval joins the clip range
    return np.clip(out, lo, hi)


def resize_image(im, new_dims, interp_order=1):
    """Resize an H x W x K image to new_dims (height, width), as pycaffe does: 1- and 3-channel images are
    standardised to [0, 1] and resized like skimage; other channel counts with scipy's zoom."""
    im = np.asarray(im)
    new_dims = tuple(int(d) for d in new_dims)
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if im_max > im_min:
            im_std = (im - im_min) / (im_max - im_min)
            resized = _skimage_resize(im_std, new_dims, interp_order) * (im_max - im_min) + im_min
        else:
            ret = np.empty(new_dims + (im.shape[-1],), dtype=np.float32)
            ret.fill(im_min)
            return ret
    else:
        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized = ndimage.zoom(im, scale + (1,), order=interp_order)
    return resized.astype(np.float32)


def oversample(images, crop_dims):
    """The four corner crops and the centre crop of each image, and their mirrors (10 per image)."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    h_idx = (0, im_shape[0] - crop_dims[0])
    w_idx = (0, im_shape[1] - crop_dims[1])
    crops_ix = [(i, j, i + crop_dims[0], j + crop_dims[1]) for i in h_idx for j in w_idx]
    c = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix.append(tuple(c.ravel()))
    crops_ix = np.array(crops_ix, dtype=int)
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    k = 0
    for im in images:
        for y0, x0, y1, x1 in crops_ix:
            crops[k] = im[y0:y1, x0:x1, :]
            k += 1
        crops[k:k + 5] = crops[k - 5:k, :, ::-1, :]
        k += 5
    return crops


# ---- Transformer ---------------------------------------------------------------------------------------------
class Transformer:
    """pycaffe's caffe.io.Transformer: `preprocess` turns an H x W x K image into the K x H x W blob
    (resize, transpose, channel swap, raw scale, mean subtraction, input scale, in that order)."""

    def __init__(self, inputs):
        # pycaffe compares shape[:2] with inputs[name][2:]: a list there never equals the tuple and
        # would resize every image; shapes are kept as tuples so equal sizes are left alone.
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale, self.mean, self.input_scale = {}, {}, {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise KeyError(f"Transformer: {name!r} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_, data):
        self._check(in_)
        caffe_in = np.asarray(data).astype(np.float32, copy=False)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        # pycaffe scales and subtracts in place, in float32; it thereby also overwrites the caller's
        # array when nothing above copied it. We work on a copy: same float32 numbers, input untouched.
        caffe_in = np.array(caffe_in, dtype=np.float32, copy=True)
        if in_ in self.raw_scale:
            caffe_in *= self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in -= self.mean[in_]
        if in_ in self.input_scale:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_, data):
        """Undo `preprocess` (except the resize)."""
        self._check(in_)
        out = np.array(data, copy=True).squeeze()
        if in_ in self.input_scale:
            out = out / self.input_scale[in_]
        if in_ in self.mean:
            out = out + self.mean[in_]
        if in_ in self.raw_scale:
            out = out / self.raw_scale[in_]
        if in_ in self.channel_swap:
            out = out[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            out = out.transpose(np.argsort(self.transpose[in_]))
        return out

    def set_transpose(self, in_, order):
        self._check(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ValueError(f"Transformer {in_!r}: transpose order {tuple(order)} needs "
                             f"{len(self.inputs[in_]) - 1} axes, as the input has")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_, order):
        self._check(in_)
        if len(order) != self.inputs[in_][1]:
            raise ValueError(f"Transformer {in_!r}: channel swap {tuple(order)} needs "
                             f"{self.inputs[in_][1]} entries, one per input channel")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_, scale):
        self._check(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """Per-channel values (K,) or a K x H x W (or H x W) mean, resized to the input like pycaffe."""
        self._check(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError(f"Transformer {in_!r}: mean has {ms[0]} channels, the input "
                                 f"{self.inputs[in_][1]}")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError(f"Transformer {in_!r}: mean shape {mean.shape} is not K, H x W or K x H x W")
            in_shape = self.inputs[in_][1:]
            if ms != in_shape:
                m_min, m_max = mean.min(), mean.max()
                normal = (mean - m_min) / (m_max - m_min)
                mean = resize_image(normal.transpose((1, 2, 0)), in_shape[1:]).transpose((2, 0, 1)) * \
                    (m_max - m_min) + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        self._check(in_)
        self.input_scale[in_] = scale
