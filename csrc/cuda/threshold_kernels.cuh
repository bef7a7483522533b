// Contract: the interface between the CUDA kernels of the adaptive thresholds' rules
// (threshold_kernels.cu, plain CUDA, no torch headers) and their host side (thresholds.cpp, the
// launches in threshold_launch.cu, the CPU execution harness csrc/testing/cuda_sim): POD
// parameter structs and the launch functions. The arithmetic is common/threshold_rules.h, the
// same as the CPU's (gradstab._C.zscore_threshold / percentile_threshold), bit for bit.
//
// The state arrays are the Python object's own contiguous float64/int64 tensors on the device
// (n tracked norms; the buffers [W or history, n], row-major). `norm` is this step's norms as
// float64 (nullptr: before the step), `bound` receives the bound (nullptr: not judging).
//   z-score: one thread per tracked norm.
//   percentile: one warp per tracked norm; the lanes rank the m valid values (value k's rank:
//   the values below it, plus the equal ones in earlier slots: a permutation) and the lanes
//   holding ranks lo and hi hand them over by shuffles; O(m^2 / 32) comparisons per warp, so
//   the host takes this kernel only for histories of at most kMaxKernelHistory values.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/threshold_rules.h"

namespace gradstab {
namespace cuda {

constexpr int kThresholdThreads = 256;
constexpr int64_t kMaxKernelHistory = 4096;

struct ZParams {
  rules::ZConfig c;
  int64_t n;
  const double* norm;  // [n] or nullptr
  double* mean;
  double* var;
  int64_t* count;
  int64_t* spikes;
  double* warmup;  // [W, n]
  double* bound;   // [n] or nullptr
  int32_t update;
};

struct PParams {
  rules::PConfig c;
  int64_t n;
  const double* norm;  // [n] or nullptr
  double* history;     // [history, n]
  int64_t* count;
  double* bound;  // [n] or nullptr
  int32_t update;
};

// The kernels (threshold_kernels.cu); the CPU execution harness compiles that file as host C++.
#if defined(__CUDACC__)
__global__ void zscore_threshold_kernel(const __grid_constant__ ZParams P);
__global__ void percentile_threshold_kernel(const __grid_constant__ PParams P);
#endif

// Launches on `stream` (threshold_launch.cu; nvcc only).
void launch_zscore_threshold(const ZParams& P, cudaStream_t stream);
void launch_percentile_threshold(const PParams& P, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradstab
