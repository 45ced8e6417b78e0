"""Native kernels (cuda/*.cpp, cuda/*.cu): loading, dispatch by device, autograd Functions.

caffe_layers.native._native_cpu (C++, OpenMP) is always built; caffe_layers.native._native_cuda only where nvcc was
found at install time. Both take raw pointers (tensor.data_ptr()) of contiguous float32/float64 NCHW
tensors; the CUDA one also takes the current stream. CPU tensors go to the C++ kernels, CUDA tensors to
the CUDA ones; when a module is missing the pure-PyTorch references in caffe_layers/ops run instead,
after a one-line warning. `disabled()` forces the references (tests, benchmarks).
"""
import contextlib
import importlib
import warnings

import torch

from caffe_layers.ops.geometry import FLT_MAX_100, check_geometry

_modules = {}
_enabled = [True]
_warned = set()


def _load(kind):
    if kind not in _modules:
        name = {"cpu": "caffe_layers.native._native_cpu", "cuda": "caffe_layers.native._native_cuda"}[kind]
        try:
            module = importlib.import_module(name)
            # the CUDA module links its own runtime, which may refuse a driver older than its toolkit
            problem = module.probe() if kind == "cuda" else ""
        except ImportError as err:
            module, problem = None, f"{err}; reinstall with `pip install -e .` to build them"
        if problem:
            module = None
            if kind not in _warned:
                _warned.add(kind)
                warnings.warn(f"caffe_layers: native {kind} kernels unavailable ({problem}); using the slower "
                              f"pure-PyTorch references", RuntimeWarning, stacklevel=3)
        _modules[kind] = module
    return _modules[kind]


def available(kind="cpu"):
    """Is the native module for device type `kind` ("cpu" or "cuda") built and importable?"""
    return _load(kind) is not None


@contextlib.contextmanager
def disabled():
    """Run the pure-PyTorch references inside this block."""
    old = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = old


def use_native(*tensors):
    """True when every tensor is float32/float64 on one CPU or CUDA device with its module built."""
    if not _enabled[0]:
        return False
    t = tensors[0]
    kind = t.device.type
    if kind not in ("cpu", "cuda") or t.dtype not in (torch.float32, torch.float64):
        return False
    if any(u is not None and (u.device != t.device or u.dtype != t.dtype) for u in tensors[1:]):
        return False
    return _load(kind) is not None


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _call(t, name, *args):
    """Call kernel `name` of the module for t's device: (is_double, *args[, stream])."""
    dbl = t.dtype == torch.float64
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            stream = torch.cuda.current_stream(t.device).cuda_stream
            return getattr(_modules["cuda"], name)(dbl, *args, stream)
    return getattr(_modules["cpu"], name)(dbl, *args)


def _geom(x, kernel, pad, stride, dilation, what):
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, what)
    N, C, H, W = x.shape
    return [N, C, H, W, *kernel, *pad, *stride, *dilation, *out], out


# ---- im2dist -------------------------------------------------------------------------------------
_L1_CAFFE, _L1_TRUE, _L2 = 0, 1, 2


class _Im2dist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, geom, l1, remove_center, remove_bounds, mode):
        x = x.contiguous()
        y = x.new_empty((geom[0], geom[4] * geom[5], geom[12], geom[13]))
        _call(x, "im2dist_forward", x.data_ptr(), y.data_ptr(), geom, l1, remove_center, remove_bounds, FLT_MAX_100)
        ctx.save_for_backward(x)
        ctx.geom, ctx.mode = geom, mode
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch.empty_like(x)
        _call(x, "im2dist_backward", x.data_ptr(), gy.data_ptr(), gx.data_ptr(), ctx.geom, ctx.mode)
        return gx, None, None, None, None, None


def im2dist(x, kernel, pad=0, stride=1, dilation=1, norm="L2", remove_center=False, remove_bounds=False,
            true_gradient=False):
    """caffe_layers.ops.im2dist.im2dist on the native kernels (same arguments and semantics)."""
    from caffe_layers.ops import im2dist as ref

    if norm not in ref.NORMS:
        raise ValueError(f"im2dist: norm must be one of {ref.NORMS}, got {norm!r}")
    if not use_native(x):
        with disabled():
            return ref.im2dist(x, kernel, pad, stride, dilation, norm, remove_center, remove_bounds, true_gradient)
    geom, _ = _geom(x, kernel, pad, stride, dilation, "im2dist")
    mode = _L2 if norm == "L2" else (_L1_TRUE if true_gradient else _L1_CAFFE)
    return _Im2dist.apply(x, geom, norm == "L1", bool(remove_center), bool(remove_bounds), mode)


