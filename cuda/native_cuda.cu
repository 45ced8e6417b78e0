// CUDA kernels of caffe_layers, over raw device pointers, float and double; every launcher takes the
// caller's stream. Same semantics as cuda/native_cpu.cpp (and the references in caffe_layers/ops);
// gradients are gathered per input element or reduced in a fixed order (no atomics), so results are
// deterministic. The GEMMs of the seg-aware convolution are torch's (cuBLAS), in caffe_layers/native.
#if defined(CL_CUDA_HOST_EMULATION)  // a plain C++ build for tests without a GPU (see cuda_emulation.h)
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "geometry.h"
#include "native_cuda.h"

namespace {

constexpr int kThreads = 256;

// LAUNCH: kernels without barriers, kThreads a block. LAUNCH_SYNC: kernels with __syncthreads and shared memory,
// `threads` a block (at most kSyncThreads, a power of two) and `shared` bytes of dynamic shared memory.
// The emulation runs a block's threads as std::threads, so it keeps them few: each then takes several lines.
#if defined(CL_CUDA_HOST_EMULATION)
constexpr int kSyncThreads = 8, kWarp = 1;
#define LAUNCH(kernel, grid, stream, ...) emulated_launch(grid, kThreads, kernel, __VA_ARGS__)
#define LAUNCH_SYNC(kernel, grid, threads, shared, stream, ...) \
  emulated_launch_sync(grid, threads, shared, kernel, __VA_ARGS__)
#else
constexpr int kSyncThreads = 256, kWarp = 32;
#define LAUNCH(kernel, grid, stream, ...) kernel<<<grid, kThreads, 0, stream>>>(__VA_ARGS__)
#define LAUNCH_SYNC(kernel, grid, threads, shared, stream, ...) kernel<<<grid, threads, shared, stream>>>(__VA_ARGS__)
#define CL_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char cl_dynamic_shared[]; \
  T* name = reinterpret_cast<T*>(cl_dynamic_shared)
#endif

// Dynamic shared memory a block may take without cudaFuncSetAttribute (every GPU since Kepler has 48 KiB).
inline int64_t shared_budget() {
#if defined(CL_CUDA_HOST_EMULATION)
  if (const char* v = std::getenv("CL_EMULATED_SHARED_BYTES")) return std::atoll(v);  // tests: the fallback
#endif
  return 48 * 1024;
}

// Grid-stride loop over [0, total), used by every kernel except the SPN scan steps; #undef after the kernels.
#define CL_GRID_LOOP(idx, total) \
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < (total); idx += (int64_t)gridDim.x * blockDim.x)

inline int blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

