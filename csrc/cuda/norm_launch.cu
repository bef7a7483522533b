// Contract: the host side of norm_kernels.cu's launches, compiled by nvcc only: the grid of each
// kernel (a persistent grid: the resident maximum from the occupancy API, fewer blocks when there
// is less work, capped by the test hook) and the <<<...>>> launches declared in norm_kernels.cuh.
// Kept out of norm_kernels.cu so that the kernel file compiles unchanged as host C++ in the CPU
// execution harness (csrc/testing/cuda_sim), which launches the same kernels on its simulated grid
// instead.
#include "cuda/norm_kernels.cuh"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace gradstab {
namespace cuda {
namespace {

// The SM count of each device and the resident blocks per SM of each kernel, per device
// (computed once; racing writers agree).
std::atomic<int> g_sms[kGridDevices];
std::atomic<int> g_reduce_per_sm[kGridDevices];
std::atomic<int> g_scale_per_sm[kGridDevices];

}  // namespace

int resident_grid(int device, int64_t work, int max_blocks, const void* kernel,
                  std::atomic<int>* per_sm_cache) {
  int sms = 0, per_sm = 0;
  const bool cached = device >= 0 && device < kGridDevices;
  if (cached) {
    sms = g_sms[device].load(std::memory_order_relaxed);
    per_sm = per_sm_cache[device].load(std::memory_order_relaxed);
  }
  if (sms <= 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      sms = 1;
    }
    if (cached) g_sms[device].store(sms);
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
  return persistent_grid(work, static_cast<int64_t>(sms) * per_sm, max_blocks);
}

int reduce_grid(int device, int64_t total_units, int max_blocks) {
  return resident_grid(device, total_units, max_blocks,
                       reinterpret_cast<const void*>(&reduce_kernel), g_reduce_per_sm);
}

int scale_grid(int device, int64_t total_units, int max_blocks) {
  return resident_grid(device, total_units, max_blocks,
                       reinterpret_cast<const void*>(&scale_kernel), g_scale_per_sm);
}

cudaError_t launch_reduce(const Params& params, int grid, cudaStream_t stream) {
  reduce_kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_scale(const Params& params, int grid, cudaStream_t stream) {
  scale_kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_writeback(const WritebackParams& params, cudaStream_t stream) {
  writeback_kernel<<<writeback_grid(params.numel), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradstab
