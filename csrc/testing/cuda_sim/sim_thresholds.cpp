// Contract: threshold_kernels.cu, compiled unchanged as host C++ (GRADSTAB_CUDA_SIM: the state
// accesses are checked), and its two kernels launched on the simulator (sim_kernels.h).
#include "sim_kernels.h"

#include "cuda/threshold_kernels.cu"

namespace gradstab {
namespace cuda {
namespace sim {

void run_zscore_threshold_kernel(const ZParams& P, int grid, const Regions& regions,
                                 const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "zscore_threshold_kernel",
      [](const void* a) { zscore_threshold_kernel(*static_cast<const ZParams*>(a)); }, &P, grid,
      kThresholdThreads, regions, options, stats);
}

void run_percentile_threshold_kernel(const PParams& P, int grid, const Regions& regions,
                                     const gs_sim::Options& options, gs_sim::Stats* stats) {
  gs_sim::launch(
      "percentile_threshold_kernel",
      [](const void* a) { percentile_threshold_kernel(*static_cast<const PParams*>(a)); }, &P,
      grid, kThresholdThreads, regions, options, stats);
}

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