inline void check(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  std::string msg = std::string("caffe_layers CUDA kernel ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice)  // built for other GPUs (see setup.py's DEFAULT_CUDA_ARCHS)
    msg += " (rebuild for this GPU: CAFFE_LAYERS_CUDA_ARCHS=\"<compute capability, e.g. 75>\" pip install -e .)";
  throw std::runtime_error(msg);
}

__device__ inline bool in(int64_t v, int64_t size) { return v >= 0 && v < size; }

// o such that o * s - p + off == pos, or -1
__device__ inline int64_t source(int64_t pos, int64_t p, int64_t s, int64_t off, int64_t out) {
  const int64_t q = pos + p - off;
  if (q < 0 || q % s) return -1;
  const int64_t o = q / s;
  return o < out ? o : -1;
}

// ---- im2dist -----------------------------------------------------------------------------------
template <typename T>
__global__ void im2dist_fwd(const T* x, T* y, Geom g, bool l1, bool rc, bool rb, T big) {
  const int64_t K = g.K(), total = g.N * K * g.Ho * g.Wo;
  CL_GRID_LOOP(idx, total) {
    const int64_t ow = idx % g.Wo, oh = (idx / g.Wo) % g.Ho, k = (idx / (g.Wo * g.Ho)) % K, n = idx / (g.Wo * g.Ho * K);
    const int64_t i = k / g.kw, j = k % g.kw, ci = g.kh / 2, cj = g.kw / 2;
    const int64_t ch = oh * g.sh - g.ph + ci * g.dh, cw = ow * g.sw - g.pw + cj * g.dw;
    const int64_t hh = oh * g.sh - g.ph + i * g.dh, ww = ow * g.sw - g.pw + j * g.dw;
    T v = 0;
    if (in(ch, g.H) && in(cw, g.W)) {
      if (rc && i == ci && j == cj) {
        v = big;
      } else if (!in(hh, g.H) || !in(ww, g.W)) {
        v = rb ? big : T(0);
      } else {
        for (int64_t c = 0; c < g.C; ++c) {
          const T* xp = x + (n * g.C + c) * g.H * g.W;
          const T d = xp[ch * g.W + cw] - xp[hh * g.W + ww];
          v += l1 ? (d < 0 ? -d : d) : d * d * T(0.5);
        }
      }
    }
    y[idx] = v;
  }
}

template <typename T>
__device__ inline T dist_sign(T d, int mode) {
  if (mode == L2) return d;
  if (mode == L1_TRUE) return d > 0 ? T(1) : (d < 0 ? T(-1) : T(0));
  return d > 0 ? T(1) : T(-1);  // quirk (dist2im_cpu): sign(0) = -1
}

// One thread per input element: the sum of its terms as a centre and as a neighbour.
template <typename T>
__global__ void im2dist_bwd(const T* x, const T* gy, T* gx, Geom g, int mode) {
  const int64_t K = g.K(), total = g.N * g.C * g.H * g.W;
  const int64_t ci = g.kh / 2, cj = g.kw / 2;
  CL_GRID_LOOP(idx, total) {
    const int64_t w = idx % g.W, h = (idx / g.W) % g.H, nc = idx / (g.W * g.H), n = nc / g.C;
    const T* xp = x + nc * g.H * g.W;
    const T* gyn = gy + n * K * g.Ho * g.Wo;
    T acc = 0;
    // as the centre of output (oh, ow)
    const int64_t oh = source(h, g.ph, g.sh, ci * g.dh, g.Ho), ow = source(w, g.pw, g.sw, cj * g.dw, g.Wo);
    if (oh >= 0 && ow >= 0) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = k / g.kw, j = k % g.kw;
        if (i == ci && j == cj) continue;
        const int64_t hh = oh * g.sh - g.ph + i * g.dh, ww = ow * g.sw - g.pw + j * g.dw;
        const T gv = gyn[(k * g.Ho + oh) * g.Wo + ow];
        if (in(hh, g.H) && in(ww, g.W)) acc += dist_sign(xp[h * g.W + w] - xp[hh * g.W + ww], mode) * gv;
        else if (mode == L1_CAFFE) acc -= gv;  // quirk: out-of-bounds neighbour still sends -top_diff
      }
    }
    // as the neighbour (tap k) of output (oh, ow) whose centre is inside the image
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k / g.kw, j = k % g.kw;
      if (i == ci && j == cj) continue;
      const int64_t nh = source(h, g.ph, g.sh, i * g.dh, g.Ho), nw = source(w, g.pw, g.sw, j * g.dw, g.Wo);
      if (nh < 0 || nw < 0) continue;
      const int64_t ch = nh * g.sh - g.ph + ci * g.dh, cw = nw * g.sw - g.pw + cj * g.dw;
      if (!in(ch, g.H) || !in(cw, g.W)) continue;
      acc -= dist_sign(xp[ch * g.W + cw] - xp[h * g.W + w], mode) * gyn[(k * g.Ho + nh) * g.Wo + nw];
    }
    gx[idx] = acc;
  }
}

// ---- im2parity ---------------------------------------------------------------------------------
template <typename T>
__global__ void im2parity_fwd(const T* labels, T* y, Geom g, bool has_ignore, T ignore, T outside) {
  const int64_t K = g.K(), total = g.N * K * g.Ho * g.Wo;
  CL_GRID_LOOP(idx, total) {
    const int64_t ow = idx % g.Wo, oh = (idx / g.Wo) % g.Ho, k = (idx / (g.Wo * g.Ho)) % K, n = idx / (g.Wo * g.Ho * K);
    const int64_t i = k / g.kw, j = k % g.kw;
    const int64_t ch = oh * g.sh - g.ph + (g.kh / 2) * g.dh, cw = ow * g.sw - g.pw + (g.kw / 2) * g.dw;
    const int64_t hh = oh * g.sh - g.ph + i * g.dh, ww = ow * g.sw - g.pw + j * g.dw;
    const T* lab = labels + (n * g.C + g.C - 1) * g.H * g.W;  // the last channel wins
    T v = outside;
    if (in(ch, g.H) && in(cw, g.W)) {
      const T cv = trunc(lab[ch * g.W + cw]);
      const T nv = (in(hh, g.H) && in(ww, g.W)) ? trunc(lab[hh * g.W + ww]) : T(0);
      v = nv == cv ? T(1) : T(0);
      if (has_ignore && (nv == ignore || cv == ignore)) v = ignore;
    }
    y[idx] = v;
  }
}

// ---- SPN scan ------------------------------------------------------------------------------------------
// A scan walks T steps (columns for horizontal scans, rows for vertical ones) over S lines; step t of line s
// reads step t - 1 of lines s - 1, s, s + 1. spn_fwd_scan / spn_bwd_scan: one launch per direction, one block
// per plane, its threads taking the lines and passing the steps together with a barrier between steps. The
// steps come in tiles of L steps x S lines staged in shared memory, loaded and stored in memory order (along
// rows for horizontal scans, so reads are coalesced in both orientations). Where a tile of one step does not
// fit (very long lines), the per-step kernels below run instead: one launch per step, one thread per line.
struct Scan {
  int64_t H, W, T, S;
  bool horizontal, reverse;
  __device__ int64_t at(int64_t t, int64_t s) const {
    const int64_t tt = reverse ? T - 1 - t : t;
    return horizontal ? s * W + tt : tt * W + s;
  }
};

