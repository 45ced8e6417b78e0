// CPU kernels of caffe_layers (OpenMP), over raw pointers, float and double; contiguous NCHW tensors.
// The semantics (quirks included) are those of the pure-PyTorch references in caffe_layers/ops.
// No include guard and no includes: native_cpu.cpp includes this file twice, inside two namespaces, after
// the standard headers: once for the baseline x86-64 (SSE2) and once for AVX2, chosen at run time.

// [lo, hi): the output positions o with o * s - p + off inside [0, size).
inline void valid_range(int64_t size, int64_t p, int64_t s, int64_t off, int64_t out, int64_t& lo, int64_t& hi) {
  lo = 0;
  while (lo < out && lo * s - p + off < 0) ++lo;
  hi = lo;
  while (hi < out && hi * s - p + off < size) ++hi;
}

inline bool in(int64_t v, int64_t size) { return v >= 0 && v < size; }

inline int64_t threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads only for enough work (multiply-adds): waking the team costs more than a small kernel, much more
// on a loaded machine.
inline bool parallel_worth(int64_t work) { return work >= (int64_t(1) << 16); }

// ---- im2dist -----------------------------------------------------------------------------------
template <typename T>
void im2dist_forward(const T* x, T* y, const Geom& g, bool l1, bool remove_center, bool remove_bounds, T big) {
  const int64_t K = g.K(), ci = g.kh / 2, cj = g.kw / 2;
  int64_t clo, chi;
  valid_range(g.W, g.pw, g.sw, cj * g.dw, g.Wo, clo, chi);
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * g.Ho * g.K() * g.Wo * g.C))
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t ch = oh * g.sh - g.ph + ci * g.dh;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t hh = oh * g.sh - g.ph + i * g.dh;
        for (int64_t j = 0; j < g.kw; ++j) {
          T* out = y + ((n * K + i * g.kw + j) * g.Ho + oh) * g.Wo;
          std::fill(out, out + g.Wo, T(0));
          if (!in(ch, g.H)) continue;  // centre outside the image: all taps 0
          const bool centre = i == ci && j == cj;
          int64_t nlo, nhi;
          valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, nlo, nhi);
          if (remove_center && centre) {
            for (int64_t o = clo; o < chi; ++o) out[o] = big;
            continue;
          }
          const T outside = remove_bounds ? big : T(0);
          if (!in(hh, g.H)) {
            for (int64_t o = clo; o < chi; ++o) out[o] = outside;
            continue;
          }
          const int64_t lo = std::max(clo, nlo), hi = std::min(chi, nhi);
          const int64_t coff = cj * g.dw - g.pw, noff = j * g.dw - g.pw;
          for (int64_t c = 0; c < g.C; ++c) {
            const T* xc = x + ((n * g.C + c) * g.H + ch) * g.W;
            const T* xn = x + ((n * g.C + c) * g.H + hh) * g.W;
            if (l1) {
              for (int64_t o = lo; o < hi; ++o) out[o] += std::abs(xc[o * g.sw + coff] - xn[o * g.sw + noff]);
            } else {
              for (int64_t o = lo; o < hi; ++o) {
                const T d = xc[o * g.sw + coff] - xn[o * g.sw + noff];
                out[o] += d * d * T(0.5);
              }
            }
          }
          for (int64_t o = clo; o < chi; ++o)
            if (o < nlo || o >= nhi) out[o] = outside;
        }
      }
    }
  }
}

template <typename T, int MODE>
inline T dist_sign(T d) {
  if (MODE == L2) return d;
  if (MODE == L1_TRUE) return T(d > 0) - T(d < 0);
  return d > 0 ? T(1) : T(-1);  // quirk (dist2im_cpu): sign(0) = -1
}

template <typename T, int MODE>
void im2dist_backward_mode(const T* x, const T* gy, T* gx, const Geom& g) {
  const int64_t K = g.K(), ci = g.kh / 2, cj = g.kw / 2, coff = cj * g.dw - g.pw, HW = g.H * g.W;
  int64_t clo, chi;
  valid_range(g.W, g.pw, g.sw, cj * g.dw, g.Wo, clo, chi);
  // Each task owns a block of channels of gx (no write conflicts); the channels of a block are the
  // innermost loop, so each row of gy is read from memory once per block rather than once per channel.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(16, g.N * g.C / (4 * threads())));
  const int64_t blocks = (g.C + block - 1) / block;
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * g.C * g.Ho * g.K() * g.Wo))
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const int64_t c0 = cb * block, c1 = std::min(g.C, c0 + block);
      const T* xb = x + (n * g.C + c0) * HW;
      T* gb = gx + (n * g.C + c0) * HW;
      std::fill(gb, gb + (c1 - c0) * HW, T(0));
      std::vector<T> tmp(g.Wo);
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t ch = oh * g.sh - g.ph + ci * g.dh;
        if (!in(ch, g.H)) continue;  // no gradient from taps of an out-of-image centre
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t hh = oh * g.sh - g.ph + i * g.dh;
          const bool row_in = in(hh, g.H);
          for (int64_t j = 0; j < g.kw; ++j) {
            if (i == ci && j == cj) continue;  // the centre's own distance is constant
            const T* gyr = gy + ((n * K + i * g.kw + j) * g.Ho + oh) * g.Wo;
            int64_t lo = chi, hi = chi;
            if (row_in) {
              int64_t nlo, nhi;
              valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, nlo, nhi);
              lo = std::max(clo, nlo);
              hi = std::max(lo, std::min(chi, nhi));
            }
            const int64_t noff = j * g.dw - g.pw;
            for (int64_t c = 0; c < c1 - c0; ++c) {
              const T* xc = xb + c * HW + ch * g.W + coff;
              T* gc = gb + c * HW + ch * g.W + coff;
              if (MODE == L1_CAFFE) {
                // quirk: an out-of-bounds neighbour (distance stored as 0) still sends -top_diff
                for (int64_t o = clo; o < std::min(lo, chi); ++o) gc[o * g.sw] -= gyr[o];
                for (int64_t o = hi; o < chi; ++o) gc[o * g.sw] -= gyr[o];
              }
              if (lo >= hi) continue;
              const T* xn = xb + c * HW + hh * g.W + noff;
              T* gn = gb + c * HW + hh * g.W + noff;
              // two passes: gc and gn may share a row, a separate buffer lets each loop vectorise
              for (int64_t o = lo; o < hi; ++o) tmp[o] = dist_sign<T, MODE>(xc[o * g.sw] - xn[o * g.sw]) * gyr[o];
              for (int64_t o = lo; o < hi; ++o) gc[o * g.sw] += tmp[o];
              for (int64_t o = lo; o < hi; ++o) gn[o * g.sw] -= tmp[o];
            }
          }
        }
      }
    }
  }
}

template <typename T>
void im2dist_backward(const T* x, const T* gy, T* gx, const Geom& g, int mode) {
  if (mode == L2) im2dist_backward_mode<T, L2>(x, gy, gx, g);
  else if (mode == L1_TRUE) im2dist_backward_mode<T, L1_TRUE>(x, gy, gx, g);
  else im2dist_backward_mode<T, L1_CAFFE>(x, gy, gx, g);
}

