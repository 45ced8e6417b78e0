// Host emulation of the little of CUDA that native_cuda.cu uses, so that the same source compiles with a
// plain C++ compiler (-x c++ -DCL_CUDA_HOST_EMULATION) into a module whose "launches" run every thread of
// the grid one after another on the CPU. Tests use it to check the CUDA kernels' arithmetic and indexing
// on machines without a GPU; it cannot show races or device limits beyond the launch shape checked here.
#pragma once
#include <cmath>
#include <cstdint>

using std::trunc;

#define __global__
#define __device__
#define __host__

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline EmulatedDim3 blockIdx, threadIdx, blockDim, gridDim;

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorNoKernelImageForDevice = 209 };
typedef struct CUstream_st* cudaStream_t;

inline cudaError_t emulated_error = cudaSuccess;

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emulated_error;
  emulated_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaErrorInvalidConfiguration ? "invalid configuration argument" : "emulated CUDA error";
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// kernel<<<grid, block, 0, stream>>>(args...) on one host thread; a launch shape a GPU rejects sets the error.
template <typename Kernel, typename... Args>
void emulated_launch(int64_t grid, int64_t block, Kernel kernel, Args... args) {
  if (grid <= 0 || grid > 2147483647 || block <= 0 || block > 1024) {
    emulated_error = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim.x = unsigned(grid);
  blockDim.x = unsigned(block);
  for (int64_t b = 0; b < grid; ++b) {
    for (int64_t t = 0; t < block; ++t) {
      blockIdx.x = unsigned(b);
      threadIdx.x = unsigned(t);
      kernel(args...);
    }
  }
}
