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

constexpr int kAgcMaxDevices = 64;

// Resident blocks per SM of each kernel, per device (computed once; racing writers agree).
std::atomic<int> g_agc_reduce_per_sm[kAgcMaxDevices];
std::atomic<int> g_agc_scale_per_sm[kAgcMaxDevices];
std::atomic<int> g_agc_sms[kAgcMaxDevices];

int agc_grid_for(int device, int64_t items, int max_blocks, const void* kernel,
                 std::atomic<int>* per_sm_cache) {
  int sms = 0, per_sm = 0;
  const bool cached = device >= 0 && device < kAgcMaxDevices;
  if (cached) {
    sms = g_agc_sms[device].load(std::memory_order_relaxed);
    per_sm = per_sm_cache[device].load(std::memory_order_relaxed);
  }
  if (sms <= 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      sms = 1;
    }
    if (cached) g_agc_sms[device].store(sms);
  }
  if (per_sm <= 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) !=
        cudaSuccess) {
      (void)cudaGetLastError();
      per_sm = 1;
    }
    per_sm = per_sm < 1 ? 1 : per_sm;
    if (cached) per_sm_cache[device].store(per_sm);
  }
  return persistent_grid(items, static_cast<int64_t>(sms) * per_sm, max_blocks);
}

}  // namespace

int agc_reduce_grid(int device, int64_t items, int max_blocks) {
  return agc_grid_for(device, items, max_blocks,
                      reinterpret_cast<const void*>(&agc_reduce_kernel), g_agc_reduce_per_sm);
}

int agc_scale_grid(int device, int64_t items, int max_blocks) {
  return agc_grid_for(device, items, max_blocks, reinterpret_cast<const void*>(&agc_scale_kernel),
                      g_agc_scale_per_sm);
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
