// pybind11 module caffe_layers._native_cpu: the kernels of native_cpu_kernels.h, built twice, for the
// baseline ISA and (x86-64 with GCC) for AVX2, which runs where the CPU has it. Both builds do the same
// arithmetic in the same order (no FMA contraction: AVX2 alone), so their results are identical.
// Pointers arrive from Python as integers (tensor.data_ptr()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#if defined(__SSE2__)
#include <xmmintrin.h>
#endif
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "geometry.h"

namespace py = pybind11;

namespace {  // internal linkage for both builds
namespace cl_baseline {
#include "native_cpu_kernels.h"
}  // namespace cl_baseline
}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CL_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace {
namespace cl_avx2 {
#include "native_cpu_kernels.h"
}  // namespace cl_avx2
}  // namespace
#pragma GCC pop_options
#endif

namespace {

bool cpu_has_avx2() {
#if defined(CL_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// The ISA the kernels run on: AVX2 where the CPU has it, unless CAFFE_LAYERS_NO_AVX2 is set; set_isa switches.
bool use_avx2 = cpu_has_avx2() && !std::getenv("CAFFE_LAYERS_NO_AVX2");

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

#define DISPATCH_TYPE(is_double, CALL) \
  do {                                 \
    if (is_double) {                   \
      using T = double;                \
      CALL;                            \
    } else {                           \
      using T = float;                 \
      CALL;                            \
    }                                  \
  } while (0)

#if defined(CL_AVX2)
#define DISPATCH(is_double, CALL)          \
  do {                                     \
    if (use_avx2) {                        \
      using namespace cl_avx2;             \
      DISPATCH_TYPE(is_double, CALL);      \
    } else {                               \
      using namespace cl_baseline;         \
      DISPATCH_TYPE(is_double, CALL);      \
    }                                      \
  } while (0)
#else
#define DISPATCH(is_double, CALL)      \
  do {                                 \
    using namespace cl_baseline;       \
    DISPATCH_TYPE(is_double, CALL);    \
  } while (0)
#endif

struct ChainProgram {
  bool dbl;
  std::vector<int64_t> ops;
  std::vector<double> negative_slopes;
  std::vector<int64_t> places;
  int64_t n_ptrs, scratch;
};

ChainProgram make_chain_program(bool dbl, std::vector<int64_t> ops, std::vector<double> negative_slopes,
                                std::vector<int64_t> places, int64_t n_ptrs, int64_t scratch) {
  const int64_t width = cl_baseline::CHAIN_OP_INTS, n_ops = int64_t(ops.size()) / width;
  if (int64_t(ops.size()) != n_ops * width || int64_t(negative_slopes.size()) != n_ops)
    throw std::invalid_argument("TinyChainProgram: ops and negative_slopes do not match");
  const int64_t n_values = int64_t(places.size());
  for (int64_t at : places)
    if (at < -n_ptrs || at >= scratch) throw std::invalid_argument("TinyChainProgram: a value's place is out of range");
  for (int64_t k = 0; k < n_ops; ++k) {
    const int64_t* op = ops.data() + k * width;
    if (op[0] < 0 || op[0] > 3 || op[1] < 0 || op[1] >= n_values || op[2] < 0 || op[2] >= n_values)
      throw std::invalid_argument("TinyChainProgram: an op's code or values are out of range");
    for (int i = 3; i < 6; ++i)
      if (op[i] < -1 || op[i] >= n_ptrs) throw std::invalid_argument("TinyChainProgram: a parameter is out of range");
  }
  return ChainProgram{dbl, std::move(ops), std::move(negative_slopes), std::move(places), n_ptrs, scratch};
}

}  // namespace

PYBIND11_MODULE(_native_cpu, m) {
  m.doc() = "caffe_layers CPU kernels (raw pointers; see caffe_layers/native.py)";
  m.def("isa", [] { return std::string(use_avx2 ? "avx2" : "baseline"); }, "the instruction set the kernels use");
  m.def("set_isa", [](const std::string& isa) {
    if (isa == "avx2" && !cpu_has_avx2()) throw std::invalid_argument("set_isa: this CPU (or build) has no AVX2");
    if (isa != "avx2" && isa != "baseline") throw std::invalid_argument("set_isa: 'avx2' or 'baseline', got '" + isa + "'");
    use_avx2 = isa == "avx2";
  }, "run the kernels on 'avx2' or 'baseline' (tests compare the two)");
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
    DISPATCH(dbl, spn_forward<T>(ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), planes, H, W, horizontal,
                                 reverse));
  }, nogil);
  m.def("spn_backward", [](bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h,
                           uintptr_t dtop, uintptr_t dx, uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes,
                           int64_t H, int64_t W, bool horizontal, bool reverse) {
    DISPATCH(dbl, spn_backward<T>(ptr<T>(x), ptr<T>(g1), ptr<T>(g2), ptr<T>(g3), ptr<T>(h), ptr<T>(dtop),
                                  ptr<T>(dx), ptr<T>(dg1), ptr<T>(dg2), ptr<T>(dg3), planes, H, W, horizontal, reverse));
  }, nogil);
  m.def("masked_im2col", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t cols, std::vector<int64_t> geom,
                            int64_t n, int64_t r0, int64_t r1) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, masked_im2col<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(cols), g, n, r0, r1));
  }, nogil);
  m.def("segaware_conv_forward", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t w, uintptr_t b, uintptr_t y,
                                    std::vector<int64_t> geom, int64_t O, int64_t tile, uintptr_t gemm) {
    const Geom g = make_geom(geom);
    if (tile < 1 || !gemm) throw std::invalid_argument("segaware_conv_forward: needs a tile >= 1 and a gemm");
    DISPATCH(dbl, segaware_conv_forward<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(w), ptr<T>(b), ptr<T>(y), g, O, tile,
                                           reinterpret_cast<Gemm<T>>(gemm)));
  }, nogil);
  m.def("segaware_conv_backward", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t w, uintptr_t gy, uintptr_t gx,
                                     uintptr_t gmask, uintptr_t gw, std::vector<int64_t> geom, int64_t O, int64_t tile,
                                     uintptr_t gemm) {
    const Geom g = make_geom(geom);
    if (tile < 1 || !gemm) throw std::invalid_argument("segaware_conv_backward: needs a tile >= 1 and a gemm");
    DISPATCH(dbl, segaware_conv_backward<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(w), ptr<T>(gy), ptr<T>(gx),
                                            ptr<T>(gmask), ptr<T>(gw), g, O, tile, reinterpret_cast<Gemm<T>>(gemm)));
  }, nogil);
  m.def("masked_col2im", [](bool dbl, uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask,
                            std::vector<int64_t> geom, int64_t n, int64_t r0, int64_t r1) {
    const Geom g = make_geom(geom);
    DISPATCH(dbl, masked_col2im<T>(ptr<T>(x), ptr<T>(mask), ptr<T>(dcols), ptr<T>(gx), ptr<T>(gmask), g, n, r0, r1));
  }, nogil);
  m.def("normfilter_forward", [](bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t b, uintptr_t y,
                                 std::vector<int64_t> geom, int64_t O, int64_t group) {
    const Geom g = make_geom(geom);
    const Groups q = make_groups(g, O, group);
    DISPATCH(dbl, normfilter_forward<T>(ptr<T>(x), ptr<T>(soft), ptr<T>(w), ptr<T>(b), ptr<T>(y), g, q));
  }, nogil);
  // a chain's program, checked once; run(ptrs) takes the input's, the parameters' and the outputs' addresses
  py::class_<ChainProgram>(m, "TinyChainProgram")
      .def(py::init(&make_chain_program))
      .def("run", [](const ChainProgram& p, const std::vector<uintptr_t>& ptrs) {
        if (int64_t(ptrs.size()) != p.n_ptrs) throw std::invalid_argument("TinyChainProgram.run: wrong number of pointers");
        // the GIL kept: releasing it costs a share of these microsecond calls
        DISPATCH(p.dbl, tiny_chain_forward<T>(p.ops, p.negative_slopes, p.places, ptrs, p.scratch));
      });
  m.def("normfilter_backward", [](bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t gy, uintptr_t gx,
                                  uintptr_t gsoft, uintptr_t gw, std::vector<int64_t> geom, int64_t O, int64_t group) {
    const Geom g = make_geom(geom);
    const Groups q = make_groups(g, O, group);
    DISPATCH(dbl, normfilter_backward<T>(ptr<T>(x), ptr<T>(soft), ptr<T>(w), ptr<T>(gy), ptr<T>(gx), ptr<T>(gsoft),
                                         ptr<T>(gw), g, q));
  }, nogil);
}
