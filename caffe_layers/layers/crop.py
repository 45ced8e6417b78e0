"""Crop: bottom[0] cut to bottom[1]'s shape on the axes from `axis` on, starting at `offset`."""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis


@register("Crop")
class Crop(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.crop_param
        self.what = f"layer {param.name!r} (Crop)"
        if len(bottom_shapes) != 2:
            raise ValueError(f"{self.what}: needs 2 bottoms (data, reference shape), got {len(bottom_shapes)}")
        ndim = len(bottom_shapes[0])
        self.axis = canonical_axis(p.axis, ndim, param.name)
        if len(p.offset) > 1 and self.axis + len(p.offset) != ndim:
            raise ValueError(f"{self.what}: {len(p.offset)} offsets given; the number of offsets must be 1 or "
                             f"the number of axes from axis {self.axis} on ({ndim - self.axis})")
        self.offsets = list(p.offset)

    def _offset(self, i):
        return 0 if not self.offsets else self.offsets[0 if len(self.offsets) == 1 else i - self.axis]

    def top_shapes(self, bottom_shapes):
        x, ref = (tuple(s) for s in bottom_shapes)
        if len(x) != len(ref):
            raise ValueError(f"{self.what}: bottoms must have the same number of axes, got {list(x)} and {list(ref)}")
        for i in range(self.axis, len(x)):
            if x[i] - self._offset(i) < ref[i]:
                raise ValueError(f"{self.what}: the crop for axis {i} is out of bounds: size {ref[i]} "
                                 f"at offset {self._offset(i)} in a bottom of size {x[i]}")
        return [x[:self.axis] + ref[self.axis:]]

    def forward(self, x, ref):
        for i in range(self.axis, x.dim()):
            x = x.narrow(i, self._offset(i), ref.shape[i])
        return x
