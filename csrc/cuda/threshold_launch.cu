// Contract: the launches of the threshold kernels (threshold_kernels.cuh) on a stream; nvcc only
// (the CPU execution harness launches the same kernels on its simulator).
#include "cuda/threshold_kernels.cuh"

#include <cuda_runtime.h>

namespace gradstab {
namespace cuda {

void launch_zscore_threshold(const ZParams& P, cudaStream_t stream) {
  const int64_t blocks = (P.n + kThresholdThreads - 1) / kThresholdThreads;
  zscore_threshold_kernel<<<static_cast<unsigned>(blocks), kThresholdThreads, 0, stream>>>(P);
}

void launch_percentile_threshold(const PParams& P, cudaStream_t stream) {
  constexpr int kWarps = kThresholdThreads / 32;
  const int64_t blocks = (P.n + kWarps - 1) / kWarps;
  percentile_threshold_kernel<<<static_cast<unsigned>(blocks), kThresholdThreads, 0, stream>>>(P);
}

}  // namespace cuda
}  // namespace gradstab