template <typename T>
__global__ void spn_fwd_step(const T* x, const T* g1, const T* g2, const T* g3, T* h, int64_t planes, Scan sc, int64_t t) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= planes * sc.S) return;
  const int64_t s = idx % sc.S, b = (idx / sc.S) * sc.H * sc.W, p = b + sc.at(t, s);
  if (t == 0) {
    h[p] = x[p];
    return;
  }
  T gsum = g2[p], hsum = g2[p] * h[b + sc.at(t - 1, s)];
  if (g1 && s > 0) { gsum += g1[p]; hsum += g1[p] * h[b + sc.at(t - 1, s - 1)]; }
  if (g3 && s + 1 < sc.S) { gsum += g3[p]; hsum += g3[p] * h[b + sc.at(t - 1, s + 1)]; }
  h[p] = (T(1) - gsum) * x[p] + hsum;
}

// dh of step t is kept in dx's storage until dx is written one step later (dx = (1 - sum g) dh).
template <typename T>
__global__ void spn_bwd_step(const T* x, const T* g1, const T* g2, const T* g3, const T* h, const T* dtop, T* dh,
                             T* dg1, T* dg2, T* dg3, int64_t planes, Scan sc, int64_t t) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= planes * sc.S) return;
  const int64_t s = idx % sc.S, b = (idx / sc.S) * sc.H * sc.W, p = b + sc.at(t, s);
  T d = dtop[p];
  if (t + 1 < sc.T) {
    if (g3 && s > 0) d += dh[b + sc.at(t + 1, s - 1)] * g3[b + sc.at(t + 1, s - 1)];
    d += dh[b + sc.at(t + 1, s)] * g2[b + sc.at(t + 1, s)];
    if (g1 && s + 1 < sc.S) d += dh[b + sc.at(t + 1, s + 1)] * g1[b + sc.at(t + 1, s + 1)];
  }
  dh[p] = d;
  if (t > 0) {
    const T xv = x[p];
    dg2[p] = d * (h[b + sc.at(t - 1, s)] - xv);
    if (g1) dg1[p] = s > 0 ? d * (h[b + sc.at(t - 1, s - 1)] - xv) : T(0);
    if (g3) dg3[p] = s + 1 < sc.S ? d * (h[b + sc.at(t - 1, s + 1)] - xv) : T(0);
  } else {
    dg2[p] = 0;
    if (g1) dg1[p] = 0;
    if (g3) dg3[p] = 0;
  }
}

// dx = (1 - sum of the gates of existing neighbours) * dh, in place over dh
template <typename T>
__global__ void spn_dx(const T* g1, const T* g2, const T* g3, T* dx, int64_t planes, Scan sc) {
  const int64_t total = planes * sc.H * sc.W;
  CL_GRID_LOOP(idx, total) {
    const int64_t q = idx % (sc.H * sc.W), hh = q / sc.W, ww = q % sc.W;
    const int64_t t = sc.horizontal ? ww : hh, s = sc.horizontal ? hh : ww;
    T gsum = 0;
    if (t != (sc.reverse ? sc.T - 1 : 0)) {
      gsum = g2[idx];
      if (g1 && s > 0) gsum += g1[idx];
      if (g3 && s + 1 < sc.S) gsum += g3[idx];
    }
    dx[idx] = (T(1) - gsum) * dx[idx];
  }
}

// Tile shape: L steps of `pitch` values (S rounded up to odd, so that strided staging hits distinct banks).
struct Tile {
  int64_t L, pitch;
};

// Element e (memory order) of a tile of n steps from logical step t0 of the plane at b: its step j, line s,
// address p and tile slot q.
__device__ inline void tile_element(const Scan& sc, const Tile& tl, int64_t b, int64_t t0, int64_t n, int64_t e,
                                    int64_t& j, int64_t& s, int64_t& p, int64_t& q) {
  const int64_t major = sc.horizontal ? e / n : e / sc.S, minor = sc.horizontal ? e % n : e % sc.S;
  const int64_t step = sc.horizontal ? minor : major;  // position along the scan inside the tile's span
  s = sc.horizontal ? major : minor;
  j = sc.reverse ? n - 1 - step : step;
  p = b + sc.at(t0 + j, s);
  q = j * tl.pitch + s;
}

// The gates at p of a plane into tile slot q (g1 and g3 only for three-way scans).
template <typename T, bool kThree>
__device__ inline void stage_gates(const T* g1, const T* g2, const T* g3, T* tg1, T* tg2, T* tg3, int64_t p, int64_t q) {
  tg2[q] = g2[p];
  if (kThree) {
    tg1[q] = g1[p];
    tg3[q] = g3[p];
  }
}

