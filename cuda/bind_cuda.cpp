// pybind11 module caffe_layers._native_cuda over the plain interface of native_cuda.cu (same argument
// order as caffe_layers._native_cpu, plus the CUDA stream last).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "native_cuda.h"

namespace py = pybind11;
using G = std::vector<int64_t>;

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "caffe_layers CUDA kernels (raw device pointers and stream; see caffe_layers/native.py)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("probe", &cl_cuda::probe, "'' when the module's CUDA runtime sees a device, else the reason");
  m.def("im2dist_forward", [](bool d, uintptr_t x, uintptr_t y, G g, bool l1, bool rc, bool rb, double big, uintptr_t s) {
    cl_cuda::im2dist_forward(d, x, y, make_geom(g), l1, rc, rb, big, s);
  }, nogil);
  m.def("im2dist_backward", [](bool d, uintptr_t x, uintptr_t gy, uintptr_t gx, G g, int mode, uintptr_t s) {
    cl_cuda::im2dist_backward(d, x, gy, gx, make_geom(g), mode, s);
  }, nogil);
  m.def("im2parity_forward", [](bool d, uintptr_t lab, uintptr_t y, G g, bool hi, double ig, double out, uintptr_t s) {
    cl_cuda::im2parity_forward(d, lab, y, make_geom(g), hi, ig, out, s);
  }, nogil);
  m.def("spn_forward", [](bool d, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, int64_t planes,
                          int64_t H, int64_t W, bool hz, bool rv, uintptr_t s) {
    cl_cuda::spn_forward(d, x, g1, g2, g3, h, planes, H, W, hz, rv, s);
  }, nogil);
  m.def("spn_backward", [](bool d, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, uintptr_t dtop,
                           uintptr_t dx, uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes, int64_t H, int64_t W,
                           bool hz, bool rv, uintptr_t s) {
    cl_cuda::spn_backward(d, x, g1, g2, g3, h, dtop, dx, dg1, dg2, dg3, planes, H, W, hz, rv, s);
  }, nogil);
  m.def("masked_im2col", [](bool d, uintptr_t x, uintptr_t mask, uintptr_t cols, G g, int64_t n, int64_t r0, int64_t r1,
                            uintptr_t s) { cl_cuda::masked_im2col(d, x, mask, cols, make_geom(g), n, r0, r1, s); }, nogil);
  m.def("masked_col2im", [](bool d, uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask, G g,
                            int64_t n, int64_t r0, int64_t r1, uintptr_t s) {
    cl_cuda::masked_col2im(d, x, mask, dcols, gx, gmask, make_geom(g), n, r0, r1, s);
  }, nogil);
  m.def("normfilter_forward", [](bool d, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t b, uintptr_t y, G g,
                                 int64_t O, int64_t group, uintptr_t s) {
    const Geom geom = make_geom(g);
    cl_cuda::normfilter_forward(d, x, soft, w, b, y, geom, make_groups(geom, O, group), s);
  }, nogil);
  m.def("normfilter_backward", [](bool d, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t gy, uintptr_t gx,
                                  uintptr_t gsoft, uintptr_t gw, G g, int64_t O, int64_t group, uintptr_t s) {
    const Geom geom = make_geom(g);
    cl_cuda::normfilter_backward(d, x, soft, w, gy, gx, gsoft, gw, geom, make_groups(geom, O, group), s);
  }, nogil);
}