// ---- im2parity ---------------------------------------------------------------------------------
template <typename T>
void im2parity_forward(const T* labels, T* y, const Geom& g, bool has_ignore, T ignore, T outside) {
  const int64_t K = g.K(), ci = g.kh / 2, cj = g.kw / 2;
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * g.Ho * g.K() * g.Wo))
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      // C > 1: every channel writes the same outputs, the last one wins
      const T* lab = labels + ((n * g.C) + g.C - 1) * g.H * g.W;
      const int64_t ch = oh * g.sh - g.ph + ci * g.dh;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = k / g.kw, j = k % g.kw;
        const int64_t hh = oh * g.sh - g.ph + i * g.dh;
        T* out = y + ((n * K + k) * g.Ho + oh) * g.Wo;
        for (int64_t o = 0; o < g.Wo; ++o) {
          const int64_t cw = o * g.sw - g.pw + cj * g.dw, nw = o * g.sw - g.pw + j * g.dw;
          if (!in(ch, g.H) || !in(cw, g.W)) {
            out[o] = outside;
            continue;
          }
          const T cv = std::trunc(lab[ch * g.W + cw]);
          const T nv = (in(hh, g.H) && in(nw, g.W)) ? std::trunc(lab[hh * g.W + nw]) : T(0);  // outside reads 0
          T p = nv == cv ? T(1) : T(0);
          if (has_ignore && (nv == ignore || cv == ignore)) p = ignore;
          out[o] = p;
        }
      }
    }
  }
}

// ---- SPN scan ----------------------------------------------------------------------------------
// A plane is scanned line by line: line t (the scan step) holds S values s = 0..S-1 that are contiguous in
// the kernels below, so the inner loops run along the non-scan axis and vectorise. Vertical scans read the
// plane's rows in place; horizontal ones gather strips of kStrip columns into line buffers (strided reads
// of whole planes thrash the cache: rows W apart alias) and scatter the results back.
// g1/g2/g3 (a/b/c) weight the neighbours at s-1, s, s+1 of the previous step; THREE = false is the
// one-way connection (g2 only). The boundary values s = 0 and s = S-1 (missing neighbours) are done apart,
// so the inner loops have no branch.
constexpr int64_t kStrip = 32;

// Per-thread scratch kept between calls: a fresh vector each call is a fresh mmap (and page faults) once
// allocations this size are mmapped, as under MALLOC_MMAP_THRESHOLD_.
template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> v;
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <typename T, bool THREE>
inline void forward_line(const T* __restrict__ xs, const T* __restrict__ a, const T* __restrict__ b,
                         const T* __restrict__ c, const T* __restrict__ hp, T* __restrict__ hc, int64_t S) {
  if (!hp) {  // first step: h = x
    std::copy(xs, xs + S, hc);
    return;
  }
  if (!THREE || S == 1) {
    for (int64_t s = 0; s < S; ++s) hc[s] = (T(1) - b[s]) * xs[s] + b[s] * hp[s];
    return;
  }
  const int64_t e = S - 1;
  hc[0] = (T(1) - b[0] - c[0]) * xs[0] + (b[0] * hp[0] + c[0] * hp[1]);
  for (int64_t s = 1; s < e; ++s)
    hc[s] = (T(1) - a[s] - b[s] - c[s]) * xs[s] + (a[s] * hp[s - 1] + b[s] * hp[s] + c[s] * hp[s + 1]);
  hc[e] = (T(1) - a[e] - b[e]) * xs[e] + (a[e] * hp[e - 1] + b[e] * hp[e]);
}

// The reverse scan's state: n1/n2/n3 (padded by one zero on each side) hold dH(q) * g_k(q) of the step
// after, so dH(p) = top(p) + n3[s-1] + n2[s] + n1[s+1] needs no bounds checks; c1/c2/c3 are being written.
template <typename T>
struct ScanState {
  std::vector<T> buf;
  T *n1, *n2, *n3, *c1, *c2, *c3;
  explicit ScanState(int64_t S) : buf(6 * (S + 2), T(0)) {
    T* p = buf.data() + 1;
    n1 = p, n2 = p + (S + 2), n3 = p + 2 * (S + 2), c1 = p + 3 * (S + 2), c2 = p + 4 * (S + 2), c3 = p + 5 * (S + 2);
  }
  void reset() { std::fill(buf.begin(), buf.end(), T(0)); }
};

template <typename T, bool THREE>
inline void backward_line(const T* __restrict__ top, const T* __restrict__ xs, const T* __restrict__ a,
                          const T* __restrict__ b, const T* __restrict__ c, const T* __restrict__ hp,
                          T* __restrict__ gx, T* __restrict__ ga, T* __restrict__ gb, T* __restrict__ gc,
                          ScanState<T>& st, int64_t S) {
  T* __restrict__ d = st.c2;  // dH of this step, then dH * g2
  const T *n1 = st.n1, *n2 = st.n2, *n3 = st.n3;
  if (THREE) {
    for (int64_t s = 0; s < S; ++s) d[s] = top[s] + (n3[s - 1] + n2[s] + n1[s + 1]);
  } else {
    for (int64_t s = 0; s < S; ++s) d[s] = top[s] + n2[s];
  }
  if (!hp) {  // first step: h = x, gates unused
    std::copy(d, d + S, gx);
    std::fill(gb, gb + S, T(0));
    if (THREE) {
      std::fill(ga, ga + S, T(0));
      std::fill(gc, gc + S, T(0));
    }
    return;
  }
  if (!THREE) {
    for (int64_t s = 0; s < S; ++s) {
      gx[s] = (T(1) - b[s]) * d[s];
      gb[s] = d[s] * (hp[s] - xs[s]);
      d[s] *= b[s];
    }
  } else {
    T* __restrict__ c1 = st.c1;
    T* __restrict__ c3 = st.c3;
    const int64_t e = S - 1;
    ga[0] = 0;  // no neighbour at s - 1 for s = 0, none at s + 1 for s = S - 1: their gates get zero
    gc[e] = 0;
    for (int64_t s = 1; s < S; ++s) ga[s] = d[s] * (hp[s - 1] - xs[s]);
    for (int64_t s = 0; s < e; ++s) gc[s] = d[s] * (hp[s + 1] - xs[s]);
    if (S == 1) {
      gx[0] = (T(1) - b[0]) * d[0];
    } else {
      gx[0] = (T(1) - b[0] - c[0]) * d[0];
      for (int64_t s = 1; s < e; ++s) gx[s] = (T(1) - a[s] - b[s] - c[s]) * d[s];
      gx[e] = (T(1) - a[e] - b[e]) * d[e];
    }
    for (int64_t s = 0; s < S; ++s) {
      gb[s] = d[s] * (hp[s] - xs[s]);
      c1[s] = d[s] * a[s];
      c3[s] = d[s] * c[s];
      d[s] *= b[s];
    }
  }
  std::swap(st.n1, st.c1);
  std::swap(st.n2, st.c2);
  std::swap(st.n3, st.c3);
}

