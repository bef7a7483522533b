// Contract: gradstab._C.zscore_threshold(...) and gradstab._C.percentile_threshold(...), the
// compiled rules of gradstab.adaptive.ZScoreThreshold and PercentileThreshold for a state on
// the CPU: in one call, this step's bound (`judge`: from the state and, where given, this step's
// norm) and the update of the state in place with the norm (`update`). The arithmetic is
// common/threshold_rules.h. The state tensors are the Python object's own (float64 / int64,
// contiguous, on the CPU, shaped () or [T], the buffers [W or history, *shape]); every
// assumption is checked with a message naming the argument. Returns the float64 bound shaped
// like the state, or None when not judging.
//
// Why: the same rules as a dozen tiny tensor ops cost ~0.1-0.5 ms of host time per step (each
// op a dispatch and an allocation); one call costs a few microseconds.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/threshold_args.h"
#include "common/threshold_rules.h"

namespace gradstab {
namespace cpu {
namespace {

namespace py = pybind11;

py::object zscore_threshold(const c10::optional<at::Tensor>& norm, at::Tensor mean,
                            at::Tensor var, at::Tensor count, at::Tensor spikes,
                            at::Tensor warmup, double alpha, double z_thresh, double eps,
                            c10::optional<double> cap, int64_t warmup_steps, int64_t rule,
                            bool skip_on_spike, bool judge, bool update) {
  const char* fn = "gradstab._C.zscore_threshold";
  const ZCall call =
      check_zscore_call(norm, mean, var, count, spikes, warmup, alpha, z_thresh, eps, cap,
                        warmup_steps, rule, skip_on_spike, update, at::Device(at::kCPU), fn);
  const at::Tensor& g = call.g;
  const rules::ZConfig& c = call.c;
  const auto shape = mean.sizes();
  const int64_t n = mean.numel();
  double* mu = mean.data_ptr<double>();
  double* vr = var.data_ptr<double>();
  int64_t* ct = count.data_ptr<int64_t>();
  int64_t* sp = spikes.data_ptr<int64_t>();
  double* wb = warmup.data_ptr<double>();
  const double* gv = g.defined() ? g.data_ptr<double>() : nullptr;
  at::Tensor bound;
  double* out = nullptr;
  if (judge) {
    bound = at::empty(shape, mean.options());
    out = bound.data_ptr<double>();
  }
  for (int64_t i = 0; i < n; ++i) {
    rules::ZState s{mu[i], vr[i], ct[i], sp[i]};
    const double gi = gv != nullptr ? gv[i] : 0.0;
    if (judge) out[i] = rules::z_bound(c, s, gi, gv != nullptr);
    if (update) {
      rules::z_update(c, &s, wb + i, n, gi);
      mu[i] = s.mean;
      vr[i] = s.var;
      ct[i] = s.count;
      sp[i] = s.spikes;
    }
  }
  if (!judge) return py::none();
  return py::cast(bound);
}

// The percentile of values[0, m) (reordered in place; m > 0).
double percentile_of(const rules::PConfig& c, std::vector<double>* values, int64_t m) {
  int64_t lo, hi;
  double frac;
  rules::p_ranks(c, m, &lo, &hi, &frac);
  auto begin = values->begin();
  std::nth_element(begin, begin + lo, begin + m);
  const double a = (*values)[lo];
  const double b = hi == lo ? a : *std::min_element(begin + lo + 1, begin + m);
  return rules::p_value(a, b, frac);
}

py::object percentile_threshold(const c10::optional<at::Tensor>& norm, at::Tensor history,
                                at::Tensor count, double percentile, c10::optional<double> cap,
                                int64_t warmup_steps, bool include_current, bool judge,
                                bool update) {
  const char* fn = "gradstab._C.percentile_threshold";
  const PCall call = check_percentile_call(norm, history, count, percentile, cap, warmup_steps,
                                          include_current, update, at::Device(at::kCPU), fn);
  const at::Tensor& g = call.g;
  const rules::PConfig& c = call.c;
  const auto shape = count.sizes();
  const int64_t h = c.history;
  const int64_t n = count.numel();
  double* hist = history.data_ptr<double>();
  int64_t* ct = count.data_ptr<int64_t>();
  const double* gv = g.defined() ? g.data_ptr<double>() : nullptr;
  at::Tensor bound;
  double* out = nullptr;
  if (judge) {
    bound = at::empty(shape, history.options());
    out = bound.data_ptr<double>();
  }
  std::vector<double> values(judge ? h : 0);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = gv != nullptr ? gv[i] : 0.0;
    const bool finite = gv != nullptr && std::isfinite(gi);
    const int64_t slot = rules::p_slot(c, ct[i]);
    if (judge) {
      // the history the bound is taken from: after this norm when it is part of it
      const bool with_g = c.include_current && gv != nullptr;
      int64_t cnt, m;
      rules::p_window(c, ct[i], with_g && finite, &cnt, &m);
      double b = rules::kInf;
      if (m > 0) {
        for (int64_t k = 0; k < m; ++k) values[k] = hist[k * n + i];
        if (with_g && finite) values[slot] = gi;
        b = percentile_of(c, &values, m);
      }
      out[i] = rules::p_bound(c, b, gi, with_g, cnt);
    }
    if (update && finite) {
      hist[slot * n + i] = gi;
      ct[i] += 1;
    }
  }
  if (!judge) return py::none();
  return py::cast(bound);
}

}  // namespace

void register_thresholds(pybind11::module& m) {
  m.def("zscore_threshold", &zscore_threshold,
        "ZScoreThreshold's rule on a CPU state: this step's bound (judge) and/or the state "
        "updated in place with the norm (update).",
        py::arg("norm"), py::arg("mean"), py::arg("var"), py::arg("count"), py::arg("spikes"),
        py::arg("warmup"), py::arg("alpha"), py::arg("z_thresh"), py::arg("eps"),
        py::arg("cap"), py::arg("warmup_steps"), py::arg("rule"), py::arg("skip_on_spike"),
        py::arg("judge"), py::arg("update"));
  m.def("percentile_threshold", &percentile_threshold,
        "PercentileThreshold's rule on a CPU state: this step's bound (judge) and/or the state "
        "updated in place with the norm (update).",
        py::arg("norm"), py::arg("history"), py::arg("count"), py::arg("percentile"),
        py::arg("cap"), py::arg("warmup_steps"), py::arg("include_current"), py::arg("judge"),
        py::arg("update"));
}

}  // namespace cpu
}  // namespace gradstab
