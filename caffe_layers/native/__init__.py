"""Native kernels (cuda/*.cpp, cuda/*.cu) as torch.library custom ops, and the public functions over them.

caffe_layers.native._native_cpu (C++, OpenMP) is always built; caffe_layers.native._native_cuda only where
nvcc was found at install time. Both take raw pointers (tensor.data_ptr()) of contiguous float32/float64 NCHW
tensors; the CUDA one also takes the current stream.

Each kernel is an op of the "caffe_layers" library (torch.ops.caffe_layers.im2dist, ...) with a fake kernel
(exact output shapes, for FakeTensor, torch.compile and torch.export), CPU and CUDA implementations and a
registered autograd whose backward is an op too, so compiled and exported graphs contain it. Importing this
package registers them (a loader of an exported program needs that import).

The public functions (im2dist, im2parity, gate_recurrent, segaware_conv, norm_conv_filter) take the arguments
of their pure-PyTorch references in caffe_layers/ops and run the ops where a kernel exists (float32/float64 on
CPU, or CUDA with the CUDA module, or meta tensors: the fake kernels); otherwise, and inside `disabled()`, they run the references (after a
one-line warning when a module is missing).
"""
import contextlib
import ctypes
import importlib
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from caffe_layers.ops import im2dist as im2dist_ref
from caffe_layers.ops import im2parity as im2parity_ref
from caffe_layers.ops import norm_conv as norm_conv_ref
from caffe_layers.ops import segaware_conv as segaware_conv_ref
from caffe_layers.ops import spn as spn_ref
from caffe_layers.ops.geometry import FLT_MAX_100, check_geometry

_modules = {}
_enabled = [True]
_warned = set()
_DTYPES = (torch.float32, torch.float64)


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


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing the import
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


def enabled():
    """False inside `disabled()`."""
    return _enabled[0]


def use_native(*tensors):
    """True when every tensor is float32/float64 on one CPU or CUDA device with its module built, or on the meta
    device (shape inference: the ops' fake kernels, much faster than the references' many small meta ops)."""
    if not _enabled[0]:
        return False
    t = tensors[0]
    kind = t.device.type
    if kind not in ("cpu", "cuda", "meta") or t.dtype not in _DTYPES:
        return False
    if any(u is not None and (u.device != t.device or u.dtype != t.dtype) for u in tensors[1:]):
        return False
    return kind == "meta" or available(kind)


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


def _checked(op, *tensors):
    """The tensors made contiguous, after checking that a kernel exists for them (ops called directly)."""
    t = tensors[0]
    if t.dtype not in _DTYPES or any(u is not None and (u.dtype, u.device) != (t.dtype, t.device) for u in tensors):
        raise TypeError(f"caffe_layers::{op}: the native kernels take float32 or float64 tensors of one dtype on one "
                        f"device, got {[(u.dtype, str(u.device)) for u in tensors if u is not None]} (the functions "
                        f"of caffe_layers.native run the references for the others)")
    if _load(t.device.type) is None:
        raise RuntimeError(f"caffe_layers::{op}: the native {t.device.type} module is not built (the functions of "
                           f"caffe_layers.native run the references instead)")
    return [None if u is None else u.contiguous() for u in tensors]


def _geom(x, kernel, pad, stride, dilation, what):
    """The kernels' geometry vector (N, C, H, W, kernel, pad, stride, dilation, output size) and the output size."""
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, what)
    N, C, H, W = x.shape
    return [N, C, H, W, *kernel, *pad, *stride, *dilation, *out], out


def _window(x, kernel, pad, stride, dilation, what):
    """The checked window settings as the ops' int[2] arguments."""
    return [list(v) for v in check_geometry(x, kernel, pad, stride, dilation, what)[:4]]


_OPS = ("cpu", "cuda")  # the device types with kernels


# ---- im2dist -------------------------------------------------------------------------------------
def _im2dist_mode(norm, true_gradient):
    """The kernels' backward mode: 0 L1 as dist2im_cpu (the quirk), 1 L1 true gradient, 2 L2."""
    return 2 if norm == "L2" else (1 if true_gradient else 0)