# ---- im2parity -----------------------------------------------------------------------------------
def im2parity(labels, kernel, pad=0, stride=1, dilation=1, ignore_label=None, missing_value=0):
    """caffe_layers.ops.im2parity.im2parity on the native kernels (no backward, as in the original)."""
    from caffe_layers.ops import im2parity as ref

    if not use_native(labels):
        with disabled():
            return ref.im2parity(labels, kernel, pad, stride, dilation, ignore_label, missing_value)
    geom, out = _geom(labels, kernel, pad, stride, dilation, "im2parity")
    lab = labels.detach().contiguous()
    y = lab.new_empty((geom[0], geom[4] * geom[5], *out))
    outside = float(ignore_label if ignore_label is not None else missing_value)
    _call(lab, "im2parity_forward", lab.data_ptr(), y.data_ptr(), geom, ignore_label is not None,
          float(ignore_label or 0), outside)
    return y


# ---- SPN scan ------------------------------------------------------------------------------------
class _GateRecurrent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g1, g2, g3, horizontal, reverse):
        x, g1, g2, g3 = (None if t is None else t.contiguous() for t in (x, g1, g2, g3))
        N, C, H, W = x.shape
        h = torch.empty_like(x)
        _call(x, "spn_forward", x.data_ptr(), _ptr(g1), g2.data_ptr(), _ptr(g3), h.data_ptr(), N * C, H, W,
              horizontal, reverse)
        ctx.save_for_backward(x, g1, g2, g3, h)
        ctx.direction = (horizontal, reverse)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dtop):
        x, g1, g2, g3, h = ctx.saved_tensors
        dtop = dtop.contiguous()
        N, C, H, W = x.shape
        grads = x.new_empty((2 if g1 is None else 4,) + x.shape)  # one buffer for all the gradients
        dx, dg2 = grads[0], grads[1]
        dg1, dg3 = (None, None) if g1 is None else (grads[2], grads[3])
        _call(x, "spn_backward", x.data_ptr(), _ptr(g1), g2.data_ptr(), _ptr(g3), h.data_ptr(), dtop.data_ptr(),
              dx.data_ptr(), _ptr(dg1), dg2.data_ptr(), _ptr(dg3), N * C, H, W, *ctx.direction)
        return dx, dg1, dg2, dg3, None, None


def gate_recurrent(x, g1, g2=None, g3=None, horizontal=True, reverse=False, connection="three"):
    """caffe_layers.ops.spn.gate_recurrent on the native kernels (same arguments and semantics)."""
    from caffe_layers.ops import spn as ref

    gates = [g for g in (g1, g2, g3) if g is not None]
    if connection not in ("three", "one") or not use_native(x, *gates) or len(gates) != (3 if connection == "three" else 1):
        with disabled():  # the reference also gives the errors for bad arguments
            return ref.gate_recurrent(x, g1, g2, g3, horizontal, reverse, connection)
    ref._check(x, gates, "gate_recurrent")
    if connection == "one":  # the single gate weights the straight neighbour, g2's in the kernels
        return _GateRecurrent.apply(x, None, g1, None, bool(horizontal), bool(reverse))
    return _GateRecurrent.apply(x, g1, g2, g3, bool(horizontal), bool(reverse))


# ---- segmentation-aware convolution ----------------------------------------------------------------
# Column-buffer elements per chunk of output rows: on CPU 4 MiB of float32, which stays in cache between the
# kernel and the GEMM; on a GPU 32 MiB, fewer and larger launches.
_CHUNK_ELEMENTS = 1 << 20
_CHUNK_ELEMENTS_CUDA = 1 << 23


