// CPU kernels of caffe_layers (OpenMP), over raw pointers, float and double.
// Pointers arrive from Python as integers (tensor.data_ptr()); tensors are contiguous NCHW.
// The semantics (quirks included) are those of the pure-PyTorch references in caffe_layers/ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "geometry.h"

namespace py = pybind11;

namespace {

// [lo, hi): the output positions o with o * s - p + off inside [0, size).
inline void valid_range(int64_t size, int64_t p, int64_t s, int64_t off, int64_t out, int64_t& lo, int64_t& hi) {
  lo = 0;
  while (lo < out && lo * s - p + off < 0) ++lo;
  hi = lo;
  while (hi < out && hi * s - p + off < size) ++hi;
}

inline bool in(int64_t v, int64_t size) { return v >= 0 && v < size; }

// ---- im2dist -----------------------------------------------------------------------------------
template <typename T>
void im2dist_forward(const T* x, T* y, const Geom& g, bool l1, bool remove_center, bool remove_bounds, T big) {
  const int64_t K = g.K(), ci = g.kh / 2, cj = g.kw / 2;
  int64_t clo, chi;
  valid_range(g.W, g.pw, g.sw, cj * g.dw, g.Wo, clo, chi);
#pragma omp parallel for collapse(2) schedule(static)
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
  const int64_t K = g.K(), ci = g.kh / 2, cj = g.kw / 2, coff = cj * g.dw - g.pw;
  int64_t clo, chi;
  valid_range(g.W, g.pw, g.sw, cj * g.dw, g.Wo, clo, chi);
  // each thread owns whole (n, c) planes of gx: no write conflicts
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      const T* xp = x + (n * g.C + c) * g.H * g.W;
      T* gp = gx + (n * g.C + c) * g.H * g.W;
      std::fill(gp, gp + g.H * g.W, T(0));
      std::vector<T> tmp(g.Wo);
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t ch = oh * g.sh - g.ph + ci * g.dh;
        if (!in(ch, g.H)) continue;  // no gradient from taps of an out-of-image centre
        const T* xc = xp + ch * g.W + coff;
        T* gc = gp + ch * g.W + coff;
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
            if (MODE == L1_CAFFE) {
              // quirk: an out-of-bounds neighbour (distance stored as 0) still sends -top_diff
              for (int64_t o = clo; o < std::min(lo, chi); ++o) gc[o * g.sw] -= gyr[o];
              for (int64_t o = hi; o < chi; ++o) gc[o * g.sw] -= gyr[o];
            }
            if (lo >= hi) continue;
            const int64_t noff = j * g.dw - g.pw;
            const T* xn = xp + hh * g.W + noff;
            T* gn = gp + hh * g.W + noff;
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
#pragma omp parallel for collapse(2) schedule(static)
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
// Plane index of step t, line s: the scan runs along columns (horizontal) or rows; g1/g2/g3 are the
// neighbours at line s-1, s, s+1 of the previous step. Null g1/g3: one-way connection (g2 only).
struct Scan {
  int64_t H, W, T, S;
  bool horizontal, reverse;
  Scan(int64_t H_, int64_t W_, bool hz, bool rv) : H(H_), W(W_), T(hz ? W_ : H_), S(hz ? H_ : W_), horizontal(hz), reverse(rv) {}
  int64_t at(int64_t t, int64_t s) const {
    const int64_t tt = reverse ? T - 1 - t : t;
    return horizontal ? s * W + tt : tt * W + s;
  }
};

template <typename T>
void spn_forward(const T* x, const T* g1, const T* g2, const T* g3, T* h, int64_t planes, const Scan& sc) {
  const int64_t area = sc.H * sc.W;
#pragma omp parallel for schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t b = pl * area;
    for (int64_t s = 0; s < sc.S; ++s) h[b + sc.at(0, s)] = x[b + sc.at(0, s)];
    for (int64_t t = 1; t < sc.T; ++t) {
      for (int64_t s = 0; s < sc.S; ++s) {
        const int64_t p = b + sc.at(t, s);
        T gsum = g2[p], hsum = g2[p] * h[b + sc.at(t - 1, s)];
        if (g1 && s > 0) { gsum += g1[p]; hsum += g1[p] * h[b + sc.at(t - 1, s - 1)]; }
        if (g3 && s + 1 < sc.S) { gsum += g3[p]; hsum += g3[p] * h[b + sc.at(t - 1, s + 1)]; }
        h[p] = (T(1) - gsum) * x[p] + hsum;
      }
    }
  }
}

template <typename T>
void spn_backward(const T* x, const T* g1, const T* g2, const T* g3, const T* h, const T* dtop, T* dx, T* dg1,
                  T* dg2, T* dg3, int64_t planes, const Scan& sc) {
  const int64_t area = sc.H * sc.W;
#pragma omp parallel for schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t b = pl * area;
    std::vector<T> cur(sc.S), nxt(sc.S);  // dH of steps t and t + 1
    for (int64_t t = sc.T - 1; t >= 0; --t) {
      for (int64_t s = 0; s < sc.S; ++s) {
        const int64_t p = b + sc.at(t, s);
        T d = dtop[p];
        if (t + 1 < sc.T) {  // successors at step t + 1: lines s+1 (through g1), s (g2), s-1 (g3)
          if (g3 && s > 0) d += nxt[s - 1] * g3[b + sc.at(t + 1, s - 1)];
          d += nxt[s] * g2[b + sc.at(t + 1, s)];
          if (g1 && s + 1 < sc.S) d += nxt[s + 1] * g1[b + sc.at(t + 1, s + 1)];
        }
        cur[s] = d;
        T gsum = 0;
        if (t > 0) {
          const T xv = x[p];
          gsum = g2[p];
          dg2[p] = d * (h[b + sc.at(t - 1, s)] - xv);
          if (g1) {
            const bool ok = s > 0;
            if (ok) gsum += g1[p];
            dg1[p] = ok ? d * (h[b + sc.at(t - 1, s - 1)] - xv) : T(0);
          }
          if (g3) {
            const bool ok = s + 1 < sc.S;
            if (ok) gsum += g3[p];
            dg3[p] = ok ? d * (h[b + sc.at(t - 1, s + 1)] - xv) : T(0);
          }
        } else {  // first step: no neighbours, gates unused
          dg2[p] = 0;
          if (g1) dg1[p] = 0;
          if (g3) dg3[p] = 0;
        }
        dx[p] = (T(1) - gsum) * d;
      }
      std::swap(cur, nxt);
    }
  }
}

