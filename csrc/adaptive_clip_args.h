// Contract: the argument checks of gradstab::adaptive_clip, shared by its CPU kernel
// (cpu/agc_cpu.cpp) and its CUDA launcher (cuda/agc_ops_cuda.cpp) so both refuse the same
// inputs with the same words, in the same order, before any gradient is touched. Host code,
// ATen only.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>

namespace gradstab {

inline bool supported_float_dtype(at::ScalarType st) {
  return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble;
}

// Every check of adaptive_clip's arguments; `kernel` ("CPU", "CUDA") names the kernel in the
// last one, that the gradients are on the device type it serves.
inline void check_adaptive_clip_args(at::TensorList grads, at::TensorList params,
                                     double clip_factor, double eps, double norm_type,
                                     at::DeviceType device_type, const char* kernel) {
  TORCH_CHECK_VALUE(norm_type > 0.0 && !std::isnan(norm_type),
                    "gradstab: norm_type must be a positive number or inf, got ", norm_type);
  TORCH_CHECK_VALUE(clip_factor > 0.0, "gradstab: clip_factor must be a positive number, got ",
                    clip_factor);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps),
                    "gradstab: eps must be a finite number >= 0, got ", eps);
  const size_t n = grads.size();
  TORCH_CHECK_VALUE(params.size() == n, "gradstab: adaptive_clip needs one parameter per "
                    "gradient, got ", n, " gradients and ", params.size(), " parameters");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& w = params[i];
    TORCH_CHECK_VALUE(g.defined(), "gradstab: gradient ", i, " of ", n, " is undefined");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "gradstab: gradient ", i, " of ", n,
                      " has layout ", g.layout(), "; only dense (strided) gradients are "
                      "supported. Convert it with `p.grad = p.grad.to_dense()`");
    TORCH_CHECK_VALUE(g.device() == grads[0].device(), "gradstab: all gradients of one call "
                      "must be on one device, gradient 0 is on ", grads[0].device(),
                      " and gradient ", i, " on ", g.device(), "; call once per device");
    TORCH_CHECK_TYPE(supported_float_dtype(g.scalar_type()), "gradstab: gradient ", i, " of ",
                     n, " has dtype ", g.scalar_type(), "; only float16, bfloat16, float32 "
                     "and float64 gradients are supported");
    TORCH_CHECK_VALUE(w.defined(), "gradstab: parameter ", i, " of ", n, " is undefined");
    TORCH_CHECK_VALUE(w.layout() == at::kStrided, "gradstab: parameter ", i, " of ", n,
                      " has layout ", w.layout(), "; only dense (strided) parameters are "
                      "supported");
    TORCH_CHECK_VALUE(w.device() == g.device(), "gradstab: parameter ", i, " of ", n, " is on ",
                      w.device(), " but its gradient is on ", g.device(),
                      "; a parameter and its gradient must be on one device");
    TORCH_CHECK_TYPE(supported_float_dtype(w.scalar_type()), "gradstab: parameter ", i, " of ",
                     n, " has dtype ", w.scalar_type(), "; only float16, bfloat16, float32 "
                     "and float64 parameters are supported");
    TORCH_CHECK_VALUE(w.sizes() == g.sizes(), "gradstab: parameter ", i, " of ", n,
                      " has shape ", w.sizes(), " but its gradient has shape ", g.sizes());
    TORCH_CHECK(g.device().type() == device_type, "gradstab: the ", kernel,
                " kernel got a gradient on ", g.device());
  }
}

}  // namespace gradstab
