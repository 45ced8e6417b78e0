// Host emulation of the little of CUDA that native_cuda.cu uses, so that the same source compiles with a
// plain C++ compiler (-x c++ -DCL_CUDA_HOST_EMULATION -pthread) into a module whose launches run on the CPU.
// Tests use it to check the CUDA kernels' arithmetic, indexing and barriers on machines without a GPU.
//  - emulated_launch: kernels without barriers; every thread of the grid in turn, on the calling thread.
//  - emulated_launch_sync: kernels with __syncthreads and shared memory; one std::thread per thread of a
//    block, the blocks one after another (a barrier ends each block, so static __shared__ arrays and the
//    dynamic shared buffer serve every block in turn). A barrier some threads miss deadlocks, as on a GPU.
// It cannot show device limits beyond the launch shapes checked here, nor races between blocks.
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

using std::trunc;

#define __global__
#define __device__
#define __host__
#define __shared__ static  // blocks run one at a time: one array serves the block's threads
#define __restrict__

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmulatedDim3 blockIdx, threadIdx;
inline EmulatedDim3 blockDim, gridDim;

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

// A reusable barrier for the threads of one emulated block.
class EmulatedBarrier {
 public:
  explicit EmulatedBarrier(int64_t n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int64_t n_, arrived_ = 0, generation_ = 0;
};

inline EmulatedBarrier* emulated_barrier = nullptr;
inline std::vector<double> emulated_dynamic_shared;  // doubles: aligned for any element type

inline void __syncthreads() {
  if (!emulated_barrier) {  // a kernel with barriers launched through emulated_launch
    std::fprintf(stderr, "cuda_emulation: __syncthreads outside emulated_launch_sync\n");
    std::abort();
  }
  emulated_barrier->wait();
}

inline bool emulated_bad_shape(int64_t grid, int64_t block) {
  if (grid <= 0 || grid > 2147483647 || block <= 0 || block > 1024) {
    emulated_error = cudaErrorInvalidConfiguration;
    return true;
  }
  gridDim.x = unsigned(grid);
  blockDim.x = unsigned(block);
  return false;
}

// kernel<<<grid, block, 0, stream>>>(args...) on the calling thread.
template <typename Kernel, typename... Args>
void emulated_launch(int64_t grid, int64_t block, Kernel kernel, Args... args) {
  if (emulated_bad_shape(grid, block)) return;
  for (int64_t b = 0; b < grid; ++b) {
    for (int64_t t = 0; t < block; ++t) {
      blockIdx.x = unsigned(b);
      threadIdx.x = unsigned(t);
      kernel(args...);
    }
  }
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...): a block's threads at once, so barriers hold.
template <typename Kernel, typename... Args>
void emulated_launch_sync(int64_t grid, int64_t block, int64_t shared_bytes, Kernel kernel, Args... args) {
  if (shared_bytes < 0 || shared_bytes > 48 * 1024) {  // more needs cudaFuncSetAttribute, not used here
    emulated_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (emulated_bad_shape(grid, block)) return;
  emulated_dynamic_shared.assign(size_t(shared_bytes / sizeof(double) + 1), std::nan(""));  // unset reads show
  EmulatedBarrier barrier(block);
  emulated_barrier = &barrier;
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = unsigned(t);
      for (int64_t b = 0; b < grid; ++b) {
        blockIdx.x = unsigned(b);
        kernel(args...);
        barrier.wait();  // the block ends before the next one reuses its shared memory
      }
    });
  }
  for (auto& th : threads) th.join();
  emulated_barrier = nullptr;
}

#define CL_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emulated_dynamic_shared.data())
