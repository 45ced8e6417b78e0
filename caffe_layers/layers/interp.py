"""Interp (DeepLab v2): align-corners bilinear resize of a cropped input (util/interp.cpp): torch's kernel in
float32, the original's loop as two matrices in other dtypes (float64 positions would differ in torch's kernel)."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, check_4d


def interp_matrix(size_in, offset, size_eff, size_out):
    """(size_out, size_in) weights of Caffe's caffe_cpu_interp2 along one axis.

    Positions are computed in float32 as the original does: r = float(eff - 1) / (out - 1),
    src = r * i, i0 = int(src), lambda = src - i0, neighbour i0 + 1 unless i0 is the last row.
    """
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    if size_eff == size_out:  # the original's special case: a plain copy of the crop
        m[rows, rows + offset] = 1.0
        return m
    ratio = (torch.tensor(float(size_eff - 1), dtype=torch.float32) / (size_out - 1)
             if size_out > 1 else torch.tensor(0.0, dtype=torch.float32))
    src = ratio * rows.to(torch.float32)
    i0 = src.to(torch.int64)  # truncation, as the C++ cast
    lam1 = (src - i0.to(torch.float32)).to(torch.float64)
    step = (i0 < size_eff - 1).to(torch.int64)
    m.index_put_((rows, offset + i0), 1.0 - lam1, accumulate=True)
    m.index_put_((rows, offset + i0 + step), lam1, accumulate=True)
    return m


@register("Interp")
class Interp(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.interp_param
        self.what = f"layer {param.name!r} (Interp)"
        if p.pad_beg > 0 or p.pad_end > 0:
            raise ValueError(f"{self.what}: only non-positive padding (cropping) is supported, "
                             f"got pad_beg {p.pad_beg}, pad_end {p.pad_end}")
        has = p.HasField
        if not ((has("shrink_factor") or has("zoom_factor")) or (has("height") and has("width"))):
            raise ValueError(f"{self.what}: give zoom_factor and/or shrink_factor, or both height and width")
        # plain values: forward reads no proto message (torch.compile cannot trace HasField)
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        self.shrink = p.shrink_factor if has("shrink_factor") else None
        self.zoom = p.zoom_factor if has("zoom_factor") else None
        self.fixed = (p.height, p.width) if has("height") and has("width") else None
        self.sizes(bottom_shapes[0])
        self._sizes = {}  # (height, width) -> sizes() and the crop's offset
        self._matrices = {}  # (height, width, dtype, device) -> the row matrix and the transposed column one

    def sizes(self, shape):
        """(eff_h, eff_w), (out_h, out_w) by the original's rules, in its order of precedence."""
        check_4d(shape, self.what)
        shrink, zoom = self.shrink, self.zoom
        eff = [shape[2] + self.pad_beg + self.pad_end, shape[3] + self.pad_beg + self.pad_end]
        if shrink is not None and zoom is None:
            self._check_factor("shrink_factor", shrink)
            out = [(e - 1) // shrink + 1 for e in eff]
        elif zoom is not None and shrink is None:
            self._check_factor("zoom_factor", zoom)
            out = [e + (e - 1) * (zoom - 1) for e in eff]
        elif self.fixed is not None:
            out = list(self.fixed)
        else:  # both factors
            self._check_factor("shrink_factor", shrink)
            self._check_factor("zoom_factor", zoom)
            out = [(e - 1) // shrink + 1 for e in eff]
            out = [o + (o - 1) * (zoom - 1) for o in out]
        # C++ integer division truncates toward zero; the sizes are checked positive below anyway
        if min(eff) <= 0 or min(out) <= 0:
            raise ValueError(f"{self.what}: input {list(shape)} gives cropped size {eff} and output size "
                             f"{out}; both must be positive")
        return eff, out

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        return [shape[:2] + tuple(self.sizes(shape)[1])]

    def _check_factor(self, name, value):
        if value < 1:
            raise ValueError(f"{self.what}: {name} must be positive, got {value}")

    def forward(self, x):
        if x.dtype == torch.float32:
            return self._bilinear(x)
        key = (x.shape[2], x.shape[3], x.dtype, x.device)
        matrices = self._matrices.get(key)
        if matrices is None:  # built once per input size
            eff, out = self.sizes(x.shape)
            off = -self.pad_beg  # the original crops pad_beg from the start of both axes
            matrices = self._matrices[key] = (
                interp_matrix(x.shape[2], off, eff[0], out[0]).to(device=x.device, dtype=x.dtype),
                interp_matrix(x.shape[3], off, eff[1], out[1]).to(device=x.device, dtype=x.dtype).t())
        rows, cols_t = matrices
        return torch.matmul(torch.matmul(rows, x), cols_t)

    def _bilinear(self, x):
        """float32: torch's align-corners bilinear kernel is the original's loop (positions r * i in float32,
        truncated, the neighbour clamped at the last row, lambda = position - index) on the crop."""
        crop, eff, out = self._crop(x)
        if eff == out:  # the original's special case: a plain copy of the crop
            return crop.clone(memory_format=torch.contiguous_format)
        return F.interpolate(crop, size=out, mode="bilinear", align_corners=True)

    def _crop(self, x):
        """(the crop of x, its size, the output size)"""
        size = (x.shape[2], x.shape[3])
        sizes = self._sizes.get(size)
        if sizes is None:  # the proto's rules once per input size (the original crops pad_beg from the start)
            sizes = self._sizes[size] = (*self.sizes(x.shape), -self.pad_beg)
        eff, out, off = sizes
        return x[:, :, off:off + eff[0], off:off + eff[1]], eff, out

    def forward_into(self, x, out):
        """forward(x) written into `out`, a tensor of the top's shape (a slice of a Concat's top in inference:
        engine/concat.py): the float32 kernel writes there itself."""
        if x.dtype != torch.float32:
            return out.copy_(self.forward(x))
        crop, eff, size = self._crop(x)
        if eff == size:
            return out.copy_(crop)
        return torch._C._nn.upsample_bilinear2d(crop, size, True, out=out)