// Horizontal scans: steps [t0, t0 + cnt) of a row-major H x W plane <-> cnt lines of S = H values. The
// plane side is walked row by row (sequential, prefetched), the line buffer (cache-resident) is strided;
// float tiles of 4 x 4 go through SSE transposes (the strided scalar copies were half the horizontal time).
template <typename T>
inline void gather_tile(const T* plane, T* lines, int64_t W, int64_t S, int64_t t0, int64_t s0, int64_t s1, int64_t j0,
                        int64_t j1, bool rev) {
  for (int64_t s = s0; s < s1; ++s) {
    const T* row = plane + s * W;
    for (int64_t j = j0; j < j1; ++j) lines[j * S + s] = row[rev ? W - 1 - t0 - j : t0 + j];
  }
}

template <typename T>
inline void scatter_tile(const T* lines, T* plane, int64_t W, int64_t S, int64_t t0, int64_t s0, int64_t s1, int64_t j0,
                         int64_t j1, bool rev) {
  for (int64_t s = s0; s < s1; ++s) {
    T* row = plane + s * W;
    for (int64_t j = j0; j < j1; ++j) row[rev ? W - 1 - t0 - j : t0 + j] = lines[j * S + s];
  }
}

#if defined(__SSE2__)
inline __m128 reversed(__m128 v) { return _mm_shuffle_ps(v, v, _MM_SHUFFLE(0, 1, 2, 3)); }

// 4 x 4 float tile: rows s0..s0+3 of the plane, steps j0..j0+3 (columns t0+j, or W-1-t0-j reversed)
inline void gather_tile4(const float* plane, float* lines, int64_t W, int64_t S, int64_t t0, int64_t s0, int64_t j0,
                         bool rev) {
  const int64_t col = rev ? W - 1 - t0 - j0 - 3 : t0 + j0;
  __m128 r[4];
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm_loadu_ps(plane + (s0 + q) * W + col);
    if (rev) r[q] = reversed(r[q]);
  }
  _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
  for (int q = 0; q < 4; ++q) _mm_storeu_ps(lines + (j0 + q) * S + s0, r[q]);
}

inline void scatter_tile4(const float* lines, float* plane, int64_t W, int64_t S, int64_t t0, int64_t s0, int64_t j0,
                          bool rev) {
  const int64_t col = rev ? W - 1 - t0 - j0 - 3 : t0 + j0;
  __m128 r[4];
  for (int q = 0; q < 4; ++q) r[q] = _mm_loadu_ps(lines + (j0 + q) * S + s0);
  _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
  for (int q = 0; q < 4; ++q) _mm_storeu_ps(plane + (s0 + q) * W + col, rev ? reversed(r[q]) : r[q]);
}
#endif

template <typename T>
void gather(const T* plane, T* lines, int64_t W, int64_t S, int64_t t0, int64_t cnt, bool rev) {
  int64_t s4 = 0, j4 = 0;
#if defined(__SSE2__)
  if (std::is_same<T, float>::value) {
    s4 = S / 4 * 4, j4 = cnt / 4 * 4;
    for (int64_t s0 = 0; s0 < s4; s0 += 4) {
      for (int64_t j0 = 0; j0 < j4; j0 += 4)
        gather_tile4(reinterpret_cast<const float*>(plane), reinterpret_cast<float*>(lines), W, S, t0, s0, j0, rev);
    }
    gather_tile(plane, lines, W, S, t0, 0, s4, j4, cnt, rev);  // right-hand remainder
  }
#endif
  gather_tile(plane, lines, W, S, t0, s4, S, 0, cnt, rev);  // bottom remainder (all of it for double)
}

template <typename T>
void scatter(const T* lines, T* plane, int64_t W, int64_t S, int64_t t0, int64_t cnt, bool rev) {
  int64_t s4 = 0, j4 = 0;
#if defined(__SSE2__)
  if (std::is_same<T, float>::value) {
    s4 = S / 4 * 4, j4 = cnt / 4 * 4;
    for (int64_t s0 = 0; s0 < s4; s0 += 4)
      for (int64_t j0 = 0; j0 < j4; j0 += 4)
        scatter_tile4(reinterpret_cast<const float*>(lines), reinterpret_cast<float*>(plane), W, S, t0, s0, j0, rev);
    scatter_tile(lines, plane, W, S, t0, 0, s4, j4, cnt, rev);
  }
#endif
  scatter_tile(lines, plane, W, S, t0, s4, S, 0, cnt, rev);
}

template <typename T, bool THREE>
void scan_forward_plane(const T* x, const T* g1, const T* g2, const T* g3, T* h, int64_t H, int64_t W, bool hz,
                        bool rev, T* buf) {
  if (!hz) {  // lines = rows, in place
    auto L = [&](int64_t t) { return (rev ? H - 1 - t : t) * W; };
    for (int64_t t = 0; t < H; ++t)
      forward_line<T, THREE>(x + L(t), THREE ? g1 + L(t) : nullptr, g2 + L(t), THREE ? g3 + L(t) : nullptr,
                             t ? h + L(t - 1) : nullptr, h + L(t), W);
    return;
  }
  const int64_t S = H, n = kStrip * S;
  T *bx = buf, *ba = bx + n, *bb = ba + n, *bc = bb + n, *bh = bc + n, *prev = bh + n;
  for (int64_t t0 = 0; t0 < W; t0 += kStrip) {
    const int64_t cnt = std::min(kStrip, W - t0);
    gather(x, bx, W, S, t0, cnt, rev);
    gather(g2, bb, W, S, t0, cnt, rev);
    if (THREE) {
      gather(g1, ba, W, S, t0, cnt, rev);
      gather(g3, bc, W, S, t0, cnt, rev);
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const T* hp = t0 + j == 0 ? nullptr : (j ? bh + (j - 1) * S : prev);
      forward_line<T, THREE>(bx + j * S, ba + j * S, bb + j * S, bc + j * S, hp, bh + j * S, S);
    }
    std::copy(bh + (cnt - 1) * S, bh + cnt * S, prev);
    scatter(bh, h, W, S, t0, cnt, rev);
  }
}

// Reverse scan of dH alone along one line (horizontal scans): d = dH of this step, into the state for the next.
template <typename T, bool THREE>
inline void dh_line(const T* __restrict__ top, const T* __restrict__ a, const T* __restrict__ b,
                    const T* __restrict__ c, T* __restrict__ d, ScanState<T>& st, int64_t S) {
  const T *n1 = st.n1, *n2 = st.n2, *n3 = st.n3;
  T *__restrict__ c1 = st.c1, *__restrict__ c2 = st.c2, *__restrict__ c3 = st.c3;
  if (THREE) {
    #pragma GCC ivdep
    for (int64_t s = 0; s < S; ++s) {
      const T v = top[s] + (n3[s - 1] + n2[s] + n1[s + 1]);
      d[s] = v;
      c1[s] = v * a[s];
      c2[s] = v * b[s];
      c3[s] = v * c[s];
    }
  } else {
    #pragma GCC ivdep
    for (int64_t s = 0; s < S; ++s) {
      const T v = top[s] + n2[s];
      d[s] = v;
      c2[s] = v * b[s];
    }
  }
  std::swap(st.n1, st.c1);
  std::swap(st.n2, st.c2);
  std::swap(st.n3, st.c3);
}

