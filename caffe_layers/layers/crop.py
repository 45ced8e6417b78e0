"""Crop: bottom[0] cut to bottom[1]'s shape on the axes from `axis` on, starting at `offset`."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Crop")
class Crop(Layer):
    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.crop_param
        self.what = f"layer {param.name!r} (Crop)"
        ndim = len(bottom_shapes[0])
        self.axis = canonical_axis(p.axis, ndim, param.name)
        if len(p.offset) > 1 and self.axis + len(p.offset) != ndim:
            raise ValueError(f"{self.what}: {len(p.offset)} offsets given; the number of offsets must be 1 or "
                             f"the number of axes from axis {self.axis} on ({ndim - self.axis})")
        self.offsets = list(p.offset)

    def forward(self, x, ref):
        if x.dim() != ref.dim():
            raise ValueError(f"{self.what}: bottoms must have the same number of axes, got "
                             f"{list(x.shape)} and {list(ref.shape)}")
        index = []
        for i in range(x.dim()):
            if i < self.axis:
                index.append(slice(None))
                continue
            off = 0 if not self.offsets else self.offsets[0 if len(self.offsets) == 1 else i - self.axis]
            if x.shape[i] - off < ref.shape[i]:
                raise ValueError(f"{self.what}: the crop for axis {i} is out of bounds: size {ref.shape[i]} "
                                 f"at offset {off} in a bottom of size {x.shape[i]}")
            index.append(slice(off, off + ref.shape[i]))
        return x[tuple(index)]
