// Contract: norm_kernels.cu, compiled unchanged as host C++ (GRADSTAB_CUDA_SIM: device_common.cuh's
// data accesses are checked), and its three kernels launched on the simulator (sim_kernels.h).
// norm_kernels.cu and agc_kernels.cu each define internal helpers with the same names, so they are
// compiled in separate translation units (this one and sim_agc.cpp), as by nvcc.
#include "sim_kernels.h"

#include "cuda/norm_kernels.cu"

namespace gradstab {
namespace cuda {
namespace sim {

void run_reduce_kernel(const Params& P, int grid, const Regions& regions,
                       const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "reduce_kernel", [](const void* a) { reduce_kernel(*static_cast<const Params*>(a)); }, &P,
      grid, kThreads, regions, options, stats);
}

void run_scale_kernel(const Params& P, int grid, const Regions& regions,
                      const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "scale_kernel", [](const void* a) { scale_kernel(*static_cast<const Params*>(a)); }, &P,
      grid, kThreads, regions, options, stats);
}

void run_writeback_kernel(const WritebackParams& W, int grid, const Regions& regions,
                          const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "writeback_kernel",
      [](const void* a) { writeback_kernel(*static_cast<const WritebackParams*>(a)); }, &W, grid,
      kThreads, regions, options, stats);
}

uint16_t float_to_half_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
uint16_t float_to_bfloat16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
