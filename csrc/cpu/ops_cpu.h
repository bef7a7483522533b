// Contract: the CPU kernels of the gradstab ops (schemas in gradstab/_library.py), callable from
// C++. ops_cpu.cpp registers them for the CPU dispatch key; fast_path.cpp calls them directly.
// Each returns (norms [T], max_abs [T], nonfinite [T] int64, total_norm []) of the gradients as
// they were on entry (float64 if any gradient is float64, float32 otherwise), checks every
// argument before touching any gradient, and modifies the gradients in place as the op says.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace gradstab {
namespace cpu {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats grad_stats_cpu(at::TensorList grads, double norm_type);
Stats clip_norm_cpu(at::TensorList grads, const at::Tensor& max_norm, double norm_type,
                    double eps, bool error_if_nonfinite);
Stats clip_norm_per_layer_cpu(at::TensorList grads, const at::Tensor& max_norm,
                              double norm_type, double eps);
Stats normalize_per_layer_cpu(at::TensorList grads, const at::Tensor& target_norm,
                              double norm_type, double eps);
Stats clip_value_cpu(at::TensorList grads, const at::Tensor& clip_value, double norm_type);

}  // namespace cpu
}  // namespace gradstab