template <typename T, bool kThree>
__global__ void spn_fwd_scan(const T* x, const T* g1, const T* g2, const T* g3, T* h, int64_t planes, Scan sc, Tile tl) {
  CL_DYNAMIC_SHARED(T, smem);
  const int64_t P = tl.pitch, size = tl.L * P;
  T* th = smem;  // x of the tile's steps, overwritten by h
  T* tg2 = th + size;
  T* tg1 = tg2 + size;  // kThree only, as tg3
  T* tg3 = tg1 + size;
  T* carry = kThree ? tg3 + size : tg1;  // h of the step before the tile
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t b = plane * sc.H * sc.W;
    for (int64_t t0 = 0; t0 < sc.T; t0 += tl.L) {
      const int64_t n = sc.T - t0 < tl.L ? sc.T - t0 : tl.L;
      for (int64_t e = threadIdx.x; e < n * sc.S; e += blockDim.x) {
        int64_t j, s, p, q;
        tile_element(sc, tl, b, t0, n, e, j, s, p, q);
        th[q] = x[p];
        stage_gates<T, kThree>(g1, g2, g3, tg1, tg2, tg3, p, q);
      }
      __syncthreads();
      for (int64_t j = 0; j < n; ++j) {
        const T* prev = j ? th + (j - 1) * P : carry;
        if (t0 + j > 0)  // the first step keeps h = x
          for (int64_t s = threadIdx.x; s < sc.S; s += blockDim.x) {
            const int64_t q = j * P + s;
            T gsum = tg2[q], hsum = tg2[q] * prev[s];
            if (kThree && s > 0) { gsum += tg1[q]; hsum += tg1[q] * prev[s - 1]; }
            if (kThree && s + 1 < sc.S) { gsum += tg3[q]; hsum += tg3[q] * prev[s + 1]; }
            th[q] = (T(1) - gsum) * th[q] + hsum;
          }
        __syncthreads();
      }
      for (int64_t s = threadIdx.x; s < sc.S; s += blockDim.x) carry[s] = th[(n - 1) * P + s];
      for (int64_t e = threadIdx.x; e < n * sc.S; e += blockDim.x) {
        int64_t j, s, p, q;
        tile_element(sc, tl, b, t0, n, e, j, s, p, q);
        h[p] = th[q];
      }
      __syncthreads();
    }
  }
}

// Backward, tiles from the last step: dh (kept over dtop in shared memory) gathers dh * gate of the step after;
// at a tile's edge those products come from `carry`. dx and the gate gradients are written as the tile is stored.
template <typename T, bool kThree>
__global__ void spn_bwd_scan(const T* x, const T* g1, const T* g2, const T* g3, const T* h, const T* dtop, T* dx,
                             T* dg1, T* dg2, T* dg3, int64_t planes, Scan sc, Tile tl) {
  CL_DYNAMIC_SHARED(T, smem);
  const int64_t P = tl.pitch, size = tl.L * P;
  T* td = smem;  // dtop, overwritten by dh
  T* tx = td + size;
  T* tp = tx + size;  // h of the step before each step
  T* tg2 = tp + size;
  T* tg1 = tg2 + size;  // kThree only, as tg3, c1 and c3
  T* tg3 = tg1 + size;
  T* c2 = kThree ? tg3 + size : tg1;  // dh * g2 of the step after the tile, by line
  T* c1 = c2 + P;
  T* c3 = c1 + P;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t b = plane * sc.H * sc.W;
    for (int64_t t0 = (sc.T - 1) / tl.L * tl.L; t0 >= 0; t0 -= tl.L) {
      const int64_t n = sc.T - t0 < tl.L ? sc.T - t0 : tl.L;
      for (int64_t e = threadIdx.x; e < n * sc.S; e += blockDim.x) {
        int64_t j, s, p, q;
        tile_element(sc, tl, b, t0, n, e, j, s, p, q);
        td[q] = dtop[p];
        tx[q] = x[p];
        stage_gates<T, kThree>(g1, g2, g3, tg1, tg2, tg3, p, q);
        tp[q] = t0 + j > 0 ? h[b + sc.at(t0 + j - 1, s)] : T(0);
      }
      __syncthreads();
      for (int64_t j = n - 1; j >= 0; --j) {
        if (t0 + j + 1 < sc.T)
          for (int64_t s = threadIdx.x; s < sc.S; s += blockDim.x) {
            const int64_t q = j * P + s, r = q + P;  // r: the same line one step later
            T d = td[q];
            if (j + 1 < n) {
              if (kThree && s > 0) d += td[r - 1] * tg3[r - 1];
              d += td[r] * tg2[r];
              if (kThree && s + 1 < sc.S) d += td[r + 1] * tg1[r + 1];
            } else {
              if (kThree && s > 0) d += c3[s - 1];
              d += c2[s];
              if (kThree && s + 1 < sc.S) d += c1[s + 1];
            }
            td[q] = d;
          }
        __syncthreads();
      }
      for (int64_t s = threadIdx.x; s < sc.S; s += blockDim.x) {
        c2[s] = td[s] * tg2[s];
        if (kThree) {
          c1[s] = td[s] * tg1[s];
          c3[s] = td[s] * tg3[s];
        }
      }
      for (int64_t e = threadIdx.x; e < n * sc.S; e += blockDim.x) {
        int64_t j, s, p, q;
        tile_element(sc, tl, b, t0, n, e, j, s, p, q);
        const T d = td[q], xv = tx[q];
        T gsum = 0, d1 = 0, d2 = 0, d3 = 0;
        if (t0 + j > 0) {
          d2 = d * (tp[q] - xv);
          gsum = tg2[q];
          if (kThree && s > 0) { gsum += tg1[q]; d1 = d * (tp[q - 1] - xv); }
          if (kThree && s + 1 < sc.S) { gsum += tg3[q]; d3 = d * (tp[q + 1] - xv); }
        }
        dx[p] = (T(1) - gsum) * d;
        dg2[p] = d2;
        if (kThree) {
          dg1[p] = d1;
          dg3[p] = d3;
        }
      }
      __syncthreads();
    }
  }
}