// Row r of a horizontally scanned plane: dx holds dH on entry, the gradients of backward_line on exit.
// Step order runs along the row (reversed for right->left): the previous step's column is q = col -/+ 1.
template <typename T, bool THREE>
inline void grad_row(const T* x, const T* g1, const T* g2, const T* g3, const T* h, T* dx, T* dg1, T* dg2, T* dg3,
                     int64_t r, int64_t H, int64_t W, bool rev) {
  const int64_t o = r * W, first = rev ? W - 1 : 0;  // the first step's column: h = x, gates unused
  const int64_t lo = rev ? 0 : 1, hi = rev ? W - 1 : W, q = rev ? 1 : -1;  // columns with a previous step
  const T *__restrict__ xs = x + o, *__restrict__ b = g2 + o, *__restrict__ hp = h + o + q;
  T *__restrict__ gx = dx + o, *__restrict__ gb = dg2 + o;
  gb[first] = 0;
  if (THREE) dg1[o + first] = 0, dg3[o + first] = 0;
  if (!THREE || H == 1) {
    #pragma GCC ivdep
    for (int64_t k = lo; k < hi; ++k) {
      const T d = gx[k];
      gx[k] = (T(1) - b[k]) * d;
      gb[k] = d * (hp[k] - xs[k]);
    }
    if (THREE)
      #pragma GCC ivdep
      for (int64_t k = lo; k < hi; ++k) dg1[o + k] = 0, dg3[o + k] = 0;
    return;
  }
  const T *__restrict__ a = g1 + o, *__restrict__ c = g3 + o;
  T *__restrict__ ga = dg1 + o, *__restrict__ gc = dg3 + o;
  const T* up = r > 0 ? hp - W : nullptr;      // h of the row above, previous step
  const T* dn = r < H - 1 ? hp + W : nullptr;  // h of the row below
  if (up && dn) {
    #pragma GCC ivdep
    for (int64_t k = lo; k < hi; ++k) {
      const T d = gx[k];
      gx[k] = (T(1) - a[k] - b[k] - c[k]) * d;
      ga[k] = d * (up[k] - xs[k]);
      gb[k] = d * (hp[k] - xs[k]);
      gc[k] = d * (dn[k] - xs[k]);
    }
  } else if (dn) {  // top row: no neighbour above, its gate gets zero
    #pragma GCC ivdep
    for (int64_t k = lo; k < hi; ++k) {
      const T d = gx[k];
      gx[k] = (T(1) - b[k] - c[k]) * d;
      ga[k] = 0;
      gb[k] = d * (hp[k] - xs[k]);
      gc[k] = d * (dn[k] - xs[k]);
    }
  } else {  // bottom row
    #pragma GCC ivdep
    for (int64_t k = lo; k < hi; ++k) {
      const T d = gx[k];
      gx[k] = (T(1) - a[k] - b[k]) * d;
      ga[k] = d * (up[k] - xs[k]);
      gb[k] = d * (hp[k] - xs[k]);
      gc[k] = 0;
    }
  }
}

template <typename T, bool THREE>
void scan_backward_plane(const T* x, const T* g1, const T* g2, const T* g3, const T* h, const T* dtop, T* dx, T* dg1,
                         T* dg2, T* dg3, int64_t H, int64_t W, bool hz, bool rev, ScanState<T>& st, T* buf) {
  st.reset();
  if (!hz) {  // lines = rows, in place
    auto L = [&](int64_t t) { return (rev ? H - 1 - t : t) * W; };
    for (int64_t t = H - 1; t >= 0; --t) {
      const int64_t o = L(t);
      backward_line<T, THREE>(dtop + o, x + o, THREE ? g1 + o : nullptr, g2 + o, THREE ? g3 + o : nullptr,
                              t ? h + L(t - 1) : nullptr, dx + o, THREE ? dg1 + o : nullptr, dg2 + o,
                              THREE ? dg3 + o : nullptr, st, W);
    }
    return;
  }
  // Horizontal: only dH needs the reverse scan, which reads top and the gates; the strips carry those in
  // and dH out (into dx), and the gradients follow in one row-major pass (half the transposes).
  const int64_t S = H, n = kStrip * S;
  T *bt = buf, *ba = bt + n, *bb = ba + n, *bc = bb + n, *bd = bc + n;
  for (int64_t t1 = W; t1 > 0; t1 -= kStrip) {
    const int64_t t0 = std::max<int64_t>(0, t1 - kStrip), cnt = t1 - t0;
    gather(dtop, bt, W, S, t0, cnt, rev);
    gather(g2, bb, W, S, t0, cnt, rev);
    if (THREE) {
      gather(g1, ba, W, S, t0, cnt, rev);
      gather(g3, bc, W, S, t0, cnt, rev);
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t j = (t - t0) * S;
      dh_line<T, THREE>(bt + j, ba + j, bb + j, bc + j, bd + j, st, S);
    }
    scatter(bd, dx, W, S, t0, cnt, rev);
  }
  for (int64_t r = 0; r < H; ++r)
    grad_row<T, THREE>(x, g1, g2, g3, h, dx, dg1, dg2, dg3, r, H, W, rev);
}

// x, g*, h: planes x H x W (g1 = g3 = null: one-way). One (n, c) plane per task; dynamic schedule: on a
// loaded machine a thread that gets less CPU time takes fewer planes.
template <typename T>
void spn_forward(const T* x, const T* g1, const T* g2, const T* g3, T* h, int64_t planes, int64_t H, int64_t W,
                 bool hz, bool rev) {
  const bool three = g1 != nullptr;
#pragma omp parallel if (parallel_worth(planes * H * W))
  {
    T* buf = hz ? scratch<T>(6 * kStrip * H) : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t pl = 0; pl < planes; ++pl) {
      const int64_t b = pl * H * W;
      if (three) scan_forward_plane<T, true>(x + b, g1 + b, g2 + b, g3 + b, h + b, H, W, hz, rev, buf);
      else scan_forward_plane<T, false>(x + b, nullptr, g2 + b, nullptr, h + b, H, W, hz, rev, buf);
    }
  }
}

template <typename T>
void spn_backward(const T* x, const T* g1, const T* g2, const T* g3, const T* h, const T* dtop, T* dx, T* dg1,
                  T* dg2, T* dg3, int64_t planes, int64_t H, int64_t W, bool hz, bool rev) {
  const bool three = g1 != nullptr;
#pragma omp parallel if (parallel_worth(planes * H * W))
  {
    ScanState<T> st(hz ? H : W);
    T* buf = hz ? scratch<T>(5 * kStrip * H) : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t pl = 0; pl < planes; ++pl) {
      const int64_t b = pl * H * W;
      if (three)
        scan_backward_plane<T, true>(x + b, g1 + b, g2 + b, g3 + b, h + b, dtop + b, dx + b, dg1 + b, dg2 + b,
                                     dg3 + b, H, W, hz, rev, st, buf);
      else
        scan_backward_plane<T, false>(x + b, nullptr, g2 + b, nullptr, h + b, dtop + b, dx + b, nullptr, dg2 + b,
                                      nullptr, H, W, hz, rev, st, buf);
    }
  }
}

