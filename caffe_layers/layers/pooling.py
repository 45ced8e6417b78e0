"""Pooling: MAX, AVE, STOCHASTIC over 2-D windows, with Caffe's output size and window rules."""
import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, check_4d, leaf_function
from caffe_layers.formats.proto import TRAIN, pb
from caffe_layers.ops.geometry import flt_max

FLT_MIN = 1.1754943508222875e-38
PP = pb.PoolingParameter


def pooled_size(size, kernel, pad, stride, ceil_mode, padded=None):
    """Caffe's output size: ceil (or floor) of (size + 2 pad - kernel) / stride, plus one; when the layer
    pads (either axis: `padded`, default pad != 0) the last window must start inside the image or the
    left padding, else it is dropped."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if (pad if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool_channels_last(pool, x, *args, **kwargs):
    """torch's CPU pooling kernels vectorise over channels only in the channels-last layout (about 10x
    faster at 64 channels, slower at 3 or for a tiny blob): pool there and hand back the usual layout."""
    if x.device.type != "cpu" or x.shape[1] < 8 or x.numel() < 4096:
        return pool(x.contiguous(), *args, **kwargs)  # (a channels-last bottom: plan.mark_channels_last)
    out = pool(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    if isinstance(out, tuple):
        return tuple(t.contiguous() for t in out)
    return out.contiguous()


def _channels_last(x):
    """A channels-last 4-D tensor (a folded convolution's top in inference, engine/folding.py)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _call(pool, x, *args, **kwargs):
    return pool(x, *args, **kwargs)


def _check_pool_input(x, smallest, what):
    if x.dim() != 4 or x.shape[2] < smallest[0] or x.shape[3] < smallest[1]:
        raise ValueError(f"{what}: input {list(x.shape)} does not fit: needs 4 axes and at least "
                         f"{list(smallest)} (height, width)")


class _MaskedMaxPool(torch.autograd.Function):
    """MAX pooling with Caffe's mask backward: each top diff is added at its window's argmax (the forward's
    index, h * W + w in its plane) of a zeroed bottom diff, in the bottom's own layout. torch's backward
    would scatter in the channels-last layout the forward pooled in and hand a plain-layout conv1 a
    channels-last diff (three layout copies of the largest blob a training iteration). The top is in the
    plain layout, or channels-last where `channels_last_top` (every reader takes that layout:
    plan.mark_channels_last). Values and gradients are those of max_pool2d(...).clamp_min(-FLT_MAX): nothing
    below Caffe's -FLT_MAX start (-inf, NaN) gets a diff."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad, ceil_mode, channels_last_top=False):
        ctx.plain_input = x.is_contiguous()
        if channels_last_top:
            x = x.contiguous(memory_format=torch.channels_last)
        pool = pool_channels_last if ctx.plain_input and not channels_last_top else _call
        top, index = pool(F.max_pool2d, x, kernel, stride, pad, ceil_mode=ceil_mode, return_indices=True)
        low = -flt_max(x.dtype)
        alive = None
        if not top.min() >= low:  # (NaN compares false: also this path) rare: then the clamp and its mask
            alive = top >= low
            top = top.clamp_min(low)
        ctx.save_for_backward(index, alive, None if ctx.plain_input else x)
        ctx.bottom_shape, ctx.settings = x.shape, (kernel, stride, pad, ceil_mode)
        return top if channels_last_top or top.is_contiguous() else top.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        index, alive, x = ctx.saved_tensors
        if alive is not None:
            grad = grad * alive
        if ctx.plain_input:
            N, C, H, W = ctx.bottom_shape
            diff = grad.new_zeros((N, C, H * W))
            diff.scatter_add_(2, index.reshape(N, C, -1), grad.reshape(N, C, -1))
            return diff.view(N, C, H, W), None, None, None, None, None
        # a channels-last bottom: torch's kernel makes the same additions in the same order, in that layout
        kernel, stride, pad, ceil_mode = (list(v) if isinstance(v, tuple) else v for v in ctx.settings)
        diff = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, pad, [1, 1], ceil_mode, index)
        return diff, None, None, None, None, None


def max_pool_clamped(x, kernel, stride, pad, ceil_mode, channels_last_top=False):
    """torch's max_pool2d clamped at Caffe's -FLT_MAX start (every torch window overlaps the image here;
    only -inf inputs fall below it); where a gradient will be taken, through _MaskedMaxPool."""
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _MaskedMaxPool.apply(x, kernel, stride, pad, ceil_mode, channels_last_top)
    return pool_channels_last(F.max_pool2d, x, kernel, stride, pad, ceil_mode=ceil_mode).clamp_min(-flt_max(x.dtype))


@leaf_function
def caffe_max_pool(x, kernel, stride, pad, ceil_mode, smallest, what):
    """Caffe's MAX pooling (no mask top) through torch's kernel, for settings where torch's windows are
    Caffe's at every input size (Pooling.lowered); `smallest` is the least input size giving a window."""
    _check_pool_input(x, smallest, what)
    eager_inference = not (torch.is_grad_enabled() and x.requires_grad or torch.compiler.is_compiling())
    if eager_inference and x.device.type == "cpu" and _channels_last(x):  # pooled there, the layout kept
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode).clamp_min_(-flt_max(x.dtype))
    if eager_inference and x.device.type == "cpu" and x.numel() >= SEPARABLE_MIN_NUMEL:  # (no size guard)
        return separable_max_pool(x, kernel, stride, pad, ceil_mode)
    return max_pool_clamped(x, kernel, stride, pad, ceil_mode)


