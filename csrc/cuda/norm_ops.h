// Contract: the CUDA implementation of the gradstab ops, callable from C++ (norm_ops.cpp
// registers it for the CUDA dispatch key; fast_path.cpp calls it directly). Same
// semantics as the CPU kernels (norm_ops.cpp): every argument is checked before any gradient is
// touched; returns (norms [T], max_abs [T], nonfinite [T] int64, total_norm []) of the gradients
// as they were on entry, float64 if any gradient is float64, float32 otherwise, on their device.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "common/codes.h"

namespace gradstab {
namespace cuda {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The bound of a clipping op: a one-element tensor (on the CPU, read on the host; or on the
// gradients' device, never read on the host), or, when `tensor` is null, a host number.
struct Bound {
  const at::Tensor* tensor = nullptr;
  double value = 0.0;
};

Stats run_op(Op op, at::TensorList grads, const Bound& bound, double norm_type, double eps,
             bool error_if_nonfinite);

// Test hooks: cap the grid (0: no cap; results must not depend on it), and the descriptor-table
// cache's counters.
void set_max_blocks(int blocks);
struct CacheStats {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t built_in_capture = 0;
  int64_t entries = 0;
  int64_t retained = 0;
};
CacheStats cache_stats();
void clear_cache();  // drops every entry not used by a CUDA graph capture

// What the CUDA part of this build is ("CUDA runtime 12.8 at build time; ...").
std::string build_description();

}  // namespace cuda
}  // namespace gradstab
