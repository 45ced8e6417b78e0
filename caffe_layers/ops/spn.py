"""Spatial propagation (Liu et al., NIPS 2017): the scan of caffe-spn's GateRecurrent2dnoind layer.

    h(p) = (1 - sum_k g_k(p)) * x(p) + sum_k g_k(p) * h(n_k(p))

n_1, n_2, n_3 are the three neighbours of p in the previous column (left->right, right->left) or
row (top->bottom, bottom->top). Gates are read at p. A neighbour outside the image contributes
neither its gate nor its value, so the first column (row) is h = x.

Neighbour order, as in the original kernels (dy, dx relative to p):
  left->right  g1 (-1,-1)  g2 (0,-1)  g3 (+1,-1)     right->left  g1 (-1,+1)  g2 (0,+1)  g3 (+1,+1)
  top->bottom  g1 (-1,-1)  g2 (-1,0)  g3 (-1,+1)     bottom->top  g1 (+1,-1)  g2 (+1,0)  g3 (+1,+1)
Each direction is reduced to the left->right scan by transposing and/or flipping the map; in that
canonical frame g1 is the neighbour one row up, g2 the same row, g3 one row down.

`gate_recurrent` is the vectorised scan (one step per column) with a backward that follows the
original's reverse scan; `gate_recurrent_loop` is a plain per-pixel loop of the original kernels,
used by the tests as the reference. connection="one" is the paper's one-way connection (eq. 9):
h(p) = (1 - g(p)) x(p) + g(p) h(p - 1), the straight neighbour only.
"""
import numpy as np
import torch

DIRECTIONS = {  # (horizontal, reverse) -> name
    (True, False): "left->right", (True, True): "right->left",
    (False, False): "top->bottom", (False, True): "bottom->top",
}


def _to_canonical(t, horizontal, reverse):
    """(N, C, H, W) -> (T, N, C, R): scan axis first, scanning forward; R the rows of the frame."""
    if not horizontal:
        t = t.transpose(2, 3)
    if reverse:
        t = t.flip(3)
    return t.permute(3, 0, 1, 2).contiguous()


def _from_canonical(t, horizontal, reverse):
    t = t.permute(1, 2, 3, 0)
    if reverse:
        t = t.flip(3)
    if not horizontal:
        t = t.transpose(2, 3)
    return t.contiguous()


def _masked_gates(g1, g2, g3):
    """Gates in the canonical frame with those of missing neighbours set to zero."""
    g1, g2, g3 = g1.clone(), g2.clone(), g3.clone()
    for g in (g1, g2, g3):
        g[0] = 0          # first column: no previous column
    g1[..., 0] = 0        # top row has no neighbour above
    g3[..., -1] = 0       # bottom row has no neighbour below
    return g1, g2, g3


def _up(t):
    """t[r - 1] at row r (zero at r = 0): the value of the neighbour one row up."""
    out = torch.zeros_like(t)
    out[..., 1:] = t[..., :-1]
    return out


def _down(t):
    """t[r + 1] at row r (zero at the last row)."""
    out = torch.zeros_like(t)
    out[..., :-1] = t[..., 1:]
    return out


def _scan_forward(x, g1, g2, g3):
    """Canonical forward scan; x, g* are (T, N, C, R) with masked gates. Returns H (T, N, C, R)."""
    # h lives in a buffer padded by one zero row on each side: neighbours are plain slices
    hp = x.new_zeros(x.shape[:-1] + (x.shape[-1] + 2,))
    hp[0, ..., 1:-1] = x[0]
    x_part = (1 - g1 - g2 - g3) * x  # the original kernel's operation order
    for t in range(1, x.shape[0]):
        prev = hp[t - 1]
        h_part = g1[t] * prev[..., :-2] + g2[t] * prev[..., 1:-1] + g3[t] * prev[..., 2:]
        torch.add(x_part[t], h_part, out=hp[t, ..., 1:-1])
    return hp[..., 1:-1]


