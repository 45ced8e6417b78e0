"""DummyData: tops of given shapes filled by fillers (constant fillers fill once, others every forward)."""
import torch

from caffe_layers.layers.fillers import FILLERS, fill
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.errors import PrototxtError
from caffe_layers.formats.proto import check_blob_shape, pb


@register("DummyData")
class DummyData(Layer):
    exact_bottoms = 0
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.dummy_data_param
        tops = len(param.top)
        if len(p.data_filler) not in (0, 1, tops):
            raise ValueError(f"layer {self.name!r}: give 0, 1 or {tops} data_filler, got {len(p.data_filler)}")
        self.shapes = self._shapes(p, tops)
        for top, shape in zip(param.top, self.shapes):
            check_blob_shape(shape, f"layer {self.name!r}: top {top!r}", PrototxtError)
        if len(p.data_filler) == 0:
            fillers = [pb.FillerParameter(type="constant", value=0)]
        else:
            fillers = list(p.data_filler)
        for f in fillers:
            if f.type not in FILLERS:
                raise ValueError(f"layer {self.name!r}: unknown filler type {f.type!r}; known: {sorted(FILLERS)}")
        # top i uses filler i, or the single filler for every top
        self.fillers = [fillers[i] if len(fillers) > 1 else fillers[0] for i in range(tops)]
        self.register_buffer("_marker", torch.empty(0), persistent=False)
        # Caffe fills the constant tops once at setup and never again: a value written into such a
        # top stays there across forwards. Those tops are buffers returned as they are.
        self._constant = {}
        for i, (shape, f) in enumerate(zip(self.shapes, self.fillers)):
            if f.type == "constant":
                self.register_buffer(f"_top{i}", fill(shape, f), persistent=False)
                self._constant[i] = f"_top{i}"

    def _shapes(self, p, tops):
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if any(legacy):
            if len(p.shape):
                raise ValueError(f"layer {self.name!r}: give either shape or num/channels/height/width, not both")
            for field, values in zip(("num", "channels", "height", "width"), legacy):
                if len(values) not in (1, tops):
                    raise ValueError(f"layer {self.name!r}: give {field} once or once per top ({tops}), "
                                     f"got {len(values)}")
            return [tuple(v[0] if len(v) == 1 else v[i] for v in legacy) for i in range(tops)]
        if len(p.shape) not in (1, tops):
            raise ValueError(f"layer {self.name!r}: give shape once or once per top ({tops}), got {len(p.shape)}")
        return [tuple(p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(tops)]

    def top_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):
        tops = []
        for i, (shape, f) in enumerate(zip(self.shapes, self.fillers)):
            if i in self._constant:
                tops.append(getattr(self, self._constant[i]))
            else:
                tops.append(fill(shape, f, self._marker.dtype).to(self._marker.device))
        return tops[0] if len(tops) == 1 else tuple(tops)