@torch.library.custom_op("caffe_layers::im2dist", mutates_args=(), device_types=_OPS)
def _im2dist_op(x: Tensor, kernel: list[int], pad: list[int], stride: list[int], dilation: list[int], norm: str,
                remove_center: bool, remove_bounds: bool, true_gradient: bool) -> Tensor:
    (x,) = _checked("im2dist", x)
    geom, out = _geom(x, kernel, pad, stride, dilation, "im2dist")
    y = x.new_empty((geom[0], geom[4] * geom[5], *out))
    _call(x, "im2dist_forward", x.data_ptr(), y.data_ptr(), geom, norm == "L1", remove_center, remove_bounds,
          FLT_MAX_100)
    return y


@_im2dist_op.register_fake
def _(x, kernel, pad, stride, dilation, norm, remove_center, remove_bounds, true_gradient):
    *_, out = check_geometry(x, kernel, pad, stride, dilation, "im2dist")
    return x.new_empty((x.shape[0], kernel[0] * kernel[1], *out))


@torch.library.custom_op("caffe_layers::im2dist_backward", mutates_args=(), device_types=_OPS)
def _im2dist_backward_op(x: Tensor, grad: Tensor, kernel: list[int], pad: list[int], stride: list[int],
                         dilation: list[int], norm: str, true_gradient: bool) -> Tensor:
    x, grad = _checked("im2dist_backward", x, grad)
    geom, _ = _geom(x, kernel, pad, stride, dilation, "im2dist")
    gx = x.new_empty(x.shape)
    _call(x, "im2dist_backward", x.data_ptr(), grad.data_ptr(), gx.data_ptr(), geom,
          _im2dist_mode(norm, true_gradient))
    return gx


@_im2dist_backward_op.register_fake
def _(x, grad, kernel, pad, stride, dilation, norm, true_gradient):
    return x.new_empty(x.shape)


def _im2dist_setup(ctx, inputs, output):
    x, kernel, pad, stride, dilation, norm, _, _, true_gradient = inputs
    ctx.save_for_backward(x)
    ctx.args = (kernel, pad, stride, dilation, norm, true_gradient)


def _im2dist_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return (_im2dist_backward_op(x, grad, *ctx.args),) + (None,) * 8


_im2dist_op.register_autograd(_im2dist_grad, setup_context=_im2dist_setup)


def im2dist(x, kernel, pad=0, stride=1, dilation=1, norm="L2", remove_center=False, remove_bounds=False,
            true_gradient=False):
    """caffe_layers.ops.im2dist.im2dist on the native kernels (same arguments and semantics)."""
    if norm not in im2dist_ref.NORMS:
        raise ValueError(f"im2dist: norm must be one of {im2dist_ref.NORMS}, got {norm!r}")
    if not use_native(x):
        return im2dist_ref.im2dist(x, kernel, pad, stride, dilation, norm, remove_center, remove_bounds,
                                   true_gradient)
    return _im2dist_op(x, *_window(x, kernel, pad, stride, dilation, "im2dist"), norm, bool(remove_center), bool(remove_bounds),
                       bool(true_gradient))


# ---- im2parity -----------------------------------------------------------------------------------
@torch.library.custom_op("caffe_layers::im2parity", mutates_args=(), device_types=_OPS)
def _im2parity_op(labels: Tensor, kernel: list[int], pad: list[int], stride: list[int], dilation: list[int],
                  has_ignore: bool, ignore_label: float, outside: float) -> Tensor:
    (labels,) = _checked("im2parity", labels)
    geom, out = _geom(labels, kernel, pad, stride, dilation, "im2parity")
    y = labels.new_empty((geom[0], geom[4] * geom[5], *out))
    _call(labels, "im2parity_forward", labels.data_ptr(), y.data_ptr(), geom, has_ignore, ignore_label, outside)
    return y


@_im2parity_op.register_fake
def _(labels, kernel, pad, stride, dilation, has_ignore, ignore_label, outside):
    *_, out = check_geometry(labels, kernel, pad, stride, dilation, "im2parity")
    return labels.new_empty((labels.shape[0], kernel[0] * kernel[1], *out))


def im2parity(labels, kernel, pad=0, stride=1, dilation=1, ignore_label=None, missing_value=0):
    """caffe_layers.ops.im2parity.im2parity on the native kernels (no backward, as in the original)."""
    if not use_native(labels):
        return im2parity_ref.im2parity(labels, kernel, pad, stride, dilation, ignore_label, missing_value)
    window = _window(labels, kernel, pad, stride, dilation, "im2parity")
    outside = float(ignore_label if ignore_label is not None else missing_value)
    return _im2parity_op(labels.detach(), *window, ignore_label is not None,
                         float(ignore_label or 0), outside)


