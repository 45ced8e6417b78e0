"""Native kernels (cuda/) against the pure-PyTorch references in caffe_layers/ops, forward and backward."""
import contextlib
import os

import pytest
import torch

from caffe_layers import native
from caffe_layers.native import im2dist, im2parity, segaware_conv, gate_recurrent
from golden import FLT_MAX_100, OnStreamZero

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="unreachable: the CPU module is always built")

# "cuda-emulated": CPU tensors through the CUDA kernels built as plain C++, so that their indexing and
# arithmetic are tested on machines without a GPU (see the emulated_cuda fixture)
DEVICES = ["cpu", pytest.param("cpu", id="cuda-emulated", marks=pytest.mark.cuda_emulated),
           pytest.param("cuda", marks=pytest.mark.skipif(
               not (torch.cuda.is_available() and native.available("cuda")), reason="needs a GPU and the CUDA module"))]


@pytest.fixture(autouse=True)
def _emulated_cuda_for_marked_tests(request, monkeypatch):
    if request.node.get_closest_marker("cuda_emulated"):
        native.available("cpu")
        monkeypatch.setitem(native._modules, "cpu", OnStreamZero(request.getfixturevalue("emulated_cuda")))

# (N, C, H, W), kernel, pad, stride, dilation: odd sizes, stride, dilation, padding past the image, batch > 1
GEOMETRIES = [
    ((2, 3, 7, 9), 3, 1, 1, 1),
    ((2, 2, 9, 8), (3, 5), (2, 1), (2, 1), (1, 2)),
    ((1, 3, 6, 7), 5, 10, 1, 5),        # pad past the image: centres outside
    ((3, 2, 8, 5), 2, 1, 3, 1),         # even kernel, stride 3
    ((1, 4, 11, 6), (5, 3), (4, 1), (2, 2), (2, 3)),
    ((2, 2, 7, 4), 3, 1, (2, 3), (1, 3)),  # dilated extent 7 > padded width 6: Caffe's width is still 1
]


def _rand(shape, seed, dtype=torch.float64, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _run(fn, *inputs, grad_seed=7):
    """(output, input grads) of fn, backpropagating a seeded random top gradient."""
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*xs)
    y.backward(_rand(y.shape, grad_seed, y.dtype, y.device))
    return y.detach(), [t.grad for t in xs]


def _both(fn, *inputs, grad_seed=7):
    """(outputs, input grads) of fn with native kernels and with the references."""
    native_run = _run(fn, *inputs, grad_seed=grad_seed)
    with native.disabled():
        return [native_run, _run(fn, *inputs, grad_seed=grad_seed)]


