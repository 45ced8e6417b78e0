// Plain C++ interface of the CUDA kernels (native_cuda.cu): raw device pointers as integers, the
// CUDA stream as an integer (torch.cuda.current_stream().cuda_stream). No torch, no CUDA headers.
#pragma once
#include <cstdint>
#include <string>

#include "geometry.h"

namespace cl_cuda {
// "" when this module's CUDA runtime sees a device, else why not (no device, a driver older than the toolkit).
std::string probe();
void im2dist_forward(bool dbl, uintptr_t x, uintptr_t y, const Geom& g, bool l1, bool rc, bool rb, double big, uintptr_t s);
void im2dist_backward(bool dbl, uintptr_t x, uintptr_t gy, uintptr_t gx, const Geom& g, int mode, uintptr_t s);
void im2parity_forward(bool dbl, uintptr_t lab, uintptr_t y, const Geom& g, bool has_ignore, double ignore, double outside,
                       uintptr_t s);
void spn_forward(bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, int64_t planes, int64_t H,
                 int64_t W, bool hz, bool rv, uintptr_t s);
void spn_backward(bool dbl, uintptr_t x, uintptr_t g1, uintptr_t g2, uintptr_t g3, uintptr_t h, uintptr_t dtop, uintptr_t dx,
                  uintptr_t dg1, uintptr_t dg2, uintptr_t dg3, int64_t planes, int64_t H, int64_t W, bool hz, bool rv,
                  uintptr_t s);
void masked_im2col(bool dbl, uintptr_t x, uintptr_t mask, uintptr_t cols, const Geom& g, int64_t n, int64_t r0, int64_t r1,
                   uintptr_t s);
void masked_col2im(bool dbl, uintptr_t x, uintptr_t mask, uintptr_t dcols, uintptr_t gx, uintptr_t gmask, const Geom& g,
                   int64_t n, int64_t r0, int64_t r1, uintptr_t s);
void normfilter_forward(bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t b, uintptr_t y, const Geom& g,
                        const Groups& q, uintptr_t s);
void normfilter_backward(bool dbl, uintptr_t x, uintptr_t soft, uintptr_t w, uintptr_t gy, uintptr_t gx, uintptr_t gsoft,
                         uintptr_t gw, const Geom& g, const Groups& q, uintptr_t s);
}  // namespace cl_cuda
