// Contract: the CPU kernels of the gradstab ops (schemas in gradstab/_library.py), callable from
// C++. norm_ops.cpp registers them for the CPU dispatch key; fast_path.cpp calls them directly.
// Each returns (norms [T], max_abs [T], nonfinite [T] int64, total_norm []) of the gradients as
// they were on entry (float64 if any gradient is float64, float32 otherwise), checks every
// argument before touching any gradient, and modifies the gradients in place as the op says.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/args.h"
#include "common/codes.h"
#include "cpu/range_kernels.h"

namespace gradstab {
namespace cpu {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Runs run(begin, end) over the work items [0, n) split into nt contiguous ranges of about
// equal total size_of(k), one range per thread (nt <= 1: run(0, n) on this thread). Splitting
// by size, not by count, matters: ResNet-50's many small tensors sit early, and a split by count
// gave one of two threads 60% of its elements. The ranges depend only on the sizes and nt, so
// repeated passes give each thread the same range (what it read last is still in its cache).
template <typename SizeOf, typename Run>
void parallel_balanced(int64_t n, int64_t nt, const SizeOf& size_of, const Run& run) {
  if (nt <= 1) {
    run(0, n);
    return;
  }
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) total += size_of(k);
  std::vector<int64_t> bounds(nt + 1, n);
  bounds[0] = 0;
  int64_t seen = 0, r = 1;
  for (int64_t k = 0; k < n && r < nt; ++k) {
    seen += size_of(k);
    while (r < nt && seen * nt >= total * r) bounds[r++] = k + 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) run(bounds[t], bounds[t + 1]);
  });
}

Stats grad_stats_cpu(at::TensorList grads, double norm_type);
Stats clip_norm_cpu(at::TensorList grads, const at::Tensor& max_norm, double norm_type,
                    double eps, bool error_if_nonfinite);
Stats clip_norm_per_layer_cpu(at::TensorList grads, const at::Tensor& max_norm,
                              double norm_type, double eps);
Stats normalize_per_layer_cpu(at::TensorList grads, const at::Tensor& target_norm,
                              double norm_type, double eps);
Stats clip_value_cpu(at::TensorList grads, const at::Tensor& clip_value, double norm_type);
// Scales every gradient by min(1, max_norm / (total_norm + eps)) (both one-element CPU
// tensors); nothing is read or written when that is 1.
void clip_with_norm_cpu(at::TensorList grads, const at::Tensor& max_norm,
                        const at::Tensor& total_norm, double eps);

}  // namespace cpu
}  // namespace gradstab