def _scan_backward(dtop, x, g1, g2, g3, h):
    """The original's reverse scan (canonical frame, masked gates): dX, dG1, dG2, dG3.

    dH(p) = top(p) + sum over the successors q of p of dH(q) g_k(q); dX = (1 - sum g) dH;
    dG_k = dH (h(n_k) - x). Gates of missing neighbours get zero: the original leaves them
    unwritten and Caffe's diff buffers start at zero.
    """
    T, R = x.shape[0], x.shape[-1]
    rows = torch.arange(R, device=x.device)
    has_up, has_down = rows > 0, rows < R - 1
    dx, dg1, dg2, dg3 = (torch.zeros_like(x) for _ in range(4))
    nxt = None  # dH of column t + 1
    for t in range(T - 1, -1, -1):
        dh = dtop[t]
        if nxt is not None:
            # successors of row r: r-1 (through its g3), r (g2), r+1 (g1); the original's order
            dh = dh + _up(nxt * g3[t + 1]) + nxt * g2[t + 1] + _down(nxt * g1[t + 1])
        dx[t] = (1 - g1[t] - g2[t] - g3[t]) * dh
        if t > 0:
            prev = h[t - 1]
            dg1[t] = torch.where(has_up, dh * (_up(prev) - x[t]), 0)
            dg2[t] = dh * (prev - x[t])
            dg3[t] = torch.where(has_down, dh * (_down(prev) - x[t]), 0)
        nxt = dh
    return dx, dg1, dg2, dg3


class _GateRecurrent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g1, g2, g3, horizontal, reverse):
        cx = _to_canonical(x, horizontal, reverse)
        cg = _masked_gates(*(_to_canonical(g, horizontal, reverse) for g in (g1, g2, g3)))
        ch = _scan_forward(cx, *cg)
        ctx.save_for_backward(cx, *cg, ch)
        ctx.direction = (horizontal, reverse)
        return _from_canonical(ch, horizontal, reverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dtop):
        horizontal, reverse = ctx.direction
        cx, cg1, cg2, cg3, ch = ctx.saved_tensors
        grads = _scan_backward(_to_canonical(dtop, horizontal, reverse), cx, cg1, cg2, cg3, ch)
        return tuple(_from_canonical(g, horizontal, reverse) for g in grads) + (None, None)


def _check(x, gates, what):
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be (N, C, H, W), got shape {list(x.shape)}")
    for i, g in enumerate(gates, 1):
        if g.shape != x.shape:
            raise ValueError(f"{what}: gate {i} has shape {list(g.shape)}, expected x's {list(x.shape)}")


def gate_recurrent(x, g1, g2=None, g3=None, horizontal=True, reverse=False, connection="three"):
    """Spatial propagation of x (N, C, H, W) in one direction; differentiable.

    connection="three": gates g1, g2, g3 (each x's shape), the original layer.
    connection="one": the single gate g1 weights the straight neighbour (paper eq. 9); g2 and g3
    must be None.
    """
    if connection == "three":
        if g2 is None or g3 is None:
            raise ValueError("gate_recurrent: the three-way connection needs gates g1, g2 and g3")
        gates = (g1, g2, g3)
    elif connection == "one":
        if g2 is not None or g3 is not None:
            raise ValueError("gate_recurrent: the one-way connection takes a single gate g1")
        gates = (g1,)
    else:
        raise ValueError(f"gate_recurrent: connection must be 'three' or 'one', got {connection!r}")
    _check(x, gates, "gate_recurrent")
    if x.device.type == "meta":  # shape inference
        return torch.empty_like(x)
    if connection == "one":  # the straight neighbour is g2's
        zero = torch.zeros_like(g1)
        gates = (zero, g1, zero)
    return _GateRecurrent.apply(x, *gates, bool(horizontal), bool(reverse))