// ---- segmentation-aware convolution chunks ---------------------------------------------------------
template <typename T>
__global__ void masked_im2col_k(const T* x, const T* mask, T* cols, Geom g, int64_t n, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo, total = g.C * K * P;
  CL_GRID_LOOP(idx, total) {
    const int64_t p = idx % P, ck = idx / P, c = ck / K, k = ck % K;
    const int64_t oh = r0 + p / g.Wo, ow = p % g.Wo;
    const int64_t hh = oh * g.sh - g.ph + (k / g.kw) * g.dh, ww = ow * g.sw - g.pw + (k % g.kw) * g.dw;
    T v = 0;
    if (in(hh, g.H) && in(ww, g.W))
      v = x[((n * g.C + c) * g.H + hh) * g.W + ww] * mask[((n * K + k) * g.Ho + oh) * g.Wo + ow];
    cols[idx] = v;
  }
}

template <typename T>
__global__ void masked_col2im_x(const T* mask, const T* dcols, T* gx, Geom g, int64_t n, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo, total = g.C * g.H * g.W;
  CL_GRID_LOOP(idx, total) {
    const int64_t w = idx % g.W, h = (idx / g.W) % g.H, c = idx / (g.W * g.H);
    T acc = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t oh = source(h, g.ph, g.sh, (k / g.kw) * g.dh, g.Ho), ow = source(w, g.pw, g.sw, (k % g.kw) * g.dw, g.Wo);
      if (oh < r0 || oh >= r1 || ow < 0) continue;
      acc += dcols[(c * K + k) * P + (oh - r0) * g.Wo + ow] * mask[((n * K + k) * g.Ho + oh) * g.Wo + ow];
    }
    gx[(n * g.C) * g.H * g.W + idx] += acc;
  }
}

template <typename T>
__global__ void masked_col2im_mask(const T* x, const T* dcols, T* gmask, Geom g, int64_t n, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), P = (r1 - r0) * g.Wo, total = K * P;
  CL_GRID_LOOP(idx, total) {
    const int64_t p = idx % P, k = idx / P, oh = r0 + p / g.Wo, ow = p % g.Wo;
    const int64_t hh = oh * g.sh - g.ph + (k / g.kw) * g.dh, ww = ow * g.sw - g.pw + (k % g.kw) * g.dw;
    T acc = 0;
    if (in(hh, g.H) && in(ww, g.W))
      for (int64_t c = 0; c < g.C; ++c) acc += dcols[(c * K + k) * P + p] * x[((n * g.C + c) * g.H + hh) * g.W + ww];
    gmask[((n * K + k) * g.Ho + oh) * g.Wo + ow] = acc;
  }
}

// ---- normalised convolution filtering: one thread per value it writes (gathers, no atomics) ------------
template <typename T>
__global__ void normfilter_fwd(const T* x, const T* soft, const T* w, const T* b, T* y, Geom g, Groups q) {
  const int64_t K = g.K(), P = g.Ho * g.Wo;
  CL_GRID_LOOP(idx, g.N * q.O * P) {
    const int64_t p = idx % P, o = (idx / P) % q.O, n = idx / (P * q.O), oh = p / g.Wo, ow = p % g.Wo;
    T acc = b ? b[o] : T(0);
    for (int64_t cc = 0; cc < q.Cg; ++cc) {
      const T* xc = x + (n * g.C + (o / q.Og) * q.Cg + cc) * g.H * g.W;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t hh = oh * g.sh - g.ph + (k / g.kw) * g.dh, ww = ow * g.sw - g.pw + (k % g.kw) * g.dw;
        if (in(hh, g.H) && in(ww, g.W)) acc += w[(o * q.Cg + cc) * K + k] * (xc[hh * g.W + ww] * soft[(n * K + k) * P + p]);
      }
    }
    y[idx] = acc;
  }
}

