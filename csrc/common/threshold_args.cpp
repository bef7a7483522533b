// Contract: common/threshold_args.h.
#include "common/threshold_args.h"

#include <limits>

namespace gradstab {

void check_threshold_state(const at::Tensor& t, const char* name, at::ScalarType dtype,
                           at::IntArrayRef shape, const at::Device& device, const char* fn) {
  TORCH_CHECK_VALUE(t.device() == device, fn, ": state tensor '", name, "' must be on ", device,
                    ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, fn, ": state tensor '", name, "' must be ",
                    dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, fn, ": state tensor '", name, "' has shape ", t.sizes(),
                    ", expected ", shape);
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": state tensor '", name, "' must be contiguous");
}

at::Tensor threshold_norms(const c10::optional<at::Tensor>& norm, at::IntArrayRef shape,
                           const at::Device& device, const char* fn) {
  if (!norm.has_value()) return at::Tensor();
  const at::Tensor& g = *norm;
  TORCH_CHECK_VALUE(g.device() == device, fn, ": norm must be on ", device, ", got ",
                    g.device());
  TORCH_CHECK_VALUE(at::isFloatingType(g.scalar_type()), fn,
                    ": norm must be a floating tensor, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.sizes() == shape, fn, ": norm has shape ", g.sizes(),
                    " but the state tracks shape ", shape);
  return g.to(at::kDouble).contiguous();
}

namespace {

std::vector<int64_t> with_leading(int64_t leading, at::IntArrayRef shape) {
  std::vector<int64_t> out{leading};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

double cap_or_nan(c10::optional<double> cap) {
  return cap.has_value() ? *cap : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

ZCall check_zscore_call(const c10::optional<at::Tensor>& norm, const at::Tensor& mean,
                        const at::Tensor& var, const at::Tensor& count, const at::Tensor& spikes,
                        const at::Tensor& warmup, double alpha, double z_thresh, double eps,
                        c10::optional<double> cap, int64_t warmup_steps, int64_t rule,
                        bool skip_on_spike, bool update, const at::Device& device,
                        const char* fn) {
  TORCH_CHECK_VALUE(warmup_steps >= 1, fn, ": warmup_steps must be >= 1, got ", warmup_steps);
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 2, fn, ": rule must be 0, 1 or 2, got ", rule);
  const auto shape = mean.sizes();
  TORCH_CHECK_VALUE(shape.size() <= 1, fn, ": the state must be 0-d or 1-D, got shape ", shape);
  check_threshold_state(mean, "mean", at::kDouble, shape, device, fn);
  check_threshold_state(var, "var", at::kDouble, shape, device, fn);
  check_threshold_state(count, "count", at::kLong, shape, device, fn);
  check_threshold_state(spikes, "spikes", at::kLong, shape, device, fn);
  check_threshold_state(warmup, "warmup", at::kDouble, with_leading(warmup_steps, shape), device,
                        fn);
  at::Tensor g = threshold_norms(norm, shape, device, fn);
  TORCH_CHECK_VALUE(!update || g.defined(), fn, ": update needs this step's norm");
  return {g, rules::ZConfig{alpha, z_thresh, eps, cap_or_nan(cap), warmup_steps,
                            static_cast<rules::ZRule>(rule), skip_on_spike}};
}

PCall check_percentile_call(const c10::optional<at::Tensor>& norm, const at::Tensor& history,
                            const at::Tensor& count, double percentile,
                            c10::optional<double> cap, int64_t warmup_steps,
                            bool include_current, bool update, const at::Device& device,
                            const char* fn) {
  const auto shape = count.sizes();
  TORCH_CHECK_VALUE(shape.size() <= 1, fn, ": the state must be 0-d or 1-D, got shape ", shape);
  TORCH_CHECK_VALUE(history.dim() == static_cast<int64_t>(shape.size()) + 1 &&
                        history.size(0) >= 1,
                    fn, ": state tensor 'history' must be [history, *shape], got shape ",
                    history.sizes());
  check_threshold_state(history, "history", at::kDouble, with_leading(history.size(0), shape),
                        device, fn);
  check_threshold_state(count, "count", at::kLong, shape, device, fn);
  TORCH_CHECK_VALUE(percentile >= 0 && percentile <= 100, fn,
                    ": percentile must be in [0, 100], got ", percentile);
  at::Tensor g = threshold_norms(norm, shape, device, fn);
  TORCH_CHECK_VALUE(!update || g.defined(), fn, ": update needs this step's norm");
  return {g, rules::PConfig{percentile, cap_or_nan(cap), history.size(0), warmup_steps,
                            include_current}};
}

}  // namespace gradstab
