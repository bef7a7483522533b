// Contract: the host side of agc_kernels.cu's launches, compiled by nvcc only: the grid of each
// kernel (the resident maximum from the occupancy API, fewer blocks when there is less work,
// capped by the test hook) and the <<<...>>> launches declared in agc_kernels.cuh. Kept out of
// agc_kernels.cu so that the kernel file compiles unchanged as host C++ in the CPU execution
// harness (csrc/testing/cuda_sim), which launches the same kernels on its simulated grid.
#include "cuda/agc_kernels.cuh"
#include "cuda/norm_kernels.cuh"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace gradstab {
namespace cuda {
namespace {

// Resident blocks per SM of each kernel, per device (resident_grid, norm_launch.cu, fills them).
std::atomic<int> g_agc_reduce_per_sm[kGridDevices];
std::atomic<int> g_agc_scale_per_sm[kGridDevices];

}  // namespace

int agc_reduce_grid(int device, int64_t items, int max_blocks) {
  return resident_grid(device, items, max_blocks,
                       reinterpret_cast<const void*>(&agc_reduce_kernel), g_agc_reduce_per_sm);
}

int agc_scale_grid(int device, int64_t items, int max_blocks) {
  return resident_grid(device, items, max_blocks,
                       reinterpret_cast<const void*>(&agc_scale_kernel), g_agc_scale_per_sm);
}

cudaError_t launch_agc_reduce(const AgcParams& params, int grid, cudaStream_t stream) {
  agc_reduce_kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_agc_scale(const AgcParams& params, int grid, cudaStream_t stream) {
  agc_scale_kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradstab
