// Contract: gradstab's CUDA kernels run on the simulator (gs_sim::launch): one function per kernel,
// taking the kernel's own parameters, a grid, the memory regions it may access and the launch
// options. sim_kernels.cpp, sim_agc.cpp and sim_thresholds.cpp compile norm_kernels.cu, agc_kernels.cu
// and threshold_kernels.cu unchanged (as
// included files) against the stand-in CUDA headers in include/. Throws gs_sim::SimError. Also the
// stand-in float16/bfloat16 conversions, for the tests that check them against PyTorch's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/agc_kernels.cuh"
#include "cuda/norm_kernels.cuh"
#include "cuda/threshold_kernels.cuh"
#include "gs_sim/runtime.h"

namespace gradstab {
namespace cuda {
namespace sim {

using Regions = std::vector<gs_sim::Region>;

void run_reduce_kernel(const Params& P, int grid, const Regions& regions,
                       const gs_sim::Options& options, gs_sim::Stats* stats);
void run_scale_kernel(const Params& P, int grid, const Regions& regions,
                      const gs_sim::Options& options, gs_sim::Stats* stats);
void run_writeback_kernel(const WritebackParams& W, int grid, const Regions& regions,
                          const gs_sim::Options& options, gs_sim::Stats* stats);
void run_agc_reduce_kernel(const AgcParams& P, int grid, const Regions& regions,
                           const gs_sim::Options& options, gs_sim::Stats* stats);
void run_agc_scale_kernel(const AgcParams& P, int grid, const Regions& regions,
                          const gs_sim::Options& options, gs_sim::Stats* stats);
void run_zscore_threshold_kernel(const ZParams& P, int grid, const Regions& regions,
                                 const gs_sim::Options& options, gs_sim::Stats* stats);
void run_percentile_threshold_kernel(const PParams& P, int grid, const Regions& regions,
                                     const gs_sim::Options& options, gs_sim::Stats* stats);

// The checkers' self-test (selftest_kernels.cpp): case `which` (0 = no fault, 1 out of bounds,
// 2 misaligned vector load, 3 store to read-only memory, 4 a lane returning before a shuffle,
// 5 lanes at different collectives, 6 a partial mask); the simulator's message, or "".
std::string run_selftest(int which, const gs_sim::Options& options);

// The stand-in conversions of include/gs_sim/half.h (bits in, bits out).
uint16_t float_to_half_bits(float f);
uint16_t float_to_bfloat16_bits(float f);
float half_bits_to_float(uint16_t h);

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