# ---- SPN scan ------------------------------------------------------------------------------------
@torch.library.custom_op("caffe_layers::gate_recurrent", mutates_args=(), device_types=_OPS)
def _scan_op(x: Tensor, g1: Optional[Tensor], g2: Tensor, g3: Optional[Tensor], horizontal: bool,
             reverse: bool) -> Tensor:
    """g1 and g3 None: the one-way connection (g2 weights the straight neighbour)."""
    x, g1, g2, g3 = _checked("gate_recurrent", x, g1, g2, g3)
    N, C, H, W = x.shape
    h = x.new_empty(x.shape)
    _call(x, "spn_forward", x.data_ptr(), _ptr(g1), g2.data_ptr(), _ptr(g3), h.data_ptr(), N * C, H, W,
          horizontal, reverse)
    return h


@_scan_op.register_fake
def _(x, g1, g2, g3, horizontal, reverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("caffe_layers::gate_recurrent_backward", mutates_args=(), device_types=_OPS)
def _scan_backward_op(x: Tensor, g1: Optional[Tensor], g2: Tensor, g3: Optional[Tensor], h: Tensor, grad: Tensor,
                      horizontal: bool, reverse: bool) -> Tensor:
    """The gradients stacked: (dx, dg2) for the one-way connection, (dx, dg2, dg1, dg3) for the three-way."""
    x, g1, g2, g3, h, grad = _checked("gate_recurrent_backward", x, g1, g2, g3, h, grad)
    N, C, H, W = x.shape
    grads = x.new_empty((2 if g1 is None else 4, *x.shape))
    dg1, dg3 = (None, None) if g1 is None else (grads[2], grads[3])
    _call(x, "spn_backward", x.data_ptr(), _ptr(g1), g2.data_ptr(), _ptr(g3), h.data_ptr(), grad.data_ptr(),
          grads[0].data_ptr(), _ptr(dg1), grads[1].data_ptr(), _ptr(dg3), N * C, H, W, horizontal, reverse)
    return grads


@_scan_backward_op.register_fake
def _(x, g1, g2, g3, h, grad, horizontal, reverse):
    return x.new_empty((2 if g1 is None else 4, *x.shape))


def _scan_setup(ctx, inputs, output):
    x, g1, g2, g3, horizontal, reverse = inputs
    ctx.save_for_backward(x, g1, g2, g3, output)
    ctx.direction = (horizontal, reverse)


def _scan_grad(ctx, grad):
    x, g1, g2, g3, h = ctx.saved_tensors
    grads = _scan_backward_op(x, g1, g2, g3, h, grad, *ctx.direction)
    dg1, dg3 = (None, None) if g1 is None else (grads[2], grads[3])
    return grads[0], dg1, grads[1], dg3, None, None


_scan_op.register_autograd(_scan_grad, setup_context=_scan_setup)


def gate_recurrent(x, g1, g2=None, g3=None, horizontal=True, reverse=False, connection="three"):
    """caffe_layers.ops.spn.gate_recurrent on the native kernels (same arguments and semantics)."""
    gates = [g for g in (g1, g2, g3) if g is not None]
    if connection not in ("three", "one") or not use_native(x, *gates) or len(gates) != (3 if connection == "three" else 1):
        # the reference also gives the errors for bad arguments
        return spn_ref.gate_recurrent(x, g1, g2, g3, horizontal, reverse, connection)
    spn_ref._check(x, gates, "gate_recurrent")
    if connection == "one":  # the single gate weights the straight neighbour, g2's in the kernels
        return _scan_op(x, None, g1, None, bool(horizontal), bool(reverse))
    return _scan_op(x, g1, g2, g3, bool(horizontal), bool(reverse))


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


# The CPU kernel's tiles of output positions: a column buffer (C*K x tile) of about 2 MiB of float32 (it stays in
# the thread's L2 cache between the masked im2col and the gemm), but at least _MIN_TILE positions (a narrower
# gemm is slower), and as many tiles as a multiple of the threads (none waits for the last), rounded to fewer
# and larger tiles (each gemm call packs the weights again: 9 MiB in vgg's conv5).
_TILE_ELEMENTS = 1 << 19
_MIN_TILE = 512
_gemms = {}


def _blas_gemm(double):
    """The address of the Fortran ?gemm of the BLAS torch links (MKL's sgemm_/dgemm_ in torch's libtorch_cpu), or 0
    where that library exports none (the fused CPU kernel then falls back to chunks and torch.addmm)."""
    key = "dgemm_" if double else "sgemm_"
    if key not in _gemms:
        address = 0
        for path in sorted(Path(torch.__file__).parent.joinpath("lib").glob("libtorch_cpu.*")):
            try:
                address = ctypes.cast(getattr(ctypes.CDLL(str(path)), key), ctypes.c_void_p).value or 0
            except (OSError, AttributeError):
                continue
            break
        _gemms[key] = address
    return _gemms[key]


def _fused_kernel_gemm(x):
    """The gemm address for the fused seg-aware kernels of x's module, or 0 where that module has none (the CUDA
    one: its path is row chunks with torch's GEMM) or torch's library exports no gemm."""
    if not hasattr(_modules[x.device.type], "segaware_conv_forward"):
        return 0
    return _blas_gemm(x.dtype == torch.float64)


def _tile(geom, CK):
    """Output positions per tile of the CPU kernels (see _TILE_ELEMENTS)."""
    P, threads = geom[12] * geom[13], torch.get_num_threads()
    tiles = max(threads, P // max(_MIN_TILE, _TILE_ELEMENTS // CK) // threads * threads)
    return -(-P // tiles)


@torch.library.custom_op("caffe_layers::segaware_conv", mutates_args=(), device_types=_OPS)
def _segconv_op(x: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor], kernel: list[int], pad: list[int],
                stride: list[int], dilation: list[int]) -> Tensor:
    """y = W (im2col(x) * tile(mask)) + b without the C*K*H*W buffer.

    On CPU one kernel call: tiles of output positions in parallel, each thread's gemm straight into y (see
    segaware_conv_forward in cuda/native_cpu_kernels.h). Elsewhere (CUDA, or no BLAS gemm found) a few large
    chunks of output rows: each chunk switches between the kernel's and BLAS's threads, which costs a scheduler
    time slice on a loaded machine. One column buffer serves every chunk, and each GEMM writes its rows of y in
    place (y[n, :, rows] is an O x P matrix with leading dimension Ho*Wo).
    """
    x, mask, weight, bias = _checked("segaware_conv", x, mask, weight, bias)
    geom, _ = _geom(x, kernel, pad, stride, dilation, "segaware_conv")
    w = weight.reshape(weight.shape[0], -1)
    N, Ho, Wo = geom[0], geom[12], geom[13]
    O, CK = w.shape
    y = x.new_empty((N, O, Ho * Wo))
    gemm = _fused_kernel_gemm(x)
    if gemm:
        _call(x, "segaware_conv_forward", x.data_ptr(), mask.data_ptr(), w.data_ptr(), _ptr(bias), y.data_ptr(),
              geom, O, _tile(geom, CK), gemm)
        return y.reshape(N, O, Ho, Wo)
    chunks = _row_chunks(geom, x.device)
    cols_buf = _buffer(x, geom, chunks, CK)
    for n in range(N):
        for r0, r1 in chunks:
            cols = cols_buf[:CK * (r1 - r0) * Wo].view(CK, -1)
            _call(x, "masked_im2col", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), geom, n, r0, r1)
            out = y[n, :, r0 * Wo:r1 * Wo]
            if bias is not None:
                torch.addmm(bias[:, None], w, cols, out=out)
            else:
                torch.mm(w, cols, out=out)
    return y.reshape(N, O, Ho, Wo)


@_segconv_op.register_fake
def _(x, mask, weight, bias, kernel, pad, stride, dilation):
    *_, out = check_geometry(x, kernel, pad, stride, dilation, "segaware_conv")
    return x.new_empty((x.shape[0], weight.shape[0], *out))


@torch.library.custom_op("caffe_layers::segaware_conv_backward", mutates_args=(), device_types=_OPS)
def _segconv_backward_op(grad: Tensor, x: Tensor, mask: Tensor, weight: Tensor, kernel: list[int], pad: list[int],
                         stride: list[int], dilation: list[int],
                         output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(d x, d mask, d weight); an output whose output_mask entry is False is an empty tensor."""
    grad, x, mask, weight = _checked("segaware_conv_backward", grad, x, mask, weight)
    geom, _ = _geom(x, kernel, pad, stride, dilation, "segaware_conv")
    w = weight.reshape(weight.shape[0], -1)
    O, CK = w.shape
    N, Ho, Wo = geom[0], geom[12], geom[13]
    gy = grad.reshape(N, O, Ho * Wo)
    need_x, need_mask, need_w = output_mask
    gx = torch.zeros_like(x) if need_x else None
    gmask = mask.new_empty(mask.shape) if need_mask else None
    gw = torch.zeros_like(w) if need_w else None
    gemm = _fused_kernel_gemm(x)
    if gemm:  # one kernel call, tiles as the forward
        _call(x, "segaware_conv_backward", x.data_ptr(), mask.data_ptr(), w.data_ptr(), gy.data_ptr(), _ptr(gx),
              _ptr(gmask), _ptr(gw), geom, O, _tile(geom, CK), gemm)
    else:
        chunks = _row_chunks(geom, x.device)
        buf = _buffer(x, geom, chunks, CK)
        wt = w.t().contiguous()
        for n in range(N):
            for r0, r1 in chunks:
                g, cols = gy[n, :, r0 * Wo:r1 * Wo], buf[:CK * (r1 - r0) * Wo].view(CK, -1)
                if need_w:
                    _call(x, "masked_im2col", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), geom, n, r0, r1)
                    gw.addmm_(g, cols.t())
                if need_x or need_mask:  # the buffer now takes d(cols) = W^T dy
                    torch.mm(wt, g, out=cols)
                    _call(x, "masked_col2im", x.data_ptr(), mask.data_ptr(), cols.data_ptr(), _ptr(gx), _ptr(gmask),
                          geom, n, r0, r1)
    empty = x.new_empty(0)
    return (empty if gx is None else gx, empty.clone() if gmask is None else gmask,
            empty.clone() if gw is None else gw.reshape(weight.shape))


@_segconv_backward_op.register_fake
def _(grad, x, mask, weight, kernel, pad, stride, dilation, output_mask):
    return tuple(t.new_empty(t.shape if needed else 0) for t, needed in zip((x, mask, weight), output_mask))


def _register_filter_autograd(op, backward_op):
    """Autograd of an op (x, mask, weight, bias, *settings) by its backward op (grad, x, mask, weight, *settings,
    output_mask) -> (d x, d mask, d weight); the bias gradient is the sum of the top gradient."""

    def setup(ctx, inputs, output):
        x, mask, weight, bias, *settings = inputs
        ctx.save_for_backward(x, mask, weight)
        ctx.settings, ctx.has_bias = settings, bias is not None

    def backward(ctx, grad):
        need = list(ctx.needs_input_grad[:3])
        grads = backward_op(grad, *ctx.saved_tensors, *ctx.settings, need) if any(need) else (None,) * 3
        gb = grad.sum((0, 2, 3)) if (ctx.needs_input_grad[3] and ctx.has_bias) else None
        return tuple(g if needed else None for g, needed in zip(grads, need)) + (gb,) + (None,) * len(ctx.settings)

    op.register_autograd(backward, setup_context=setup)


_register_filter_autograd(_segconv_op, _segconv_backward_op)


def segaware_conv(x, mask, weight, bias, kernel, pad=0, stride=1, dilation=1):
    """caffe_layers.ops.segaware_conv.segaware_conv on the native kernels (same arguments)."""
    if not use_native(x, mask, weight, bias):
        return segaware_conv_ref.segaware_conv(x, mask, weight, bias, kernel, pad, stride, dilation)
    kernel, pad, stride, dilation, out = check_geometry(x, kernel, pad, stride, dilation, "segaware_conv")
    segaware_conv_ref.check_shapes(x, mask, weight, bias, kernel[0] * kernel[1], out)
    return _segconv_op(x, mask, weight, bias, list(kernel), list(pad), list(stride), list(dilation))


# ---- normalised convolution filtering --------------------------------------------------------------
@torch.library.custom_op("caffe_layers::norm_filter", mutates_args=(), device_types=_OPS)
def _normfilter_op(x: Tensor, soft: Tensor, weight: Tensor, bias: Optional[Tensor], pad: list[int],
                   stride: list[int], dilation: list[int], group: int) -> Tensor:
    """y = grouped conv of x whose taps are weighted by soft (N x K x Ho x Wo) per output position."""
    x, soft, weight, bias = _checked("norm_filter", x, soft, weight, bias)
    geom, out = _geom(x, weight.shape[2:], pad, stride, dilation, "norm_conv")
    O = weight.shape[0]
    y = x.new_empty((geom[0], O, *out))
    _call(x, "normfilter_forward", x.data_ptr(), soft.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), geom,
          O, group)
    return y


@_normfilter_op.register_fake
def _(x, soft, weight, bias, pad, stride, dilation, group):
    *_, out = check_geometry(x, weight.shape[2:], pad, stride, dilation, "norm_conv")
    return x.new_empty((x.shape[0], weight.shape[0], *out))


@torch.library.custom_op("caffe_layers::norm_filter_backward", mutates_args=(), device_types=_OPS)
def _normfilter_backward_op(grad: Tensor, x: Tensor, soft: Tensor, weight: Tensor, pad: list[int],
                            stride: list[int], dilation: list[int], group: int,
                            output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(d x, d soft, d weight); an output whose output_mask entry is False is an empty tensor."""
    grad, x, soft, weight = _checked("norm_filter_backward", grad, x, soft, weight)
    geom, _ = _geom(x, weight.shape[2:], pad, stride, dilation, "norm_conv")
    gx, gsoft, gw = (t.new_empty(t.shape) if needed else None for t, needed in zip((x, soft, weight), output_mask))
    _call(x, "normfilter_backward", x.data_ptr(), soft.data_ptr(), weight.data_ptr(), grad.data_ptr(), _ptr(gx),
          _ptr(gsoft), _ptr(gw), geom, weight.shape[0], group)
    return tuple(t if t is not None else x.new_empty(0) for t in (gx, gsoft, gw))


@_normfilter_backward_op.register_fake
def _(grad, x, soft, weight, pad, stride, dilation, group, output_mask):
    return tuple(t.new_empty(t.shape if needed else 0) for t, needed in zip((x, soft, weight), output_mask))


_register_filter_autograd(_normfilter_op, _normfilter_backward_op)


def norm_conv_filter(img, dist, weight, bias=None, scale=None, pad=0, stride=1, dilation=1, group=1):
    """caffe_layers.ops.norm_conv.norm_conv_filter on the native kernels (same arguments and semantics): the
    softmax of the distances by torch (autograd gives the dist and scale gradients), the filtering native."""
    if not use_native(img, dist, weight, bias, scale):
        return norm_conv_ref.norm_conv_filter(img, dist, weight, bias, scale, pad, stride, dilation, group)
    kernel, pad, stride, dilation, out = check_geometry(img, weight.shape[2:], pad, stride, dilation, "norm_conv")
    norm_conv_ref.check_shapes(img, dist, weight, group, out)
    soft = norm_conv_ref.patch_softmax(dist, scale)
    if group == 1:  # the seg-aware convolution with mask = soft: column chunks and a GEMM beat the direct loops
        return _segconv_op(img, soft, weight, bias, list(kernel), list(pad), list(stride), list(dilation))
    return _normfilter_op(img, soft, weight, bias, list(pad), list(stride), list(dilation), int(group))


# ---- a chain of tiny layers in one call ------------------------------------------------------------------
# The most multiply-adds a convolution of a chain may take (engine/tiny.py): one convolution and its PReLU run
# as fast natively as by torch's calls at about 50,000 (3->10 channels 3x3 on 16x16), slower beyond (torch's GEMM
# and oneDNN: 1.3x at 87,000, 2x at 243,000), faster below (0.7-0.9x at 5,000-27,000, the P-Net 12x12's);
# measured with benchmarks/bench_small_nets.py --conv-sizes (1 thread).
DIRECT_CONV_MAX_WORK = 1 << 16


def tiny_chain_ready():
    """Whether tiny chain programs can run: the CPU module built and native kernels not disabled()."""
    return _enabled[0] and _load("cpu") is not None


def tiny_chain_program(ops, negative_slopes, places, n_ptrs, scratch):
    """A chain of tiny float32 layers as a checked program of the CPU module (tiny_chain_forward in
    cuda/native_cpu_kernels.h gives the format; engine/tiny.py builds it); `.run(ptrs)` runs it."""
    return _modules["cpu"].TinyChainProgram(False, ops, negative_slopes, places, n_ptrs, scratch)