// ---- segmentation-aware convolution ------------------------------------------------------------
// cols[(c*K + k), p - p0] = im2col(x)[c, k, p] * mask[k, p] for the rows ck in [ck0, ck1) and the output
// positions p in [p0, p1) of image n (a span may start and end inside an output row).
template <typename T>
void masked_im2col_span(const T* x, const T* mask, T* cols, const Geom& g, int64_t n, int64_t p0, int64_t p1,
                        int64_t ck0, int64_t ck1) {
  const int64_t K = g.K(), span = p1 - p0;
  for (int64_t ck = ck0; ck < ck1; ++ck) {
    const int64_t c = ck / K, k = ck % K, i = k / g.kw, j = k % g.kw;
    const T* xc = x + (n * g.C + c) * g.H * g.W;
    int64_t lo, hi;
    valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
    for (int64_t p = p0; p < p1;) {
      const int64_t oh = p / g.Wo, ow0 = p % g.Wo, ow1 = std::min(g.Wo, ow0 + (p1 - p));
      T* d = cols + ck * span + (p - p0) - ow0;  // d[ow] is position (oh, ow)
      p += ow1 - ow0;
      const int64_t hh = oh * g.sh - g.ph + i * g.dh;
      if (!in(hh, g.H)) {
        std::fill(d + ow0, d + ow1, T(0));
        continue;
      }
      const T* m = mask + ((n * K + k) * g.Ho + oh) * g.Wo;
      const T* xr = xc + hh * g.W + j * g.dw - g.pw;
      const int64_t a = std::max(ow0, std::min(lo, ow1)), b = std::max(a, std::min(hi, ow1));
      for (int64_t o = ow0; o < a; ++o) d[o] = 0;
      if (g.sw == 1) {  // contiguous: lets the compiler vectorise
        for (int64_t o = a; o < b; ++o) d[o] = xr[o] * m[o];
      } else {
        for (int64_t o = a; o < b; ++o) d[o] = xr[o * g.sw] * m[o];
      }
      for (int64_t o = b; o < ow1; ++o) d[o] = 0;
    }
  }
}

// The masked columns of output rows [r0, r1) of image n, in parallel over the rows of cols.
template <typename T>
void masked_im2col(const T* x, const T* mask, T* cols, const Geom& g, int64_t n, int64_t r0, int64_t r1) {
  const int64_t CK = g.C * g.K();
#pragma omp parallel for schedule(static) if (parallel_worth(CK * (r1 - r0) * g.Wo))
  for (int64_t ck = 0; ck < CK; ++ck) masked_im2col_span(x, mask, cols, g, n, r0 * g.Wo, r1 * g.Wo, ck, ck + 1);
}

// The Fortran BLAS ?gemm (column-major), as exported by the BLAS torch links; Python passes its address.
template <typename T>
using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                      const T*, const int*, const T*, T*, const int*);

// The fused forward y[n] = w (O x CK) * masked_im2col(x[n]) + b, a tile of `tile` output positions at a time:
// each thread fills its own column buffer for a tile (small enough to stay in its cache) and multiplies it
// straight into y's columns of the tile (no copy; y[n] is O x P with leading dimension P). One parallel region
// for the whole call, so the gemm inside runs on its thread alone (the BLAS does not nest).
template <typename T>
void segaware_conv_forward(const T* x, const T* mask, const T* w, const T* b, T* y, const Geom& g, int64_t O,
                           int64_t tile, Gemm<T> gemm) {
  const int64_t CK = g.C * g.K(), P = g.Ho * g.Wo, tiles = (P + tile - 1) / tile;
  const int ldc = int(P), k = int(CK), n_out = int(O);
  const T one = 1, zero = 0;
#pragma omp parallel if (parallel_worth(g.N * P * CK * O) && g.N * tiles > 1)
  {
    // 64-byte aligned: the BLAS's results do not then depend on where the allocator put the buffer
    const size_t bytes = (size_t(CK * tile) * sizeof(T) + 63) / 64 * 64;
    T* cols = static_cast<T*>(std::aligned_alloc(64, bytes));
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t p0 = t * tile, p1 = std::min(P, p0 + tile);
        const int m = int(p1 - p0);
        masked_im2col_span(x, mask, cols, g, n, p0, p1, 0, CK);
        T* out = y + n * O * P + p0;
        if (b) {
          for (int64_t o = 0; o < O; ++o) std::fill(out + o * P, out + o * P + m, b[o]);
        }
        gemm("N", "N", &m, &n_out, &k, &one, cols, &m, w, &k, b ? &one : &zero, out, &ldc);
      }
    }
    std::free(cols);
  }
}

// Backward of masked_im2col_span for the output positions [p0, p1) of image n (dcols: C*K x (p1 - p0)):
// gx[n] += col2im(dcols * mask) where gx is given; gmask[n, :, p] = sum_c dcols * col where gmask is given.
template <typename T>
void masked_col2im_span(const T* x, const T* mask, const T* dcols, T* gx, T* gmask, const Geom& g, int64_t n,
                        int64_t p0, int64_t p1) {
  const int64_t K = g.K(), span = p1 - p0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = k / g.kw, j = k % g.kw;
    int64_t lo, hi;
    valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
    for (int64_t p = p0; p < p1;) {
      const int64_t oh = p / g.Wo, ow0 = p % g.Wo, ow1 = std::min(g.Wo, ow0 + (p1 - p));
      const int64_t at = (p - p0) - ow0;  // dcols row + at + ow is position (oh, ow)
      p += ow1 - ow0;
      const int64_t hh = oh * g.sh - g.ph + i * g.dh;
      T* gm = gmask ? gmask + ((n * K + k) * g.Ho + oh) * g.Wo : nullptr;
      if (gm) std::fill(gm + ow0, gm + ow1, T(0));
      if (!in(hh, g.H)) continue;
      const T* m = mask + ((n * K + k) * g.Ho + oh) * g.Wo;
      const int64_t a = std::max(ow0, std::min(lo, ow1)), b = std::max(a, std::min(hi, ow1));
      for (int64_t c = 0; c < g.C; ++c) {
        const T* s = dcols + (c * K + k) * span + at;
        const int64_t row = ((n * g.C + c) * g.H + hh) * g.W + j * g.dw - g.pw;
        if (gx) {
          T* gr = gx + row;
          for (int64_t o = a; o < b; ++o) gr[o * g.sw] += s[o] * m[o];
        }
        if (gm) {
          const T* xr = x + row;
          for (int64_t o = a; o < b; ++o) gm[o] += s[o] * xr[o * g.sw];
        }
      }
    }
  }
}