def _close(a, b, what, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ---- im2dist -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("norm,rc,rb,true_gradient", [
    ("L1", False, False, False), ("L1", True, True, False), ("L1", False, True, True),
    ("L2", False, False, False), ("L2", True, True, False)])
def test_im2dist_matches_reference(device, geom, norm, rc, rb, true_gradient):
    shape, k, p, s, d = geom
    x = _rand(shape, 1, device=device)
    x[:, :, 1, :] = x[:, :, 2, :]  # equal neighbours: sign(0) appears in the L1 backward
    (y, (gx,)), (ry, (rgx,)) = _both(lambda t: im2dist(t, k, p, s, d, norm, rc, rb, true_gradient), x)
    _close(y, ry, "forward")
    _close(gx, rgx, "backward")


@pytest.mark.parametrize("mode", [("L1", False), ("L1", True), ("L2", False)])
def test_im2dist_backward_over_channel_blocks(mode):
    """The CPU backward takes channels in blocks (N * C / (4 * threads), at most 16): many channels, a
    remainder block, a stride and the L1 quirk must still give the reference's gradient."""
    x = _rand((2, 37, 9, 8), 3)
    x[:, :, 2, :] = x[:, :, 3, :]
    (y, (gx,)), (ry, (rgx,)) = _both(lambda t: im2dist(t, 3, 2, (1, 2), 2, mode[0], true_gradient=mode[1]), x)
    _close(y, ry, "forward")
    _close(gx, rgx, "backward")


@pytest.mark.parametrize("norm,true_gradient", [("L1", True), ("L2", False)])
def test_im2dist_gradcheck(norm, true_gradient):
    x = _rand((2, 2, 5, 6), 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: native.im2dist(t, 3, 2, 2, 1, norm, true_gradient=true_gradient), (x,))


def test_im2dist_l1_default_is_caffe_backward():
    """Default L1 backward is dist2im_cpu's (sign(0) = -1, out-of-bounds neighbours count), not autograd's."""
    x = torch.zeros((1, 1, 3, 3), dtype=torch.float64, requires_grad=True)
    native.im2dist(x, 3, 1, 1, 1, "L1").sum().backward()
    # every output centre gets -1 from each of its 8 non-centre taps; each in-image neighbour gets +1 back
    expected = torch.tensor([[-5., -3., -5.], [-3., 0., -3.], [-5., -3., -5.]], dtype=torch.float64) + 0
    torch.testing.assert_close(x.grad[0, 0], expected)
    x.grad = None
    native.im2dist(x, 3, 1, 1, 1, "L1", true_gradient=True).sum().backward()
    assert torch.all(x.grad == 0)


def _im2dist_loop(x, k, p, s, d, rc, rb):
    """im2dist L2 by the definition, pixel by pixel (Caffe's output size, truncating toward zero)."""
    N, C, H, W = x.shape
    Ho, Wo = int((H + 2 * p - d * (k - 1) - 1) / s) + 1, int((W + 2 * p - d * (k - 1) - 1) / s) + 1
    y = torch.zeros((N, k * k, Ho, Wo), dtype=x.dtype)
    big = float(FLT_MAX_100)
    for oh in range(Ho):
        for ow in range(Wo):
            ch, cw = oh * s - p + (k // 2) * d, ow * s - p + (k // 2) * d
            if not (0 <= ch < H and 0 <= cw < W):
                continue
            for i in range(k):
                for j in range(k):
                    hh, ww = oh * s - p + i * d, ow * s - p + j * d
                    if rc and (i, j) == (k // 2, k // 2):
                        y[:, i * k + j, oh, ow] = big
                    elif 0 <= hh < H and 0 <= ww < W:
                        y[:, i * k + j, oh, ow] = ((x[:, :, ch, cw] - x[:, :, hh, ww]) ** 2).sum(1) / 2
                    elif rb:
                        y[:, i * k + j, oh, ow] = big
    return y


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("rc,rb", [(False, False), (True, True)])
def test_im2dist_extent_past_padded_input(use_native, rc, rb):
    """Regression: a dilated kernel wider than the padded input (W 4 + 2 pad < extent 7, stride 2 > the
    overrun) gives Caffe's output width 1; the reference used to crash there."""
    x = _rand((2, 3, 9, 4), 11)
    if use_native:
        y = im2dist(x, 3, 1, 2, 3, "L2", rc, rb)
    else:
        with native.disabled():
            y = im2dist(x, 3, 1, 2, 3, "L2", rc, rb)
    assert y.shape == (2, 9, 3, 1)
    _close(y, _im2dist_loop(x, 3, 1, 2, 3, rc, rb), "im2dist")
    assert torch.autograd.gradcheck(lambda t: im2dist(t, 3, 1, 2, 3, "L2"), (x[:1, :2].clone().requires_grad_(),))


# ---- im2parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("ignore", [None, 255, 0])
def test_im2parity_matches_reference(device, geom, ignore):
    shape, k, p, s, d = geom
    labels = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(3)).double() + 0.7
    labels[:, :, 0, 0] = 255
    labels = labels.to(device)
    y = im2parity(labels, k, p, s, d, ignore)
    with native.disabled():
        ref = im2parity(labels, k, p, s, d, ignore)
    assert torch.equal(y, ref)


# ---- SPN scan ----------------------------------------------------------------------------------
DIRECTIONS = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 8, 1), (1, 1, 1, 6)])
def test_scan_three_way_matches_reference(device, direction, shape):
    x = _rand(shape, 4, device=device)
    gates = [0.4 * _rand(shape, 5 + i, device=device) for i in range(3)]
    (y, grads), (ry, rgrads) = _both(lambda *t: gate_recurrent(t[0], *t[1:], *direction), x, *gates)
    _close(y, ry, "forward", 1e-12)
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        _close(a, b, f"grad {i}", 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_one_way_matches_reference(device, direction):
    x, g = _rand((2, 2, 6, 5), 8, device=device), 0.5 * _rand((2, 2, 6, 5), 9, device=device)
    fn = lambda a, b: gate_recurrent(a, b, None, None, *direction, connection="one")  # noqa: E731
    (y, grads), (ry, rgrads) = _both(fn, x, g)
    _close(y, ry, "forward", 1e-12)
    for a, b in zip(grads, rgrads):
        _close(a, b, "grad", 1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_gradcheck(direction):
    inputs = [(0.4 * _rand((1, 2, 4, 3), 10 + i)).requires_grad_(True) for i in range(4)]
    assert torch.autograd.gradcheck(lambda *t: native.gate_recurrent(*t, *direction), inputs)
    one = inputs[:2]
    assert torch.autograd.gradcheck(lambda a, b: native.gate_recurrent(a, b, None, None, *direction, "one"), one)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [(1, 2, 9, 10), (2, 1, 37, 35)])
def test_scan_float32_all_directions(direction, shape):
    """float32 horizontal scans go through SSE 4x4 transposes of 32-column strips: sizes with remainders."""
    x, gates = _rand(shape, 1, torch.float32), [0.3 * _rand(shape, 2 + i, torch.float32) for i in range(3)]
    (y, grads), (ry, rgrads) = _both(lambda *t: gate_recurrent(t[0], *t[1:], *direction), x, *gates)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scan_float32():
    x, gates = _rand((2, 3, 9, 10), 1, torch.float32), [0.3 * _rand((2, 3, 9, 10), i, torch.float32) for i in range(3)]
    with native.disabled():
        ref = gate_recurrent(x, *gates)
    torch.testing.assert_close(native.gate_recurrent(x, *gates), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("shared_bytes", [None, "5000", "64"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_emulated_cuda_scan_tiles_and_fallback(direction, shared_bytes, monkeypatch):
    """The one-launch CUDA scans stage tiles of steps in shared memory: lines outnumbering the block's threads,
    many tiles with a partial last one (a 5000-byte budget: tiles of 1 to 3 steps), and the per-step kernels
    where not even one step fits (64 bytes)."""
    if shared_bytes:
        monkeypatch.setenv("CL_EMULATED_SHARED_BYTES", shared_bytes)
    shape = (2, 1, 37, 45)
    x, gates = _rand(shape, 4), [0.3 * _rand(shape, 5 + i) for i in range(3)]
    for dtype in (torch.float64, torch.float32):
        ins = [t.to(dtype) for t in (x, *gates)]
        for fn in (lambda *t: gate_recurrent(t[0], *t[1:], *direction),
                   lambda *t: gate_recurrent(t[0], t[1], None, None, *direction, connection="one")):
            (y, grads), (ry, rgrads) = _both(fn, *ins)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            _close(y, ry, "forward", tol)
            for i, (a, b) in enumerate(zip(grads, rgrads)):
                if b is not None:
                    _close(a, b, f"grad {i}", tol)


# ---- segmentation-aware convolution ----------------------------------------------------------------
def _small_segaware_tiles(monkeypatch, rows_path=False):
    """Several tiles (of 5 output positions, across row ends) or row chunks per image; rows_path: the chunked
    path that CUDA and a CPU without an exported BLAS gemm take."""
    monkeypatch.setattr(native, "_TILE_ELEMENTS", 1)
    monkeypatch.setattr(native, "_MIN_TILE", 5)
    monkeypatch.setattr(native, "_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(native, "_CHUNK_ELEMENTS_CUDA", 40)
    if rows_path:
        monkeypatch.setattr(native, "_blas_gemm", lambda double: 0)


@pytest.mark.parametrize("device", DEVICES + [pytest.param("cpu", id="cpu-rows")])
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_segaware_conv_matches_reference(device, geom, bias, monkeypatch, request):
    shape, k, p, s, d = geom
    _small_segaware_tiles(monkeypatch, "cpu-rows" in request.node.callspec.id)
    x = _rand(shape, 11, device=device)
    from caffe_layers.ops.geometry import check_geometry

    kernel, _, _, _, out = check_geometry(x, k, p, s, d, "test")
    K = kernel[0] * kernel[1]
    mask = _rand((shape[0], K, *out), 12, device=device).exp()
    weight = _rand((4, shape[1], *kernel), 13, device=device)
    b = _rand((4,), 14, device=device) if bias else None
    inputs = (x, mask, weight) + ((b,) if bias else ())
    fn = lambda x, m, w, *rest: segaware_conv(x, m, w, rest[0] if rest else None, k, p, s, d)  # noqa: E731
    (y, grads), (ry, rgrads) = _both(fn, *inputs)
    _close(y, ry, "forward")
    for i, (a, b2) in enumerate(zip(grads, rgrads)):
        _close(a, b2, f"grad {i}")


def test_segaware_conv_cpu_forward_is_one_tiled_kernel(monkeypatch):
    """On CPU the forward is one kernel call (tiles, gemm inside) with MKL's gemm from torch's library."""
    assert native._blas_gemm(False) and native._blas_gemm(True)
    calls = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda t, name, *a: (calls.append(name), real(t, name, *a))[1])
    x, mask, w = _rand((2, 3, 7, 9), 1), _rand((2, 9, 7, 9), 2), _rand((4, 27), 3)
    _small_segaware_tiles(monkeypatch)
    y = segaware_conv(x, mask, w, None, 3, 1)
    assert calls == ["segaware_conv_forward"]
    with native.disabled():
        _close(y, segaware_conv(x, mask, w, None, 3, 1), "forward")


def test_segaware_conv_cpu_threads_share_tiles_and_sum_in_order(monkeypatch):
    """Two threads over several tiles (each its own gx and gw sums, added in thread order): the reference's
    numbers, and the same bits on every run."""
    _small_segaware_tiles(monkeypatch)
    monkeypatch.setattr(native, "_MIN_TILE", 7)
    x, mask, w, b = _rand((2, 8, 12, 10), 1), _rand((2, 9, 12, 10), 2).exp(), _rand((8, 8, 3, 3), 3), _rand((8,), 4)
    fn = lambda *t: segaware_conv(*t, 3, 1, 1, 1)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (y, grads), (ry, rgrads) = _both(fn, x, mask, w, b)
        y2, grads2 = _run(fn, x, mask, w, b)
    finally:
        torch.set_num_threads(threads)
    _close(y, ry, "forward")
    for i, (a, r, a2) in enumerate(zip(grads, rgrads, grads2)):
        _close(a, r, f"grad {i}")
        assert torch.equal(a, a2), f"grad {i} differs between two runs"


@pytest.mark.parametrize("rows_path", [False, True])
def test_segaware_conv_gradcheck(monkeypatch, rows_path):
    _small_segaware_tiles(monkeypatch, rows_path)
    x = _rand((2, 2, 5, 4), 1).requires_grad_(True)
    mask = _rand((2, 9, 3, 2), 2).requires_grad_(True)
    w = _rand((3, 18), 3).requires_grad_(True)
    b = _rand((3,), 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: native.segaware_conv(*t, 3, 1, 2, 1), (x, mask, w, b))


def test_segaware_conv_bad_mask():
    x = torch.zeros((1, 2, 5, 5))
    with pytest.raises(ValueError, match="mask must be"):
        native.segaware_conv(x, torch.zeros((1, 4, 5, 5)), torch.zeros((3, 18)), None, 3, 1)


# ---- loading and fallbacks -------------------------------------------------------------------------
def test_missing_module_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(native._modules, "cpu", None)
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.delitem(native._modules, "cpu")
    import importlib

    real = importlib.import_module

    def fail(name, *a):
        if name == "caffe_layers.native._native_cpu":
            raise ImportError("not built")
        return real(name, *a)

    monkeypatch.setattr(native.importlib, "import_module", fail)
    x = _rand((1, 2, 4, 4), 1)
    with pytest.warns(RuntimeWarning, match="native cpu kernels unavailable"):
        y = im2dist(x, 3, 1)
    with native.disabled():
        torch.testing.assert_close(y, im2dist(x, 3, 1))
    monkeypatch.setitem(native._modules, "cpu", None)


def test_layers_use_native_kernels(monkeypatch):
    """The layers reach the native kernels."""
    calls = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda t, name, *a: (calls.append(name), real(t, name, *a))[1])
    from tests.golden import make_layer

    layer = make_layer('type: "Im2dist" convolution_param { kernel_size: 3 pad: 1 } im2dist_param { norm: L1 }',
                       [(1, 2, 5, 5)])
    layer(_rand((1, 2, 5, 5), 1))
    layer = make_layer('type: "GateRecurrent2dnoind" gaterecurrent2dnoind_param { horizontal: true reverse: false }',
                       [(1, 2, 3, 3)] * 4)
    layer(*[_rand((1, 2, 3, 3), i) for i in range(4)])
    assert calls == ["im2dist_forward", "spn_forward"]


def test_native_modules_are_built():
    """The install compiles the C++ module always and cuda/*.cu wherever nvcc is on PATH (so they cannot rot)."""
    import importlib
    import shutil

    importlib.import_module("caffe_layers.native._native_cpu")
    if shutil.which("nvcc") and not os.environ.get("CAFFE_LAYERS_NO_CUDA"):
        importlib.import_module("caffe_layers.native._native_cuda")


# ---- normalised convolution filtering (NormConv, NormConvMeanfield) ----------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("group,out_mult,with_bias,with_scale", [(1, 2, True, True), ("C", 1, False, True),
                                                                  ("C", 2, True, False)])
def test_norm_conv_filter_matches_reference(device, geom, group, out_mult, with_bias, with_scale):
    from caffe_layers.native import norm_conv_filter

    shape, k, p, s, d = geom
    kh, kw = (k, k) if isinstance(k, int) else k
    C = shape[1]
    group = C if group == "C" else group
    O = (C // group) * group * out_mult if group > 1 else 3 * out_mult
    img = _rand(shape, 21, device=device)
    dist = im2dist(_rand((shape[0], 2, *shape[2:]), 22, device=device), k, p, s, d, "L2").detach().abs()
    w = _rand((O, C // group, kh, kw), 23, device=device)
    extra = ([_rand((O,), 24, device=device)] if with_bias else []) + (
        [torch.tensor(0.7, dtype=torch.float64, device=device)] if with_scale else [])

    def fn(x, dd, ww, *rest):
        b = rest[0] if with_bias else None
        sc = rest[-1] if with_scale else None
        return norm_conv_filter(x, dd, ww, b, sc, p, s, d, group)

    (y, grads), (ry, rgrads) = _both(fn, img, dist, w, *extra)
    _close(y, ry, "forward")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        _close(a, b, f"grad {i}")


@pytest.mark.parametrize("group", [1, 2])
def test_norm_conv_filter_gradcheck(group):
    img = _rand((2, 4, 5, 6), 31).requires_grad_(True)
    dist = _rand((2, 9, 3, 3), 32).abs().requires_grad_(True)
    w = _rand((4, 4 // group, 3, 3), 33).requires_grad_(True)
    b = _rand((4,), 34).requires_grad_(True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: native.norm_conv_filter(*t, pad=1, stride=2, dilation=1, group=group)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (img, dist, w, b, scale))


def test_norm_conv_filter_native_is_used_and_checks_shapes(monkeypatch):
    """norm_conv_filter runs the native kernels: grouped filtering, or the seg-aware column GEMM for group 1."""
    from caffe_layers.native import norm_conv_filter

    img, dist = _rand((1, 2, 5, 5), 1), _rand((1, 9, 5, 5), 3)
    calls = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda t, name, *a: (calls.append(name), real(t, name, *a))[1])
    norm_conv_filter(img, dist, _rand((2, 1, 3, 3), 2), None, None, 1, group=2)
    norm_conv_filter(img, dist, _rand((3, 2, 3, 3), 2), None, None, 1, group=1)
    assert calls == ["normfilter_forward", "segaware_conv_forward"]
    with pytest.raises(ValueError, match="distances of shape"):
        native.norm_conv_filter(img, _rand((1, 4, 5, 5), 3), _rand((2, 2, 3, 3), 2), None, None, 1)


def test_cuda_module_that_refuses_the_driver_falls_back_with_a_warning(monkeypatch):
    """A CUDA module whose runtime cannot use the driver counts as unavailable: references, one warning."""
    import types
    import warnings

    fake = types.SimpleNamespace(probe=lambda: "CUDA driver version is insufficient for CUDA runtime version")
    monkeypatch.setattr(native.importlib, "import_module", lambda name: fake)
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match="native cuda kernels unavailable .*driver version is insufficient"):
        assert not native.available("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        assert not native.available("cuda")
    assert native._modules == {"cuda": None}


# ---- the two CPU builds (baseline and AVX2) ---------------------------------------------------------
@contextlib.contextmanager
def _isa(name):
    """Run the CPU kernels of one instruction set inside the block."""
    native.available("cpu")
    module = native._modules["cpu"]
    old = module.isa()
    module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(old)


def _cpu_has_avx2():
    try:
        with _isa("avx2"):
            return True
    except ValueError:
        return False


@pytest.mark.skipif(not _cpu_has_avx2(), reason="this CPU has no AVX2: only the baseline build can run")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avx2_build_equals_baseline_bit_for_bit(dtype):
    """Both builds do the same operations in the same order (AVX2 without FMA): identical numbers."""
    from caffe_layers.native import norm_conv_filter

    x = _rand((2, 19, 13, 11), 1, dtype)
    gates = [0.3 * _rand((2, 19, 13, 11), s, dtype).abs() for s in (2, 3, 4)]
    mask, w, b = _rand((2, 9, 13, 11), 5, dtype), _rand((7, 19, 3, 3), 6, dtype), _rand((7,), 8, dtype)
    dist, wg = _rand((2, 9, 7, 6), 10, dtype), _rand((19, 1, 3, 3), 11, dtype)
    cases = {
        "im2dist L1": (lambda t: im2dist(t, 3, 2, 1, 2, "L1"), x),
        "im2dist L2": (lambda t: im2dist(t, 3, 2, (2, 1), 1, "L2"), x),
        "seg-aware conv": (lambda *t: segaware_conv(*t, 3, 1, 1, 1), x, mask, w, b),
        "norm conv grouped": (lambda t, dd: norm_conv_filter(t, dd, wg, None, None, 1, 2, 1, 19), x, dist),
    }
    for hz in (True, False):
        for rev in (True, False):
            cases[f"spn three {hz} {rev}"] = (lambda *t, h=hz, r=rev: gate_recurrent(*t, h, r), x, *gates)
            cases[f"spn one {hz} {rev}"] = (lambda a, c, h=hz, r=rev: gate_recurrent(a, c, None, None, h, r, "one"),
                                            x, gates[1])
    for name, (fn, *inputs) in cases.items():
        with _isa("baseline"):
            y, grads = _run(fn, *inputs)
        with _isa("avx2"):
            y2, grads2 = _run(fn, *inputs)
        for i, (u, v) in enumerate(zip([y] + grads, [y2] + grads2)):
            assert torch.equal(u, v), f"{name}: output {i} differs between the builds (max {(u - v).abs().max()})"
    labels = torch.randint(0, 5, (2, 1, 13, 11), generator=torch.Generator().manual_seed(0)).to(dtype)
    with _isa("baseline"):
        base = im2parity(labels, 3, 1, 1, 1, 3)
    with _isa("avx2"):
        assert torch.equal(base, im2parity(labels, 3, 1, 1, 1, 3))
