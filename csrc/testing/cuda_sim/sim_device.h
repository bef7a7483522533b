// Contract: the device of the torch-free plans (norm_plan.h, agc_plan.h) on the simulator: what
// norm_ops.cpp / agc.cpp do with the CUDA runtime, done with host memory and the
// simulated kernels. Used by the pytest binding (binding.cpp) and the ThreadSanitizer driver
// (tsan_driver.cpp).
//   * memory: the caller's host memory stands for device memory; `grads` / `params` are the
//     working memory of each gradient / parameter (what the table points at), registered as the
//     regions the kernels may touch: gradients writable only by the launches that may write them
//     (the reduce kernel only in kClipValue mode or a non-deferred AGC; the scale kernels), and
//     parameters never.
//   * a gradient that is not dense has a WorkCopy: refresh_copy gathers it into its working
//     copy, write_back runs the write-back kernel (or, beyond its 12 dimensions, copies
//     unconditionally, as ATen's copy_ does in the launcher).
//   * grids: Grid::exact > 0 launches exactly that many blocks; otherwise the GPU's persistent
//     grid for `resident` blocks (persistent_grid in norm_kernels.cuh), capped by max_blocks.
//   * log(): one line per launch, for tests of the launch sequence.
// Errors from the simulator propagate as gs_sim::SimError.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/agc_plan.h"
#include "cuda/norm_plan.h"
#include "gs_sim/runtime.h"

namespace gradstab {
namespace cuda {
namespace sim {

// A strided gradient and its contiguous working copy (numel elements of elem_size bytes).
struct WorkCopy {
  void* work = nullptr;
  void* grad = nullptr;
  int64_t numel = 0;
  int64_t elem_size = 0;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

struct Grid {
  int exact = 0;
  int resident = 4;
  int max_blocks = 0;
};

class SimDevice final : public NormDevice, public AgcDevice {
 public:
  // copies[i] describes gradient i's working copy (work == nullptr: none).
  SimDevice(const gs_sim::Options& options, const Grid& grid, std::vector<gs_sim::Region> grads,
            std::vector<gs_sim::Region> params, std::vector<WorkCopy> copies);

  void zero(void* dst, int64_t bytes) override;
  void reduce(const Params& P, int64_t units) override;
  void scale(const Params& P, int64_t units) override;
  void reduce(const AgcParams& P, int64_t items) override;
  void scale(const AgcParams& P, int64_t items) override;
  void refresh_copy(int64_t i) override;
  void write_back(int64_t i, const int32_t* flag32, const int64_t* flag64) override;
  void write_back(int64_t i, const int64_t* flag64) override;

  const gs_sim::Stats& stats() const { return stats_; }
  const std::vector<std::string>& log() const { return log_; }

 private:
  int grid_for(int64_t work) const;
  std::vector<gs_sim::Region> regions(bool grads_writable) const;

  gs_sim::Options options_;
  Grid grid_;
  std::vector<gs_sim::Region> grads_, params_;
  std::vector<WorkCopy> copies_;
  gs_sim::Stats stats_;
  std::vector<std::string> log_;
};

// Copies between a strided tensor and its contiguous form (row-major order), bit for bit.
void gather_strided(void* contiguous, const void* strided, int64_t elem_size,
                    const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides);
void scatter_strided(void* strided, const void* contiguous, int64_t elem_size,
                     const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides);

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
