// Contract: agc_kernels.cu, compiled unchanged as host C++ (GRADSTAB_CUDA_SIM: device_common.cuh's
// data accesses are checked), and its two kernels launched on the simulator (sim_kernels.h).
#include "sim_kernels.h"

#include "cuda/agc_kernels.cu"

namespace gradstab {
namespace cuda {
namespace sim {

void run_agc_reduce_kernel(const AgcParams& P, int grid, const Regions& regions,
                           const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "agc_reduce_kernel",
      [](const void* a) { agc_reduce_kernel(*static_cast<const AgcParams*>(a)); }, &P, grid,
      kThreads, regions, options, stats);
}

void run_agc_scale_kernel(const AgcParams& P, int grid, const Regions& regions,
                          const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "agc_scale_kernel",
      [](const void* a) { agc_scale_kernel(*static_cast<const AgcParams*>(a)); }, &P, grid,
      kThreads, regions, options, stats);
}

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