# ---- plain per-pixel reference (tests only) ----------------------------------------------------

_OFFSETS = {  # (horizontal, reverse) -> (dy, dx) of the neighbours of g1, g2, g3
    (True, False): ((-1, -1), (0, -1), (1, -1)),
    (True, True): ((-1, 1), (0, 1), (1, 1)),
    (False, False): ((-1, -1), (-1, 0), (-1, 1)),
    (False, True): ((1, -1), (1, 0), (1, 1)),
}


def _order(H, W, horizontal, reverse):
    """Pixels in scan order: columns (rows) one after another."""
    lines = range(W) if horizontal else range(H)
    lines = reversed(lines) if reverse else lines
    for t in lines:
        for s in range(H if horizontal else W):
            yield (s, t) if horizontal else (t, s)


def gate_recurrent_loop(x, g1, g2, g3, horizontal=True, reverse=False, dtop=None):
    """Per-pixel loops of the original forward (and, with dtop, backward) kernels, on numpy arrays.

    Returns h, or (h, dx, dg1, dg2, dg3) when dtop is given.
    """
    x, gs = np.asarray(x), [np.asarray(g) for g in (g1, g2, g3)]
    N, C, H, W = x.shape
    offs = _OFFSETS[(bool(horizontal), bool(reverse))]
    inside = lambda y, z: 0 <= y < H and 0 <= z < W  # noqa: E731
    h = np.zeros_like(x)
    order = list(_order(H, W, horizontal, reverse))
    for n in range(N):
        for c in range(C):
            for y, z in order:
                acc_g, acc_h = 0.0, 0.0
                for g, (dy, dz) in zip(gs, offs):
                    if inside(y + dy, z + dz):
                        acc_g += g[n, c, y, z]
                        acc_h += g[n, c, y, z] * h[n, c, y + dy, z + dz]
                h[n, c, y, z] = (1 - acc_g) * x[n, c, y, z] + acc_h
    if dtop is None:
        return h
    dh = np.array(dtop, dtype=x.dtype, copy=True)
    dx = np.zeros_like(x)
    dgs = [np.zeros_like(x) for _ in range(3)]
    for n in range(N):
        for c in range(C):
            for y, z in reversed(order):
                # successors: the pixels whose k-th neighbour is (y, z)
                for g, (dy, dz) in zip(gs, offs):
                    if inside(y - dy, z - dz):
                        dh[n, c, y, z] += dh[n, c, y - dy, z - dz] * g[n, c, y - dy, z - dz]
                acc_g = 0.0
                for k, (g, (dy, dz)) in enumerate(zip(gs, offs)):
                    if inside(y + dy, z + dz):
                        acc_g += g[n, c, y, z]
                        dgs[k][n, c, y, z] = dh[n, c, y, z] * (h[n, c, y + dy, z + dz] - x[n, c, y, z])
                dx[n, c, y, z] = (1 - acc_g) * dh[n, c, y, z]
    return (h, dx) + tuple(dgs)


def propagation_matrix(g1, g2, g3, horizontal=True, reverse=False):
    """The dense matrix G of the paper (eq. 3) for one (H, W) map: vec(h) = G vec(x), row-major vec.

    Built column by column (row by row) from h_t = diag(1 - sum g) x_t + W_t h_{t-1}.
    """
    g = [np.asarray(t, dtype=np.float64) for t in (g1, g2, g3)]
    H, W = g[0].shape
    offs = _OFFSETS[(bool(horizontal), bool(reverse))]
    G = np.zeros((H * W, H * W))
    for y, z in _order(H, W, horizontal, reverse):
        row = y * W + z
        G[row, row] = 1.0
        for gk, (dy, dz) in zip(g, offs):
            if 0 <= y + dy < H and 0 <= z + dz < W:
                G[row, row] -= gk[y, z]
                G[row] += gk[y, z] * G[(y + dy) * W + z + dz]  # earlier rows are complete
    return G