template <typename T>
__global__ void normfilter_gx(const T* soft, const T* w, const T* gy, T* gx, Geom g, Groups q) {
  const int64_t K = g.K(), P = g.Ho * g.Wo;
  CL_GRID_LOOP(idx, g.N * g.C * g.H * g.W) {
    const int64_t xw = idx % g.W, h = (idx / g.W) % g.H, c = (idx / (g.W * g.H)) % g.C, n = idx / (g.W * g.H * g.C);
    const int64_t grp = c / q.Cg, cc = c % q.Cg;
    T acc = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t oh = source(h, g.ph, g.sh, (k / g.kw) * g.dh, g.Ho), ow = source(xw, g.pw, g.sw, (k % g.kw) * g.dw, g.Wo);
      if (oh < 0 || ow < 0) continue;
      const int64_t p = oh * g.Wo + ow;
      const T sv = soft[(n * K + k) * P + p];
      for (int64_t o = grp * q.Og; o < (grp + 1) * q.Og; ++o) acc += w[(o * q.Cg + cc) * K + k] * (gy[(n * q.O + o) * P + p] * sv);
    }
    gx[idx] = acc;
  }
}

template <typename T>
__global__ void normfilter_gsoft(const T* x, const T* w, const T* gy, T* gsoft, Geom g, Groups q) {
  const int64_t K = g.K(), P = g.Ho * g.Wo;
  CL_GRID_LOOP(idx, g.N * K * P) {
    const int64_t p = idx % P, k = (idx / P) % K, n = idx / (P * K), oh = p / g.Wo, ow = p % g.Wo;
    const int64_t hh = oh * g.sh - g.ph + (k / g.kw) * g.dh, ww = ow * g.sw - g.pw + (k % g.kw) * g.dw;
    T acc = 0;
    if (in(hh, g.H) && in(ww, g.W))
      for (int64_t o = 0; o < q.O; ++o)
        for (int64_t cc = 0; cc < q.Cg; ++cc)
          acc += w[(o * q.Cg + cc) * K + k] *
                 (gy[(n * q.O + o) * P + p] * x[((n * g.C + (o / q.Og) * q.Cg + cc) * g.H + hh) * g.W + ww]);
    gsoft[idx] = acc;
  }
}

// One block per weight: its threads take the N x Ho x Wo positions in turn (coalesced), then a tree reduction in
// shared memory (a fixed order: deterministic). Needs a power-of-two block of at most kSyncThreads.
template <typename T>
__global__ void normfilter_gw(const T* x, const T* soft, const T* gy, T* gw, Geom g, Groups q) {
  __shared__ T partial[kSyncThreads];
  const int64_t K = g.K(), P = g.Ho * g.Wo;
  for (int64_t idx = blockIdx.x; idx < q.O * q.Cg * K; idx += gridDim.x) {
    const int64_t k = idx % K, cc = (idx / K) % q.Cg, o = idx / (K * q.Cg);
    const int64_t dh = (k / g.kw) * g.dh - g.ph, dw = (k % g.kw) * g.dw - g.pw;
    T acc = 0;
    for (int64_t np = threadIdx.x; np < g.N * P; np += blockDim.x) {
      const int64_t n = np / P, p = np % P, hh = (p / g.Wo) * g.sh + dh, ww = (p % g.Wo) * g.sw + dw;
      if (in(hh, g.H) && in(ww, g.W))
        acc += gy[(n * q.O + o) * P + p] *
               (x[((n * g.C + (o / q.Og) * q.Cg + cc) * g.H + hh) * g.W + ww] * soft[(n * K + k) * P + p]);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) gw[idx] = partial[0];
    __syncthreads();  // partial[0] is read before the next weight's sums overwrite it
  }
}
#undef CL_GRID_LOOP

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline cudaStream_t stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int grid(int64_t n) { return n > 0 ? (blocks(n) < 65535 ? blocks(n) : 65535) : 1; }

// Blocks for one block per item (the kernels loop when there are more items than blocks).
inline int per_item(int64_t n) { return static_cast<int>(n < 65535 ? (n > 0 ? n : 1) : 65535); }

template <typename T>
void im2dist_forward_t(uintptr_t x, uintptr_t y, const Geom& g, bool l1, bool rc, bool rb, double big, uintptr_t s) {
  LAUNCH(im2dist_fwd<T>, grid(g.N * g.K() * g.Ho * g.Wo), stream(s), ptr<T>(x), ptr<T>(y), g, l1, rc, rb, T(big));
  check("im2dist_forward");
}

template <typename T>
void im2dist_backward_t(uintptr_t x, uintptr_t gy, uintptr_t gx, const Geom& g, int mode, uintptr_t s) {
  LAUNCH(im2dist_bwd<T>, grid(g.N * g.C * g.H * g.W), stream(s), ptr<T>(x), ptr<T>(gy), ptr<T>(gx), g, mode);
  check("im2dist_backward");
}