def _row_chunks(geom, device):
    C, K, Ho, Wo = geom[1], geom[4] * geom[5], geom[12], geom[13]
    chunk = _CHUNK_ELEMENTS_CUDA if device.type == "cuda" else _CHUNK_ELEMENTS
    rows = max(1, min(Ho, chunk // max(1, C * K * Wo)))
    return [(r, min(Ho, r + rows)) for r in range(0, Ho, rows)]


def _buffer(x, geom, chunks, rows):
    """One flat buffer for the largest chunk's rows x P matrix (each chunk views a contiguous prefix)."""
    return x.new_empty(rows * max(r1 - r0 for r0, r1 in chunks) * geom[13])


class _SegConv(torch.autograd.Function):
    """y = W (im2col(x) * tile(mask)) + b, a few large chunks of output rows at a time (no C*K*H*W buffer).

    Chunks are few and large on purpose: each chunk switches between the kernel's and BLAS's threads,
    which costs a scheduler time slice on a loaded machine. One column buffer serves every chunk.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, geom):
        x, mask = x.contiguous(), mask.contiguous()
        w = weight.reshape(weight.shape[0], -1)
        N, Ho, Wo = geom[0], geom[12], geom[13]
        O, CK = w.shape
        y = x.new_empty((N, O, Ho * Wo))
        chunks = _row_chunks(geom, x.device)
        cols_buf, y_buf = _buffer(x, geom, chunks, CK), _buffer(x, geom, chunks, O)
        for n in range(N):
            for r0, r1 in chunks:
                P = (r1 - r0) * Wo
                cols, out = cols_buf[:CK * P].view(CK, P), y_buf[:O * P].view(O, P)
                _call(x, "masked_im2col", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), geom, n, r0, r1)
                if bias is not None:
                    torch.addmm(bias[:, None], w, cols, out=out)
                else:
                    torch.mm(w, cols, out=out)
                y[n, :, r0 * Wo:r1 * Wo] = out
        ctx.save_for_backward(x, mask, weight)
        ctx.geom, ctx.has_bias = geom, bias is not None
        return y.reshape(N, O, Ho, Wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, mask, weight = ctx.saved_tensors
        geom = ctx.geom
        w = weight.reshape(weight.shape[0], -1)
        O, CK = w.shape
        N, Ho, Wo = geom[0], geom[12], geom[13]
        gy = gy.contiguous().reshape(N, O, Ho * Wo)
        need_x, need_mask, need_w, need_b = ctx.needs_input_grad[:4]
        gx = torch.zeros_like(x) if need_x else None
        gmask = torch.empty_like(mask) if need_mask else None
        gw = torch.zeros_like(w) if need_w else None
        gb = gy.sum((0, 2)) if (need_b and ctx.has_bias) else None
        chunks = _row_chunks(geom, x.device)
        buf = _buffer(x, geom, chunks, CK)
        wt = w.t().contiguous()
        for n in range(N):
            for r0, r1 in chunks:
                P = (r1 - r0) * Wo
                g, cols = gy[n, :, r0 * Wo:r1 * Wo], buf[:CK * P].view(CK, P)
                if need_w:
                    _call(x, "masked_im2col", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), geom, n, r0, r1)
                    gw.addmm_(g, cols.t())
                if need_x or need_mask:  # the buffer now takes d(cols) = W^T dy
                    torch.mm(wt, g, out=cols)
                    _call(x, "masked_col2im", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), _ptr(gx), _ptr(gmask),
                          geom, n, r0, r1)
        return gx, gmask, None if gw is None else gw.reshape(weight.shape), gb, None


def segaware_conv(x, mask, weight, bias, kernel, pad=0, stride=1, dilation=1):
    """caffe_layers.ops.segaware_conv.segaware_conv on the native kernels (same arguments)."""
    from caffe_layers.ops import segaware_conv as ref

    if not use_native(x, mask, weight, bias):
        with disabled():
            return ref.segaware_conv(x, mask, weight, bias, kernel, pad, stride, dilation)
    geom, out = _geom(x, kernel, pad, stride, dilation, "segaware_conv")
    ref.check_shapes(x, mask, weight, bias, geom[4] * geom[5], out)
    return _SegConv.apply(x, mask, weight, bias, geom)


# ---- normalised convolution filtering --------------------------------------------------------------
class _NormFilter(torch.autograd.Function):
    """y = grouped conv of x whose taps are weighted by soft (N x K x Ho x Wo) per output position."""

    @staticmethod
    def forward(ctx, x, soft, weight, bias, geom, group):
        x, soft, weight = x.contiguous(), soft.contiguous(), weight.contiguous()
        b = None if bias is None else bias.contiguous()  # held until the kernel has read it
        O = weight.shape[0]
        y = x.new_empty((geom[0], O, geom[12], geom[13]))
        _call(x, "normfilter_forward", x.data_ptr(), soft.data_ptr(), weight.data_ptr(), _ptr(b), y.data_ptr(), geom,
              O, group)
        ctx.save_for_backward(x, soft, weight)
        ctx.geom, ctx.group, ctx.has_bias = geom, group, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, soft, weight = ctx.saved_tensors
        gy = gy.contiguous()
        need_x, need_soft, need_w, need_b = ctx.needs_input_grad[:4]
        gx = torch.empty_like(x) if need_x else None
        gsoft = torch.empty_like(soft) if need_soft else None
        gw = torch.empty_like(weight) if need_w else None
        if need_x or need_soft or need_w:
            _call(x, "normfilter_backward", x.data_ptr(), soft.data_ptr(), weight.data_ptr(), gy.data_ptr(), _ptr(gx),
                  _ptr(gsoft), _ptr(gw), ctx.geom, weight.shape[0], ctx.group)
        gb = gy.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return gx, gsoft, gw, gb, None, None


def norm_conv_filter(img, dist, weight, bias=None, scale=None, pad=0, stride=1, dilation=1, group=1):
    """caffe_layers.ops.norm_conv.norm_conv_filter on the native kernels (same arguments and semantics): the
    softmax of the distances by torch (autograd gives the dist and scale gradients), the filtering native."""
    from caffe_layers.ops import norm_conv as ref

    if not use_native(img, dist, weight, bias, scale):
        with disabled():
            return ref.norm_conv_filter(img, dist, weight, bias, scale, pad, stride, dilation, group)
    geom, out = _geom(img, weight.shape[2:], pad, stride, dilation, "norm_conv")
    ref.check_shapes(img, dist, weight, group, out)
    soft = ref.patch_softmax(dist, scale)
    if group == 1:  # the seg-aware convolution with mask = soft: column chunks and a GEMM beat the direct loops
        return _SegConv.apply(img, soft, weight, bias, geom)
    return _NormFilter.apply(img, soft, weight, bias, geom, group)