// The fused backward: gw (O x CK, zeroed) += gy masked_im2col(x)^T, and d cols = w^T gy into
// masked_col2im_span (gx zeroed; gx, gmask or gw null: not wanted), tile by tile as the forward. Each thread
// takes a contiguous block of tiles and sums gx and gw into its own buffers (thread 0 into gx and gw), added in
// thread order at the end: the result does not depend on the scheduling.
template <typename T>
void segaware_conv_backward(const T* x, const T* mask, const T* w, const T* gy, T* gx, T* gmask, T* gw,
                            const Geom& g, int64_t O, int64_t tile, Gemm<T> gemm) {
  const int64_t CK = g.C * g.K(), P = g.Ho * g.Wo, tiles = (P + tile - 1) / tile, jobs = g.N * tiles;
  const int64_t x_size = g.N * g.C * g.H * g.W, w_size = O * CK;
  const int ldy = int(P), k = int(CK), n_out = int(O);
  const T one = 1, zero = 0;
  const int team = parallel_worth(g.N * P * CK * O) ? int(std::min<int64_t>(threads(), jobs)) : 1;
  std::vector<T*> gx_of(team, nullptr), gw_of(team, nullptr);  // the threads' sums (thread 0: gx and gw)
  gx_of[0] = gx;
  gw_of[0] = gw;
#pragma omp parallel num_threads(team)
  {
#if defined(_OPENMP)
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();  // nt <= team
#else
    const int t = 0, nt = 1;
#endif
    if (t > 0 && gx) gx_of[t] = static_cast<T*>(std::calloc(x_size, sizeof(T)));
    if (t > 0 && gw) gw_of[t] = static_cast<T*>(std::calloc(w_size, sizeof(T)));
    const size_t bytes = (size_t(CK * tile) * sizeof(T) + 63) / 64 * 64;
    T* cols = static_cast<T*>(std::aligned_alloc(64, bytes));
    for (int64_t job = jobs * t / nt; job < jobs * (t + 1) / nt; ++job) {
      const int64_t n = job / tiles, p0 = job % tiles * tile, p1 = std::min(P, p0 + tile);
      const int m = int(p1 - p0);
      const T* gyt = gy + n * O * P + p0;
      if (gw) {
        masked_im2col_span(x, mask, cols, g, n, p0, p1, 0, CK);
        gemm("T", "N", &k, &n_out, &m, &one, cols, &m, gyt, &ldy, &one, gw_of[t], &k);
      }
      if (gx || gmask) {  // the buffer now takes d cols
        gemm("N", "T", &m, &k, &n_out, &one, gyt, &ldy, w, &k, &zero, cols, &m);
        masked_col2im_span(x, mask, cols, gx_of[t], gmask, g, n, p0, p1);
      }
    }
    std::free(cols);
#pragma omp barrier
    if (gx && nt > 1) {
#pragma omp for schedule(static)
      for (int64_t e = 0; e < x_size; ++e) {
        for (int u = 1; u < nt; ++u) gx[e] += gx_of[u][e];
      }
    }
    if (gw && nt > 1) {
#pragma omp for schedule(static)
      for (int64_t e = 0; e < w_size; ++e) {
        for (int u = 1; u < nt; ++u) gw[e] += gw_of[u][e];
      }
    }
  }
  for (int u = 1; u < team; ++u) {
    std::free(gx_of[u]);
    std::free(gw_of[u]);
  }
}

// Backward of masked_im2col for a chunk: gx[n] += col2im(dcols * mask); gmask[n, :, r0:r1] = sum_c dcols * col.
// One parallel region (two work-shared loops writing different arrays, no barrier between them): under load
// every extra region costs a thread hand-over.
template <typename T>
void masked_col2im(const T* x, const T* mask, const T* dcols, T* gx, T* gmask, const Geom& g, int64_t n,
                   int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo;
#pragma omp parallel if (parallel_worth(g.C * g.K() * (r1 - r0) * g.Wo))
  {
    if (gx) {
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < g.C; ++c) {
        T* gc = gx + (n * g.C + c) * g.H * g.W;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k / g.kw, j = k % g.kw;
          int64_t lo, hi;
          valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
          const T* src = dcols + (c * K + k) * P;
          for (int64_t oh = r0; oh < r1; ++oh) {
            const int64_t hh = oh * g.sh - g.ph + i * g.dh;
            if (!in(hh, g.H)) continue;
            const T* m = mask + ((n * K + k) * g.Ho + oh) * g.Wo;
            const T* s = src + (oh - r0) * g.Wo;
            T* gr = gc + hh * g.W + j * g.dw - g.pw;
            if (g.sw == 1) {
              for (int64_t o = lo; o < hi; ++o) gr[o] += s[o] * m[o];
            } else {
              for (int64_t o = lo; o < hi; ++o) gr[o * g.sw] += s[o] * m[o];
            }
          }
        }
      }
    }
    if (gmask) {
#pragma omp for collapse(2) schedule(static) nowait
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t oh = r0; oh < r1; ++oh) {
          const int64_t i = k / g.kw, j = k % g.kw;
          const int64_t hh = oh * g.sh - g.ph + i * g.dh;
          T* gm = gmask + ((n * K + k) * g.Ho + oh) * g.Wo;
          std::fill(gm, gm + g.Wo, T(0));
          if (!in(hh, g.H)) continue;
          int64_t lo, hi;
          valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
          for (int64_t c = 0; c < g.C; ++c) {
            const T* s = dcols + (c * K + k) * P + (oh - r0) * g.Wo;
            const T* xr = x + ((n * g.C + c) * g.H + hh) * g.W + j * g.dw - g.pw;
            if (g.sw == 1) {
              for (int64_t o = lo; o < hi; ++o) gm[o] += s[o] * xr[o];
            } else {
              for (int64_t o = lo; o < hi; ++o) gm[o] += s[o] * xr[o * g.sw];
            }
          }
        }
      }
    }
  }
}

// ---- normalised convolution filtering (NormConv, NormConvMeanfield) -------------------------------
// y[n, o, p] = b[o] + sum_{c in group(o), k} w[o, c, k] * x[n, c, p + offset_k] * soft[n, k, p]: a grouped
// convolution whose taps are weighted per output position by soft (the softmax of the embedding
// distances, N x K x Ho x Wo, computed by the caller). Out-of-image taps read 0.
template <typename T>
void normfilter_forward(const T* x, const T* soft, const T* w, const T* b, T* y, const Geom& g, const Groups& q) {
  const int64_t K = g.K(), P = g.Ho * g.Wo;
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * q.O * q.Cg * g.K() * g.Ho * g.Wo))
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t o = 0; o < q.O; ++o) {
      T* yo = y + (n * q.O + o) * P;
      std::fill(yo, yo + P, b ? b[o] : T(0));
      for (int64_t cc = 0; cc < q.Cg; ++cc) {
        const T* xc = x + (n * g.C + (o / q.Og) * q.Cg + cc) * g.H * g.W;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k / g.kw, j = k % g.kw;
          const T wv = w[(o * q.Cg + cc) * K + k];
          int64_t lo, hi;
          valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            const int64_t hh = oh * g.sh - g.ph + i * g.dh;
            if (!in(hh, g.H)) continue;
            const T* xr = xc + hh * g.W + j * g.dw - g.pw;
            const T* sr = soft + ((n * K + k) * g.Ho + oh) * g.Wo;
            T* yr = yo + oh * g.Wo;
            for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * (xr[ow * g.sw] * sr[ow]);
          }
        }
      }
    }
  }
}