template <typename T>
void im2parity_forward_t(uintptr_t lab, uintptr_t y, const Geom& g, bool has_ignore, double ignore, double outside, uintptr_t s) {
  LAUNCH(im2parity_fwd<T>, grid(g.N * g.K() * g.Ho * g.Wo), stream(s), ptr<T>(lab), ptr<T>(y), g, has_ignore,
         T(ignore), T(outside));
  check("im2parity_forward");
}

Scan make_scan(int64_t H, int64_t W, bool hz, bool rv) { return Scan{H, W, hz ? W : H, hz ? H : W, hz, rv}; }

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Threads of a scan block: one per line up to kSyncThreads (a whole number of warps).
int scan_threads(int64_t S) { return static_cast<int>(S < kSyncThreads ? round_up(S, kWarp) : kSyncThreads); }

// The tile for `tiles` staged arrays of L x pitch and `carries` arrays of pitch, in shared_budget(); L = 0: none fits.
template <typename T>
Tile scan_tile(const Scan& sc, int tiles, int carries) {
  const int64_t pitch = sc.S | 1, room = shared_budget() / int64_t(sizeof(T)) - carries * pitch;
  int64_t L = room > 0 ? room / (tiles * pitch) : 0;
  L = L < 32 ? L : 32;
  return Tile{L < sc.T ? L : sc.T, pitch};
}

template <typename T>
int64_t tile_bytes(const Tile& tl, int tiles, int carries) {
  return int64_t(sizeof(T)) * (tiles * tl.L + carries) * tl.pitch;
}

template <typename T>
void spn_forward_t(uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, int64_t planes, int64_t H,
                   int64_t W, bool hz, bool rv, uintptr_t s) {
  if (planes * H * W == 0) return;  // nothing to scan (and a launch of 0 blocks is an invalid configuration)
  const Scan sc = make_scan(H, W, hz, rv);
  const bool three = g1 != 0;
  const int tiles = three ? 4 : 2;
  const Tile tl = scan_tile<T>(sc, tiles, 1);
  if (tl.L > 0) {
    auto kernel = three ? spn_fwd_scan<T, true> : spn_fwd_scan<T, false>;
    LAUNCH_SYNC(kernel, per_item(planes), scan_threads(sc.S), tile_bytes<T>(tl, tiles, 1), stream(s), ptr<T>(x), ptr<T>(g1),
                ptr<T>(g2), ptr<T>(g3), ptr<T>(h), planes, sc, tl);
  } else {
    for (int64_t t = 0; t < sc.T; ++t)
      LAUNCH(spn_fwd_step<T>, blocks(planes * sc.S), stream(s), ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3),
             ptr<T>(h), planes, sc, t);
  }
  check("spn_forward");
}

template <typename T>
void spn_backward_t(uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, uintptr_t dtop, uintptr_t dx,
                    uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes, int64_t H, int64_t W, bool hz, bool rv,
                    uintptr_t s) {
  if (planes * H * W == 0) return;  // as in spn_forward_t
  const Scan sc = make_scan(H, W, hz, rv);
  const bool three = g1 != 0;
  const int tiles = three ? 6 : 4, carries = three ? 3 : 1;
  const Tile tl = scan_tile<T>(sc, tiles, carries);
  if (tl.L > 0) {
    auto kernel = three ? spn_bwd_scan<T, true> : spn_bwd_scan<T, false>;
    LAUNCH_SYNC(kernel, per_item(planes), scan_threads(sc.S), tile_bytes<T>(tl, tiles, carries), stream(s), ptr<T>(x),
                ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), ptr<T>(dtop), ptr<T>(dx), ptr<T>(dg1), ptr<T>(dg2),
                ptr<T>(dg3), planes, sc, tl);
  } else {
    for (int64_t t = sc.T - 1; t >= 0; --t)
      LAUNCH(spn_bwd_step<T>, blocks(planes * sc.S), stream(s),
             ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), ptr<T>(dtop), ptr<T>(dx), ptr<T>(dg1), ptr<T>(dg2),
             ptr<T>(dg3), planes, sc, t);
    LAUNCH(spn_dx<T>, grid(planes * H * W), stream(s), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(dx), planes, sc);
  }
  check("spn_backward");
}

template <typename T>
void masked_im2col_t(uintptr_t x, uintptr_t mask, uintptr_t cols, const Geom& g, int64_t n, int64_t r0, int64_t r1, uintptr_t s) {
  LAUNCH(masked_im2col_k<T>, grid(g.C * g.K() * (r1 - r0) * g.Wo), stream(s), ptr<T>(x), ptr<T>(mask),
         ptr<T>(cols), g, n, r0, r1);
  check("masked_im2col");
}