// ---- segmentation-aware convolution: masked column buffers for output rows [r0, r1) of image n -----
// cols[(c*K + k), p] = im2col(x)[c, k, p] * mask[k, p], p over the chunk's output positions.
template <typename T>
void masked_im2col(const T* x, const T* mask, T* cols, const Geom& g, int64_t n, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo;
#pragma omp parallel for schedule(static)
  for (int64_t ck = 0; ck < g.C * K; ++ck) {
    const int64_t c = ck / K, k = ck % K, i = k / g.kw, j = k % g.kw;
    const T* xc = x + (n * g.C + c) * g.H * g.W;
    int64_t lo, hi;
    valid_range(g.W, g.pw, g.sw, j * g.dw, g.Wo, lo, hi);
    T* dst = cols + ck * P;
    for (int64_t oh = r0; oh < r1; ++oh) {
      T* d = dst + (oh - r0) * g.Wo;
      const int64_t hh = oh * g.sh - g.ph + i * g.dh;
      if (!in(hh, g.H)) {
        std::fill(d, d + g.Wo, T(0));
        continue;
      }
      const T* m = mask + ((n * K + k) * g.Ho + oh) * g.Wo;
      const T* xr = xc + hh * g.W + j * g.dw - g.pw;
      for (int64_t o = 0; o < lo; ++o) d[o] = 0;
      if (g.sw == 1) {  // contiguous: lets the compiler vectorise
        for (int64_t o = lo; o < hi; ++o) d[o] = xr[o] * m[o];
      } else {
        for (int64_t o = lo; o < hi; ++o) d[o] = xr[o * g.sw] * m[o];
      }
      for (int64_t o = hi; o < g.Wo; ++o) d[o] = 0;
    }
  }
}

// Backward of masked_im2col for a chunk: gx[n] += col2im(dcols * mask); gmask[n, :, r0:r1] = sum_c dcols * col.
// One parallel region (two work-shared loops writing different arrays, no barrier between them): under load
// every extra region costs a thread hand-over.
template <typename T>
void masked_col2im(const T* x, const T* mask, const T* dcols, T* gx, T* gmask, const Geom& g, int64_t n,
                   int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo;
#pragma omp parallel
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

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

#define DISPATCH(is_double, CALL) \
  do {                            \
    if (is_double) {              \
      using T = double;           \
      CALL;                       \
    } else {                      \
      using T = float;            \
      CALL;                       \
    }                             \
  } while (0)

}  // namespace

PYBIND11_MODULE(_native_cpu, m) {
  m.doc() = "caffe_layers CPU kernels (raw pointers; see caffe_layers/native.py)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("im2dist_forward", [](bool dbl, uintptr_t x, uintptr_t y, std::vector<int64_t> geom, bool l1, bool rc,
                              bool rb, double big) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, im2dist_forward<T>(ptr<T>(x), ptr<T>(y), g, l1, rc, rb, T(big)));
  }, nogil);
  m.def("im2dist_backward", [](bool dbl, uintptr_t x, uintptr_t gy, uintptr_t gx, std::vector<int64_t> geom, int mode) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, im2dist_backward<T>(ptr<T>(x), ptr<T>(gy), ptr<T>(gx), g, mode));
  }, nogil);
  m.def("im2parity_forward", [](bool dbl, uintptr_t lab, uintptr_t y, std::vector<int64_t> geom, bool has_ignore,
                                double ignore, double outside) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, im2parity_forward<T>(ptr<T>(lab), ptr<T>(y), g, has_ignore, T(ignore), T(outside)));
  }, nogil);
  m.def("spn_forward", [](bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h,
                          int64_t planes, int64_t H, int64_t W, bool horizontal, bool reverse) {
    const Scan sc(H, W, horizontal, reverse);
    DISPATCH(dbl, spn_forward<T>(ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), planes, sc));
  }, nogil);
  m.def("spn_backward", [](bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h,
                           uintptr_t dtop, uintptr_t dx, uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes,
                           int64_t H, int64_t W, bool horizontal, bool reverse) {
    const Scan sc(H, W, horizontal, reverse);
    DISPATCH(dbl, spn_backward<T>(ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), ptr<T>(dtop),
                                  ptr<T>(dx), ptr<T>(dg1), ptr<T>(dg2), ptr<T>(dg3), planes, sc));
  }, nogil);
  m.def("masked_im2col", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t cols, std::vector<int64_t> geom,
                            int64_t n, int64_t r0, int64_t r1) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, masked_im2col<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(cols), g, n, r0, r1));
  }, nogil);
  m.def("masked_col2im", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask,
                            std::vector<int64_t> geom, int64_t n, int64_t r0, int64_t r1) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, masked_col2im<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(dcols), ptr<T>(gx), ptr<T>(gmask), g, n, r0, r1));
  }, nogil);
}