// Gradients wrt x, soft and w (any may be null), each gathered by its own owner: no write conflicts.
template <typename T>
void normfilter_backward(const T* x, const T* soft, const T* w, const T* gy, T* gx, T* gsoft, T* gw, const Geom& g,
                         const Groups& q) {
  const int64_t K = g.K(), P = g.Ho * g.Wo, HW = g.H * g.W;
  if (gx) {
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * q.O * q.Cg * g.K() * g.Ho * g.Wo))
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        T* gc = gx + (n * g.C + c) * HW;
        std::fill(gc, gc + HW, T(0));
        const int64_t grp = c / q.Cg, cc = c % q.Cg;
        for (int64_t o = grp * q.Og; o < (grp + 1) * q.Og; ++o) {
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = k / g.kw, j = k % g.kw;
            const T wv = w[(o * q.Cg + cc) * K + k];
            int64_t lo, hi;
            valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
            for (int64_t oh = 0; oh < g.Ho; ++oh) {
              const int64_t hh = oh * g.sh - g.ph + i * g.dh;
              if (!in(hh, g.H)) continue;
              const T* gr = gy + ((n * q.O + o) * g.Ho + oh) * g.Wo;
              const T* sr = soft + ((n * K + k) * g.Ho + oh) * g.Wo;
              T* xr = gc + hh * g.W + j * g.dw - g.pw;
              for (int64_t ow = lo; ow < hi; ++ow) xr[ow * g.sw] += wv * (gr[ow] * sr[ow]);
            }
          }
        }
      }
    }
  }
  if (gsoft) {
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(g.N * q.O * q.Cg * g.K() * g.Ho * g.Wo))
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        T* gs = gsoft + (n * K + k) * P;
        std::fill(gs, gs + P, T(0));
        const int64_t i = k / g.kw, j = k % g.kw;
        int64_t lo, hi;
        valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
        for (int64_t o = 0; o < q.O; ++o) {
          for (int64_t cc = 0; cc < q.Cg; ++cc) {
            const T wv = w[(o * q.Cg + cc) * K + k];
            const T* xc = x + (n * g.C + (o / q.Og) * q.Cg + cc) * HW;
            for (int64_t oh = 0; oh < g.Ho; ++oh) {
              const int64_t hh = oh * g.sh - g.ph + i * g.dh;
              if (!in(hh, g.H)) continue;
              const T* xr = xc + hh * g.W + j * g.dw - g.pw;
              const T* gr = gy + ((n * q.O + o) * g.Ho + oh) * g.Wo;
              T* sr = gs + oh * g.Wo;
              for (int64_t ow = lo; ow < hi; ++ow) sr[ow] += wv * (gr[ow] * xr[ow * g.sw]);
            }
          }
        }
      }
    }
  }
  if (gw) {
#pragma omp parallel for collapse(3) schedule(static) if (parallel_worth(g.N * q.O * q.Cg * g.K() * g.Ho * g.Wo))
    for (int64_t o = 0; o < q.O; ++o) {
      for (int64_t cc = 0; cc < q.Cg; ++cc) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k / g.kw, j = k % g.kw;
          int64_t lo, hi;
          valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
          T acc = 0;
          for (int64_t n = 0; n < g.N; ++n) {
            const T* xc = x + (n * g.C + (o / q.Og) * q.Cg + cc) * HW;
            for (int64_t oh = 0; oh < g.Ho; ++oh) {
              const int64_t hh = oh * g.sh - g.ph + i * g.dh;
              if (!in(hh, g.H)) continue;
              const T* xr = xc + hh * g.W + j * g.dw - g.pw;
              const T* gr = gy + ((n * q.O + o) * g.Ho + oh) * g.Wo;
              const T* sr = soft + ((n * K + k) * g.Ho + oh) * g.Wo;
              for (int64_t ow = lo; ow < hi; ++ow) acc += gr[ow] * (xr[ow * g.sw] * sr[ow]);
            }
          }
          gw[(o * q.Cg + cc) * K + k] = acc;
        }
      }
    }
  }
}

// ---- direct convolution of tiny maps, activation fused ------------------------------------------------------
// y = act(conv(x, w) + b) for maps so small that torch's convolution costs more in setup than in arithmetic
// (MTCNN's stages): one thread, no column buffer. act: 0 none; 1 ReLU (x > 0 ? x : x * negative_slope; max(x, 0)
// for slope 0); 2 PReLU (x > 0 ? x : x * slope[o], one slope per output channel).
// Two loop forms, chosen by the map size alone: where there are many output positions, 8 of them at a time (each
// output sums its taps in ascending (c, i, j) order from the bias), else a gather of each position's taps and a dot
// product in 8 fixed partial sums. The compiler vectorises neither across those sums, so the baseline and AVX2 builds give
// identical numbers.
template <typename T>
inline T activate(T v, int act, T negative_slope, const T* slope, int64_t o) {
  if (act == 0) return v;
  if (act == 1 && negative_slope == T(0)) return v < T(0) ? T(0) : v;
  return v > T(0) ? v : v * (act == 2 ? slope[o] : negative_slope);
}

// 8 lanes of T (GCC's vector extension: one AVX register or two SSE ones, lane by lane the same arithmetic)
template <typename T>
struct Vec8Of;
template <>
struct Vec8Of<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec8Of<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec8 = typename Vec8Of<T>::type;

#if defined(__GNUC__) && !defined(__clang__)
// its loops over a few floats stay loops (GCC would call memset/memcpy for them, slower at these sizes)
#define CL_NO_LIBCALL_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define CL_NO_LIBCALL_LOOPS
#endif

#ifndef CL_DIRECT_WIDE
#define CL_DIRECT_WIDE 16  // the fewest output positions of the wide form
#endif