template <typename T>
void masked_col2im_t(uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask, const Geom& g, int64_t n,
                     int64_t r0, int64_t r1, uintptr_t s) {
  if (gx)
    LAUNCH(masked_col2im_x<T>, grid(g.C * g.H * g.W), stream(s), ptr<T>(mask), ptr<T>(dcols), ptr<T>(gx), g, n, r0, r1);
  if (gmask)
    LAUNCH(masked_col2im_mask<T>, grid(g.K() * (r1 - r0) * g.Wo), stream(s), ptr<T>(x), ptr<T>(dcols), ptr<T>(gmask),
           g, n, r0, r1);
  check("masked_col2im");
}

template <typename T>
void normfilter_forward_t(uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t b, uintptr_t y, const Geom& g, const Groups& q,
                          uintptr_t s) {
  LAUNCH(normfilter_fwd<T>, grid(g.N * q.O * g.Ho * g.Wo), stream(s), ptr<T>(x), ptr<T>(soft), ptr<T>(w), ptr<T>(b),
         ptr<T>(y), g, q);
  check("normfilter_forward");
}

template <typename T>
void normfilter_backward_t(uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t gy, uintptr_t gx, uintptr_t gsoft, uintptr_t gw,
                           const Geom& g, const Groups& q, uintptr_t s) {
  if (gx)
    LAUNCH(normfilter_gx<T>, grid(g.N * g.C * g.H * g.W), stream(s), ptr<T>(soft), ptr<T>(w), ptr<T>(gy), ptr<T>(gx),
           g, q);
  if (gsoft)
    LAUNCH(normfilter_gsoft<T>, grid(g.N * g.K() * g.Ho * g.Wo), stream(s), ptr<T>(x), ptr<T>(w), ptr<T>(gy),
           ptr<T>(gsoft), g, q);
  if (gw)
    LAUNCH_SYNC(normfilter_gw<T>, per_item(q.O * q.Cg * g.K()), kSyncThreads, 0, stream(s), ptr<T>(x), ptr<T>(soft),
                ptr<T>(gy), ptr<T>(gw), g, q);
  check("normfilter_backward");
}

}  // namespace

// ---- the plain C++ interface (native_cuda.h) -------------------------------------------------------
#define DISPATCH(dbl, NAME, ...) (dbl ? NAME<double>(__VA_ARGS__) : NAME<float>(__VA_ARGS__))

namespace cl_cuda {
std::string probe() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return count ? "" : "no CUDA device";
}
void im2dist_forward(bool dbl, uintptr_t x, uintptr_t y, const Geom& g, bool l1, bool rc, bool rb, double big, uintptr_t s) {
  DISPATCH(dbl, im2dist_forward_t, x, y, g, l1, rc, rb, big, s);
}
void im2dist_backward(bool dbl, uintptr_t x, uintptr_t gy, uintptr_t gx, const Geom& g, int mode, uintptr_t s) {
  DISPATCH(dbl, im2dist_backward_t, x, gy, gx, g, mode, s);
}
void im2parity_forward(bool dbl, uintptr_t lab, uintptr_t y, const Geom& g, bool has_ignore, double ignore, double outside,
                       uintptr_t s) {
  DISPATCH(dbl, im2parity_forward_t, lab, y, g, has_ignore, ignore, outside, s);
}
void spn_forward(bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, int64_t planes, int64_t H,
                 int64_t W, bool hz, bool rv, uintptr_t s) {
  DISPATCH(dbl, spn_forward_t, x, g1, g2, g3, h, planes, H, W, hz, rv, s);
}
void spn_backward(bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, uintptr_t dtop, uintptr_t dx,
                  uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes, int64_t H, int64_t W, bool hz, bool rv,
                  uintptr_t s) {
  DISPATCH(dbl, spn_backward_t, x, g1, g2, g3, h, dtop, dx, dg1, dg2, dg3, planes, H, W, hz, rv, s);
}
void masked_im2col(bool dbl, uintptr_t x, uintptr_t mask, uintptr_t cols, const Geom& g, int64_t n, int64_t r0, int64_t r1,
                   uintptr_t s) {
  DISPATCH(dbl, masked_im2col_t, x, mask, cols, g, n, r0, r1, s);
}
void masked_col2im(bool dbl, uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask, const Geom& g,
                   int64_t n, int64_t r0, int64_t r1, uintptr_t s) {
  DISPATCH(dbl, masked_col2im_t, x, mask, dcols, gx, gmask, g, n, r0, r1, s);
}
void normfilter_forward(bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t b, uintptr_t y, const Geom& g,
                        const Groups& q, uintptr_t s) {
  DISPATCH(dbl, normfilter_forward_t, x, soft, w, b, y, g, q, s);
}
void normfilter_backward(bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t gy, uintptr_t gx, uintptr_t gsoft,
                         uintptr_t gw, const Geom& g, const Groups& q, uintptr_t s) {
  DISPATCH(dbl, normfilter_backward_t, x, soft, w, gy, gx, gsoft, gw, g, q, s);
}
}  // namespace cl_cuda
