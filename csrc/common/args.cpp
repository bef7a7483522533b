// Contract: see args.h.
#include "common/args.h"

#include <cmath>
#include <cstddef>
#include <string>

namespace gradstab {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    default: return kDouble;
  }
}

void check_norm_type(double p) {
  TORCH_CHECK_VALUE(p > 0.0 && !std::isnan(p),
                    "gradstab: norm_type must be a positive number or inf, got ", p);
}

namespace {

bool supported_float_dtype(at::ScalarType st) {
  return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble;
}

}  // namespace

void check_grads(at::TensorList grads, at::DeviceType device_type, const char* kernel,
                 const char* what) {
  const size_t n = grads.size();
  const bool is_grad = std::string(what) == "gradient";
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), "gradstab: ", what, " ", i, " of ", n, " is undefined");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "gradstab: ", what, " ", i, " of ", n,
                      " has layout ", g.layout(), "; only dense (strided) ", what,
                      "s are supported", is_grad ? ". Convert it with `p.grad = p.grad.to_dense()`"
                                                : "");
    TORCH_CHECK_VALUE(g.device() == grads[0].device(), "gradstab: all ", what, "s of one call "
                      "must be on one device, ", what, " 0 is on ", grads[0].device(), " and ",
                      what, " ", i, " on ", g.device(), "; call once per device");
    TORCH_CHECK_TYPE(supported_float_dtype(g.scalar_type()), "gradstab: ", what, " ", i, " of ",
                     n, " has dtype ", g.scalar_type(), "; only float16, bfloat16, float32 and "
                     "float64 ", what, "s are supported");
    TORCH_CHECK(g.device().type() == device_type, "gradstab: the ", kernel, " kernel got a ",
                what, " on ", g.device());
  }
}

void check_adaptive_clip_args(at::TensorList grads, at::TensorList params, double clip_factor,
                              double eps, double norm_type, at::DeviceType device_type,
                              const char* kernel) {
  check_norm_type(norm_type);
  TORCH_CHECK_VALUE(clip_factor > 0.0, "gradstab: clip_factor must be a positive number, got ",
                    clip_factor);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps),
                    "gradstab: eps must be a finite number >= 0, got ", eps);
  const size_t n = grads.size();
  TORCH_CHECK_VALUE(params.size() == n, "gradstab: adaptive_clip needs one parameter per "
                    "gradient, got ", n, " gradients and ", params.size(), " parameters");
  check_grads(grads, device_type, kernel, "gradient");
  check_grads(params, device_type, kernel, "parameter");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& w = params[i];
    TORCH_CHECK_VALUE(w.device() == g.device(), "gradstab: parameter ", i, " of ", n, " is on ",
                      w.device(), " but its gradient is on ", g.device(),
                      "; a parameter and its gradient must be on one device");
    TORCH_CHECK_VALUE(w.sizes() == g.sizes(), "gradstab: parameter ", i, " of ", n,
                      " has shape ", w.sizes(), " but its gradient has shape ", g.sizes());
  }
}

ByteSpan byte_span(const at::Tensor& t) {
  return strided_byte_span(reinterpret_cast<uint64_t>(t.const_data_ptr()), t.sizes().data(),
                           t.strides().data(), t.dim(), static_cast<int64_t>(t.element_size()));
}

}  // namespace gradstab