template <typename T>
CL_NO_LIBCALL_LOOPS void direct_conv_forward(const T* x, const T* w, const T* b, const T* slope, T* y, const Geom& g, int64_t O,
                         int64_t group, int act, T negative_slope) {
  const int64_t K = g.K(), Cg = g.C / group, Og = O / group, CK = Cg * K, P = g.Ho * g.Wo;
  if (P >= CL_DIRECT_WIDE) {  // wide maps: a group's column buffer (taps x P rounded up to 8, 0 outside the
    // image), then 8 positions at a time in 8 partial results kept in registers
    const int64_t P8 = (P + 7) / 8 * 8;
    std::vector<T> cols(size_t(CK * P8), T(0)), zeros(size_t(CK), T(0));
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t q = 0; q < group; ++q) {
        T* col = cols.data();
        for (int64_t c = q * Cg; c < (q + 1) * Cg; ++c) {
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j, col += P8) {
              // [lo, hi): the output columns whose tap is inside the image
              const int64_t off = j * g.dw - g.pw;
              const int64_t lo = off >= 0 ? 0 : std::min(g.Wo, (-off + g.sw - 1) / g.sw);
              const int64_t hi = g.W - off <= 0 ? lo : std::max(lo, std::min(g.Wo, (g.W - off + g.sw - 1) / g.sw));
              for (int64_t oh = 0; oh < g.Ho; ++oh) {
                T* d = col + oh * g.Wo;
                const int64_t hh = oh * g.sh - g.ph + i * g.dh;
                if (!in(hh, g.H)) {
                  for (int64_t ow = 0; ow < g.Wo; ++ow) d[ow] = T(0);
                  continue;
                }
                const T* xr = x + ((n * g.C + c) * g.H + hh) * g.W + off;
                for (int64_t ow = 0; ow < lo; ++ow) d[ow] = T(0);
                if (g.sw == 1) {  // rows of a few floats: 8 at a time, inline
                  int64_t ow = lo;
                  for (; ow + 8 <= hi; ow += 8) std::memcpy(d + ow, xr + ow, 8 * sizeof(T));
                  for (; ow < hi; ++ow) d[ow] = xr[ow];
                } else {
                  for (int64_t ow = lo; ow < hi; ++ow) d[ow] = xr[ow * g.sw];
                }
                for (int64_t ow = hi; ow < g.Wo; ++ow) d[ow] = T(0);
              }
            }
          }
        }
        // 4 output channels at a time: 4 independent sums of 8 positions in flight (a missing channel reads zero
        // weights); Vec's lanes are one AVX register or two SSE ones, the same sums either way
        for (int64_t o0 = q * Og; o0 < (q + 1) * Og; o0 += 4) {
          const T* wr[4];
          T bias[4];
          for (int r = 0; r < 4; ++r) {
            const bool real = o0 + r < (q + 1) * Og;
            wr[r] = real ? w + (o0 + r) * CK : zeros.data();
            bias[r] = b && real ? b[o0 + r] : T(0);
          }
          for (int64_t p0 = 0; p0 < P; p0 += 8) {
            Vec8<T> acc[4];
            for (int r = 0; r < 4; ++r) acc[r] = Vec8<T>{} + bias[r];
            const T* ck = cols.data() + p0;
            for (int64_t k = 0; k < CK; ++k, ck += P8) {
              Vec8<T> c;
              std::memcpy(&c, ck, sizeof c);
              acc[0] += wr[0][k] * c;
              acc[1] += wr[1][k] * c;
              acc[2] += wr[2][k] * c;
              acc[3] += wr[3][k] * c;
            }
            const int64_t m = std::min<int64_t>(8, P - p0);
            for (int r = 0; r < 4 && o0 + r < (q + 1) * Og; ++r) {
              T lanes[8];
              std::memcpy(lanes, &acc[r], sizeof lanes);
              T* out = y + (n * O + o0 + r) * P + p0;
              for (int64_t l = 0; l < m; ++l) out[l] = activate(lanes[l], act, negative_slope, slope, o0 + r);
            }
          }
        }
      }
    }
    return;
  }
  // narrow maps: per output position, its taps gathered (0 outside the image), then one dot product an output
  // channel
  std::vector<T> taps(size_t(CK * group));
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        T* t = taps.data();
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t hh = oh * g.sh - g.ph + i * g.dh;
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t ww = ow * g.sw - g.pw + j * g.dw;
              *t++ = in(hh, g.H) && in(ww, g.W) ? x[((n * g.C + c) * g.H + hh) * g.W + ww] : T(0);
            }
          }
        }
        const int64_t full = CK / 8 * 8;
        for (int64_t o = 0; o < O; ++o) {
          const T* wo = w + o * CK;
          const T* to = taps.data() + (o / Og) * CK;
          T lane[8] = {};
          for (int64_t k = 0; k < full; k += 8)
            for (int l = 0; l < 8; ++l) lane[l] += wo[k + l] * to[k + l];
          T v = b ? b[o] : T(0);
          for (int l = 0; l < 8; ++l) v += lane[l];
          for (int64_t k = full; k < CK; ++k) v += wo[k] * to[k];
          y[((n * O + o) * g.Ho + oh) * g.Wo + ow] = activate(v, act, negative_slope, slope, o);
        }
      }
    }
  }
}

// ---- a chain of tiny layers in one call ------------------------------------------------------------------
// MAX pooling as Caffe's (windows clipped to the image, starting from -FLT_MAX) where torch's windows are the
// same (the caller checks), NaN kept as torch's kernel keeps it.
template <typename T>
void max_pool_forward(const T* x, T* y, const Geom& g) {
  for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
    const T* xp = x + nc * g.H * g.W;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t h0 = std::max<int64_t>(oh * g.sh - g.ph, 0), h1 = std::min(oh * g.sh - g.ph + g.kh, g.H);
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(ow * g.sw - g.pw, 0), w1 = std::min(ow * g.sw - g.pw + g.kw, g.W);
        T m = -std::numeric_limits<T>::max();
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) {
            const T v = xp[h * g.W + w];
            if (v > m || std::isnan(v)) m = v;
          }
        *y++ = m;
      }
    }
  }
}

// Softmax over the channels of N x C x P.
template <typename T>
void channel_softmax_forward(const T* x, T* y, int64_t N, int64_t C, int64_t P) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 0; p < P; ++p) {
      const T* xp = x + n * C * P + p;
      T* yp = y + n * C * P + p;
      T m = xp[0];
      for (int64_t c = 1; c < C; ++c) m = std::max(m, xp[c * P]);
      T sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += (yp[c * P] = std::exp(xp[c * P] - m));
      for (int64_t c = 0; c < C; ++c) yp[c * P] /= sum;
    }
  }
}

// PReLU (per-channel slopes) or ReLU (negative_slope) of N x C x P.
template <typename T>
void activation_forward(const T* x, T* y, int64_t N, int64_t C, int64_t P, int act, T negative_slope, const T* slope) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p, ++x, ++y) *y = activate(*x, act, negative_slope, slope, c);
}

// The ops of a chain, CHAIN_OP_INTS integers each: {code, input value, output value, weight, bias, slope, act, O,
// group, N, C, H, W, kh, kw, ph, pw, sh, sw, dh, dw, Ho, Wo}; code 0 convolution (+ act), 1 activation alone, 2 MAX
// pooling, 3 channel softmax; weight, bias and slope index `ptrs` (-1: none). `places`: per value, its offset in
// one scratch buffer of `scratch` elements (>= 0) or -1 - i for ptrs[i] (the input, the outputs).
constexpr int64_t CHAIN_OP_INTS = 23;

template <typename T>
void tiny_chain_forward(const std::vector<int64_t>& ops, const std::vector<double>& negative_slopes,
                        const std::vector<int64_t>& places, const std::vector<uintptr_t>& ptrs, int64_t scratch) {
  std::unique_ptr<T[]> buffer(new T[size_t(std::max<int64_t>(scratch, 1))]);
  auto value = [&](int64_t v) {
    const int64_t at = places[size_t(v)];
    return at >= 0 ? buffer.get() + at : reinterpret_cast<T*>(ptrs[size_t(-1 - at)]);
  };
  auto param = [&](int64_t i) { return i < 0 ? nullptr : reinterpret_cast<const T*>(ptrs[size_t(i)]); };
  for (size_t k = 0; k * CHAIN_OP_INTS < ops.size(); ++k) {
    const int64_t* op = ops.data() + k * CHAIN_OP_INTS;
    const Geom g{op[9], op[10], op[11], op[12], op[13], op[14], op[15], op[16], op[17], op[18], op[19], op[20],
                 op[21], op[22]};
    const T* x = value(op[1]);
    T* y = value(op[2]);
    const int act = int(op[6]);
    const T negative_slope = T(negative_slopes[k]);
    switch (op[0]) {
      case 0: direct_conv_forward(x, param(op[3]), param(op[4]), param(op[5]), y, g, op[7], op[8], act, negative_slope); break;
      case 1: activation_forward(x, y, g.N, g.C, g.H * g.W, act, negative_slope, param(op[5])); break;
      case 2: max_pool_forward(x, y, g); break;
      default: channel_softmax_forward(x, y, g.N, g.C, g.H * g.W); break;
    }
  }
}
