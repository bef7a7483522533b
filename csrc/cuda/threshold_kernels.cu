// Contract: the kernels of threshold_kernels.cuh. Plain CUDA (no torch headers): nvcc compiles
// it into gradstab._C, the CPU execution harness compiles it unchanged as host C++.
#include "cuda/threshold_kernels.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/device_common.cuh"

namespace gradstab {
namespace cuda {

namespace {

// The warm-up buffer through the checked global accesses.
struct GlobalMem {
  __device__ static double load(const double* p) { return gload(p); }
  __device__ static void store(double* p, double v) { gstore(p, v); }
};

__device__ double warp_max(double v) {
  for (int off = 16; off > 0; off >>= 1) {
    const double o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

}  // namespace

__global__ void zscore_threshold_kernel(const __grid_constant__ ZParams P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P.n) return;
  rules::ZState s{gload(P.mean + i), gload(P.var + i), gload(P.count + i), gload(P.spikes + i)};
  const bool has = P.norm != nullptr;
  const double g = has ? gload(P.norm + i) : 0.0;
  if (P.bound != nullptr) gstore(P.bound + i, rules::z_bound(P.c, s, g, has));
  if (P.update) {
    rules::z_update<GlobalMem>(P.c, &s, P.warmup + i, P.n, g);
    gstore(P.mean + i, s.mean);
    gstore(P.var + i, s.var);
    gstore(P.count + i, s.count);
    gstore(P.spikes + i, s.spikes);
  }
}

__global__ void percentile_threshold_kernel(const __grid_constant__ PParams P) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (i >= P.n) return;  // the whole warp: i is the same in its 32 lanes
  const int64_t cnt0 = gload(P.count + i);
  const bool has = P.norm != nullptr;
  const double g = has ? gload(P.norm + i) : 0.0;
  const bool finite = has && std::isfinite(g);
  const int64_t slot = rules::p_slot(P.c, cnt0);
  if (P.bound != nullptr) {
    const bool with_g = P.c.include_current && has;
    const bool add_g = with_g && finite;
    int64_t cnt, m;
    rules::p_window(P.c, cnt0, add_g, &cnt, &m);
    double b = rules::kInf;
    if (m > 0) {
      int64_t lo, hi;
      double frac;
      rules::p_ranks(P.c, m, &lo, &hi, &frac);
      double va = -rules::kInf, vb = -rules::kInf;
      for (int64_t k = lane; k < m; k += 32) {
        const double v = (add_g && k == slot) ? g : gload(P.history + k * P.n + i);
        int64_t rank = 0;
        for (int64_t j = 0; j < m; ++j) {
          const double w = (add_g && j == slot) ? g : gload(P.history + j * P.n + i);
          rank += (w < v || (w == v && j < k)) ? 1 : 0;
        }
        if (rank == lo) va = v;
        if (rank == hi) vb = v;
      }
      const double a = warp_max(va);
      const double bb = warp_max(vb);
      b = rules::p_value(a, bb, frac);
    }
    if (lane == 0) gstore(P.bound + i, rules::p_bound(P.c, b, g, with_g, cnt));
  }
  __syncwarp();  // every lane has read the history before lane 0 writes it
  if (P.update && finite && lane == 0) {
    gstore(P.history + slot * P.n + i, g);
    gstore(P.count + i, cnt0 + 1);
  }
}

}  // namespace cuda
}  // namespace gradstab
