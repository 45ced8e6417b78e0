// Patch geometry shared by the CPU and CUDA kernels (Caffe's convolution arithmetic, NCHW).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

#ifdef __CUDACC__
#define CL_HD __host__ __device__
#else
#define CL_HD
#endif

struct Geom {
  int64_t N, C, H, W, kh, kw, ph, pw, sh, sw, dh, dw, Ho, Wo;
  CL_HD int64_t K() const { return kh * kw; }
};

inline Geom make_geom(const std::vector<int64_t>& v) {
  if (v.size() != 14) throw std::invalid_argument("native: geometry needs 14 integers (N C H W kh kw ph pw sh sw dh dw Ho Wo)");
  return Geom{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13]};
}

// Groups of the normalised-convolution filtering: O outputs, C / group inputs per output (Cg), O / group
// outputs per group (Og).
struct Groups {
  int64_t O, group, Cg, Og;
};

inline Groups make_groups(const Geom& g, int64_t O, int64_t group) {
  if (group <= 0 || g.C % group || O % group)
    throw std::invalid_argument("normfilter: channels and num_output must be multiples of group");
  return Groups{O, group, g.C / group, O / group};
}

// Modes of the im2dist backward.
enum DistMode { L1_CAFFE = 0, L1_TRUE = 1, L2 = 2 };
