"""pycaffe's caffe.coord_map: how the spatial coordinates of one NetSpec top map onto another's.

A map is (axis, scale, shift): output coordinate = scale * input coordinate + shift, per spatial axis
from `axis` on (axis None: the map holds for any axis, as for pointwise layers). `crop(a, b)` makes the
Crop layer that aligns top `a` with top `b`.
"""
import numpy as np

from caffe_layers.pycaffe.net_spec import layers as L

# layers whose output pixel i sits over input pixel i
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN",
                       "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH",
                       "Threshold"]


class UndefinedMapException(Exception):
    """The layer has no coordinate map (InnerProduct, Reshape...)."""


class AxisMismatchException(Exception):
    """Two maps over different axes cannot be composed."""


def _vector(value):
    return np.array(value, ndmin=1)


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution, Deconvolution, Im2col or Pooling
    Function; the legacy *_h/*_w fields are refused."""
    params = fn.params.get("convolution_param", fn.params)
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(fn.params)
    assert not legacy, "cropping does not support legacy _h/_w params"
    kernel = _vector(params["kernel_size"])
    dilation = _vector(params.get("dilation", 1))
    return (params.get("axis", 1), _vector(params.get("stride", 1)), (kernel - 1) * dilation + 1,
            _vector(params.get("pad", 0)))


def crop_params(fn):
    """(axis, offset) of a Crop Function, with Crop's defaults (axis 2)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), _vector(params.get("offset", 0))


def coord_map(fn):
    """The map of one layer Function from its bottoms to its tops."""
    kind = fn.type_name
    if kind in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if kind == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if kind == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the map's axis is the last axis before the cropped ones
    raise UndefinedMapException(kind)


def compose(base_map, next_map):
    """`next_map` applied after `base_map`: scales multiply, the further shift is scaled by the base."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException(f"axis {ax1} vs {ax2}")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mappable_bottoms(top):
    """The bottoms whose coordinates a top's map relates; a Crop's second (reference) bottom is not."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _maps_to_ancestors(top, stop=None):
    """Walk down from `top`, composing maps: {ancestor top: map from top to it}. With `stop` (a dict),
    return (the first ancestor in it, its map) instead, or None."""
    maps = {top: (None, 1, 0)}
    frontier = {top}
    while frontier:
        current = frontier.pop()
        if stop is not None and current in stop:
            return current, maps[current]
        try:
            step = coord_map(current.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(current):
            maps[bottom] = compose(maps[current], step)
            frontier.add(bottom)
    return None if stop is not None else maps


def coord_map_from_to(top_from, top_to):
    """The map from the coordinates of `top_from` to those of `top_to`, through a common ancestor."""
    from_maps = _maps_to_ancestors(top_from)
    found = _maps_to_ancestors(top_to, stop=from_maps)
    if found is None:
        raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")
    common, to_map = found
    return compose(to_map, inverse(from_maps[common]))


def crop(top_from, top_to):
    """A Crop layer cropping `top_from` to the extent of `top_to`, its offsets from the coordinate map."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    assert (a == 1).all(), f"scale mismatch on crop (a = {a})"
    assert (b <= 0).all(), f"cannot crop negative offset (b = {b})"
    assert (np.round(b) == b).all(), f"cannot crop noninteger offset (b = {b})"
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis + 1, offset=list(-np.round(b).astype(int))))