@leaf_function
def caffe_max_pool_channels_last(x, kernel, stride, pad, ceil_mode, smallest, what):
    """caffe_max_pool for a layer whose readers take channels-last bottoms (plan.mark_channels_last): under
    autograd on the CPU its top stays in the channels-last layout it pools in."""
    _check_pool_input(x, smallest, what)
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _MaskedMaxPool.apply(x, kernel, stride, pad, ceil_mode, True)
    return caffe_max_pool(x, kernel, stride, pad, ceil_mode, smallest, what)


# From about this size on (one thread) the separable maximum beats the channels-last round trip on CPU (an
# input already channels-last pools there: 4x faster than separably, res129's pool1)
SEPARABLE_MIN_NUMEL = 1 << 17


def _window_max_along(x, dim, kernel, stride, pad, out):
    """The maximum over each window along one axis, from -FLT_MAX (Caffe's start): one elementwise maximum per
    tap, between the output and a strided view of the input (no padded copy, no layout change)."""
    size = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = out
    result = x.new_full(shape, -flt_max(x.dtype))
    for tap in range(kernel):  # output i reads input i * stride - pad + tap where that lies in the image
        first = max(0, -(-(pad - tap) // stride))
        last = min(out - 1, (size - 1 + pad - tap) // stride)
        if last < first:
            continue
        taps = x.narrow(dim, first * stride - pad + tap, (last - first) * stride + 1)
        taps = taps[(slice(None),) * dim + (slice(None, None, stride),)]
        result.narrow(dim, first, last - first + 1).clamp_min_(taps)  # (an elementwise maximum, NaN kept)
    return result


def separable_max_pool(x, kernel, stride, pad, ceil_mode):
    """caffe_max_pool's values (the maximum of a window is the maximum over its rows of the maxima over its
    columns, NaN propagating as in torch's kernel) in two passes over NCHW. Inference only: at ties the
    elementwise maximum's gradient is shared, Caffe's goes to the first maximum."""
    rows = _window_max_along(x, 2, kernel[0], stride[0], pad[0],
                             torch_pooled_size(x.shape[2], kernel[0], pad[0], stride[0], ceil_mode))
    return _window_max_along(rows, 3, kernel[1], stride[1], pad[1],
                             torch_pooled_size(x.shape[3], kernel[1], pad[1], stride[1], ceil_mode))


@leaf_function
def caffe_ave_pool(x, kernel, stride, pad, ceil_mode, smallest, what):
    """Caffe's AVE pooling as caffe_max_pool: torch's divisor is Caffe's, the window clipped to the padded
    image."""
    _check_pool_input(x, smallest, what)
    return pool_channels_last(F.avg_pool2d, x, kernel, stride, pad, ceil_mode, True)


def torch_pooled_size(size, kernel, pad, stride, ceil_mode):
    """The output size of torch's pooling kernels (which always drop a last window starting past the
    image and left padding in ceil mode)."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register("Pooling")
class Pooling(Layer):
    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.pooling_param
        self.what = what = f"layer {param.name!r} (Pooling)"
        has = p.HasField
        self.method = p.pool
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if has("kernel_size") or has("kernel_h") or has("kernel_w"):
                raise ValueError(f"{what}: with global_pooling: true the filter size cannot be specified")
        else:
            if has("kernel_size") == (has("kernel_h") and has("kernel_w")):
                raise ValueError(f"{what}: give kernel_size, or kernel_h and kernel_w; not both, not neither")
        if not ((not has("pad") and has("pad_h") and has("pad_w")) or (not has("pad_h") and not has("pad_w"))):
            raise ValueError(f"{what}: pad is pad OR pad_h and pad_w")
        if not ((not has("stride") and has("stride_h") and has("stride_w"))
                or (not has("stride_h") and not has("stride_w"))):
            raise ValueError(f"{what}: stride is stride OR stride_h and stride_w")
        if has("kernel_size"):
            self.kernel = (p.kernel_size, p.kernel_size)
        else:
            self.kernel = (p.kernel_h, p.kernel_w)
        self.pad = (p.pad_h, p.pad_w) if has("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if has("stride_h") else (p.stride, p.stride)
        self.ceil_mode = p.round_mode == PP.CEIL and p.ceil_mode  # ceil_mode: OpenCV's proto (false: floor)
        if len(bottom_shapes[0]) != 4:
            raise ValueError(f"{what}: needs a bottom with 4 axes (num, channels, height, width), "
                             f"got {list(bottom_shapes[0])}")
        if self.global_pooling:
            self.kernel = tuple(bottom_shapes[0][2:])
            if self.pad != (0, 0) or self.stride != (1, 1):
                raise ValueError(f"{what}: with global_pooling: true only pad = 0 and stride = 1")
        if min(self.kernel) <= 0:
            raise ValueError(f"{what}: filter dimensions cannot be zero, got kernel {list(self.kernel)}")
        if min(self.stride) <= 0:
            raise ValueError(f"{what}: stride must be positive, got {list(self.stride)}")
        if self.pad != (0, 0):
            if self.method not in (PP.AVE, PP.MAX):
                raise ValueError(f"{what}: padding is implemented only for AVE and MAX pooling")
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise ValueError(f"{what}: pad {list(self.pad)} must be smaller than kernel {list(self.kernel)}")
        if len(param.top) > (2 if self.method == PP.MAX else 1):
            raise ValueError(f"{what}: at most {2 if self.method == PP.MAX else 1} tops for this method "
                             f"(MAX may output its argmax mask as a second top), got {len(param.top)}")
        self.mask_top = len(param.top) == 2  # MAX's second top: the argmax positions
        self.out_size(bottom_shapes[0])
        self._plans = {}  # input (height, width) -> (kernel, output size, whether torch's kernels fit)
        # global pooling reads each plane once: the layout change would cost more than it saves
        self._pool = _call if self.global_pooling else pool_channels_last
        self._lowered = self._torch_at_every_size()
        self.takes_channels_last = self._lowered is not None  # (its tops are in the plain layout: see below)

    def keep_channels_last(self):
        """A TRAIN-phase MAX pooling through torch's kernel hands its top on channels-last under autograd on
        the CPU (plan.mark_channels_last: every reader takes that layout)."""
        if self.phase != TRAIN or self._lowered is None or self._lowered[0] is not caffe_max_pool:
            return False
        self._lowered = (caffe_max_pool_channels_last, self._lowered[1])
        return True

    def _torch_at_every_size(self):
        """(function, arguments) of caffe_max_pool / caffe_ave_pool where torch's kernels give Caffe's
        windows at every input size: pad <= kernel / 2, and in ceil mode without padding stride <= kernel
        (else torch may drop a last window starting past the image that Caffe keeps). None otherwise."""
        if self.global_pooling or self.mask_top or self.method not in (PP.MAX, PP.AVE):
            return None
        if any(2 * p > k for p, k in zip(self.pad, self.kernel)):
            return None
        if self.ceil_mode and self.pad == (0, 0) and any(s > k for s, k in zip(self.stride, self.kernel)):
            return None
        # Caffe's output size is at least 1 from these input sizes on (its ceil keeps a partial window)
        smallest = tuple(max(1, k - 2 * p + (1 - s if self.ceil_mode else 0))
                         for k, p, s in zip(self.kernel, self.pad, self.stride))
        pool = caffe_max_pool if self.method == PP.MAX else caffe_ave_pool
        return pool, (self.kernel, self.stride, self.pad, self.ceil_mode, smallest, self.what)

    def lowered(self):
        return self._lowered

    def out_size(self, shape):
        check_4d(shape, self.what)
        kernel = tuple(shape[2:]) if self.global_pooling else self.kernel
        padded = self.pad != (0, 0)
        out = tuple(pooled_size(shape[2 + i], kernel[i], self.pad[i], self.stride[i], self.ceil_mode, padded)
                    for i in range(2))
        if min(out) <= 0:
            raise ValueError(f"{self.what}: input {list(shape)} is smaller than the kernel {list(kernel)}")
        return kernel, out

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        return [shape[:2] + self.out_size(shape)[1]] * (2 if self.mask_top else 1)

    def _torch_fits(self, kernel, out, shape):
        """Whether torch's kernels compute Caffe's windows: torch takes pad <= kernel / 2 and may give
        fewer windows than Caffe (ceil mode without padding, stride > kernel)."""
        return all(2 * self.pad[i] <= kernel[i] and out[i] == torch_pooled_size(
            shape[2 + i], kernel[i], self.pad[i], self.stride[i], self.ceil_mode) for i in range(2))

    def _windows(self, x, kernel, out, value):
        """View (N, C, oh, ow, kh, kw) of the windows; outside the image reads `value`."""
        (kh, kw), (oh, ow), (ph, pw), (sh, sw) = kernel, out, self.pad, self.stride
        H, W = x.shape[2:]
        # Windows that start past the image (a stride far above the kernel) read only `value`: they are
        # padded onto the result, not read from an input padded to reach them (that could be gigabytes).
        nh, nw = min(oh, -(-(H + ph) // sh)), min(ow, -(-(W + pw) // sw))
        bottom = max((nh - 1) * sh + kh - H - ph, 0)
        right = max((nw - 1) * sw + kw - W - pw, 0)
        xp = F.pad(x, (pw, right, ph, bottom), value=value)
        win = xp.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :nh, :nw]
        if (nh, nw) != (oh, ow):
            win = F.pad(win, (0, 0, 0, 0, 0, ow - nw, 0, oh - nh), value=value)
        return win

    def forward(self, x):
        if self._lowered is not None:
            pool, args = self._lowered
            return pool(x, *args)
        size = (x.shape[2], x.shape[3])
        plan = self._plans.get(size)
        if plan is None:  # Python arithmetic once per input size
            kernel, out = self.out_size(x.shape)
            plan = self._plans[size] = kernel, out, self._torch_fits(kernel, out, x.shape)
        kernel, out, fast = plan
        if self.method == PP.MAX:
            return self._max_torch(x, kernel) if fast else self._max(x, kernel, out)
        if self.method == PP.AVE:
            if fast:  # torch's divisor is Caffe's: the window clipped to the padded image
                return self._pool(F.avg_pool2d, x, kernel, self.stride, self.pad, self.ceil_mode,
                                  count_include_pad=True)
            return self._ave(x, kernel, out)
        return self._stochastic(x, kernel, out)

    def _max_torch(self, x, kernel):
        # Every torch window overlaps the image here; only -inf inputs fall below Caffe's start, -FLT_MAX.
        if not self.mask_top and self._pool is pool_channels_last:
            return max_pool_clamped(x, kernel, self.stride, self.pad, self.ceil_mode)
        if not self.mask_top:
            return self._pool(F.max_pool2d, x, kernel, self.stride, self.pad,
                              ceil_mode=self.ceil_mode).clamp_min(-flt_max(x.dtype))
        val, idx = self._pool(F.max_pool2d, x, kernel, self.stride, self.pad, ceil_mode=self.ceil_mode,
                              return_indices=True)
        mask = torch.where(val > -flt_max(x.dtype), idx, -1).to(x.dtype)  # torch's index is Caffe's h * W + w
        return val.clamp_min(-flt_max(x.dtype)), mask

    def _max(self, x, kernel, out):
        win = self._windows(x, kernel, out, float("-inf"))
        val, idx = win.flatten(4).max(-1)  # first maximum, as Caffe's strict '>'
        # Caffe starts from -FLT_MAX; a window with nothing above it gives -FLT_MAX, mask -1, no gradient.
        top = val.clamp_min(-flt_max(x.dtype))
        if not self.mask_top:
            return top
        (kh, kw), (ph, pw), (sh, sw) = kernel, self.pad, self.stride
        rows = torch.arange(out[0], device=x.device).view(-1, 1) * sh - ph + torch.div(idx, kw, rounding_mode="floor")
        cols = torch.arange(out[1], device=x.device).view(1, -1) * sw - pw + idx % kw
        mask = torch.where(val > -flt_max(x.dtype), rows * x.shape[3] + cols, torch.full_like(idx, -1))
        return top, mask.to(x.dtype)

    def _ave(self, x, kernel, out):
        win = self._windows(x, kernel, out, 0.0)
        # Caffe divides by the window clipped to the padded image (not to the image): AVE quirk.
        sizes = []
        for i in range(2):
            size, starts = x.shape[2 + i], torch.arange(out[i]) * self.stride[i] - self.pad[i]
            ends = torch.clamp(starts + kernel[i], max=size + self.pad[i])
            sizes.append(ends - starts)
        pool_size = (sizes[0].view(-1, 1) * sizes[1].view(1, -1)).to(device=x.device, dtype=x.dtype)
        return win.sum((-2, -1)) / pool_size

    def _stochastic(self, x, kernel, out):
        # No padding here (Caffe forbids it); windows are clipped to the image (zeros add nothing).
        win = self._windows(x, kernel, out, 0.0)
        flat = win.reshape(win.shape[:4] + (-1,))
        if self.phase == TRAIN:
            # Sample a position with probability proportional to its value: the first one whose running
            # sum reaches u * total (Caffe's StoPoolForwardTrain); the gradient goes to that position.
            cumsum = flat.cumsum(-1)
            thres = torch.rand(cumsum.shape[:4], dtype=x.dtype, device=x.device) * cumsum[..., -1]
            pick = (cumsum >= thres.unsqueeze(-1)).to(x.dtype).argmax(-1, keepdim=True)
            return flat.gather(-1, pick).squeeze(-1)
        # TEST: sum x^2 / sum x (running sum started at FLT_MIN). Backward here is the true gradient;
        # Caffe's TEST backward reads stale sample indices from the last TRAIN forward (deviation).
        return (flat * flat).sum(-1) / (flat.sum(-1) + FLT_MIN)
