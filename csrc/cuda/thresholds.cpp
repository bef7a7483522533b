// Contract: gradstab._C.cuda_zscore_threshold(...) and gradstab._C.cuda_percentile_threshold(...)
// (CUDA builds): the twins of cpu/thresholds.cpp for a state on one CUDA device, with the same
// arguments, checks (common/threshold_args.h) and result: this step's bound (`judge`), a new
// float64 device tensor, and/or the state updated in place (`update`), by one kernel launch on
// the current stream (threshold_kernels.cuh) -- no host sync, nothing read back. The percentile
// kernel ranks the history in O(history^2 / 32) per tracked norm: the caller takes it only for
// histories of at most kMaxKernelHistory values (gradstab._C.CUDA_MAX_KERNEL_HISTORY).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/threshold_args.h"
#include "cuda/threshold_params.h"

namespace gradstab {
namespace cuda {
namespace {

namespace py = pybind11;

py::object cuda_zscore_threshold(const c10::optional<at::Tensor>& norm, at::Tensor mean,
                                 at::Tensor var, at::Tensor count, at::Tensor spikes,
                                 at::Tensor warmup, double alpha, double z_thresh, double eps,
                                 c10::optional<double> cap, int64_t warmup_steps, int64_t rule,
                                 bool skip_on_spike, bool judge, bool update) {
  const char* fn = "gradstab._C.cuda_zscore_threshold";
  TORCH_CHECK_VALUE(mean.is_cuda(), fn, ": state tensor 'mean' must be on a CUDA device, got ",
                    mean.device());
  const c10::cuda::CUDAGuard guard(mean.device());
  const ZCall call = check_zscore_call(norm, mean, var, count, spikes, warmup, alpha, z_thresh,
                                      eps, cap, warmup_steps, rule, skip_on_spike, update,
                                      mean.device(), fn);
  at::Tensor bound;
  if (judge) bound = at::empty(mean.sizes(), mean.options());
  const ZParams P = zscore_params(call, mean, var, count, spikes, warmup, bound, update);
  if (P.n > 0 && (judge || update)) {
    launch_zscore_threshold(P, c10::cuda::getCurrentCUDAStream(mean.device().index()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!judge) return py::none();
  return py::cast(bound);
}

py::object cuda_percentile_threshold(const c10::optional<at::Tensor>& norm, at::Tensor history,
                                     at::Tensor count, double percentile,
                                     c10::optional<double> cap, int64_t warmup_steps,
                                     bool include_current, bool judge, bool update) {
  const char* fn = "gradstab._C.cuda_percentile_threshold";
  TORCH_CHECK_VALUE(count.is_cuda(), fn, ": state tensor 'count' must be on a CUDA device, got ",
                    count.device());
  const c10::cuda::CUDAGuard guard(count.device());
  const PCall call = check_percentile_call(norm, history, count, percentile, cap, warmup_steps,
                                          include_current, update, count.device(), fn);
  const int64_t h = history.size(0);
  TORCH_CHECK_VALUE(h <= kMaxKernelHistory, fn, ": a history of ", h,
                    " values is longer than the kernel serves (", kMaxKernelHistory,
                    "); the tensor ops serve it");
  at::Tensor bound;
  if (judge) bound = at::empty(count.sizes(), history.options());
  const PParams P = percentile_params(call, history, count, bound, update);
  if (P.n > 0 && (judge || update)) {
    launch_percentile_threshold(P, c10::cuda::getCurrentCUDAStream(count.device().index()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!judge) return py::none();
  return py::cast(bound);
}

}  // namespace

void register_thresholds(pybind11::module& m) {
  m.def("cuda_zscore_threshold", &cuda_zscore_threshold,
        "ZScoreThreshold's rule on a CUDA state, one kernel launch (see zscore_threshold).",
        py::arg("norm"), py::arg("mean"), py::arg("var"), py::arg("count"), py::arg("spikes"),
        py::arg("warmup"), py::arg("alpha"), py::arg("z_thresh"), py::arg("eps"),
        py::arg("cap"), py::arg("warmup_steps"), py::arg("rule"), py::arg("skip_on_spike"),
        py::arg("judge"), py::arg("update"));
  m.def("cuda_percentile_threshold", &cuda_percentile_threshold,
        "PercentileThreshold's rule on a CUDA state, one kernel launch (see "
        "percentile_threshold).",
        py::arg("norm"), py::arg("history"), py::arg("count"), py::arg("percentile"),
        py::arg("cap"), py::arg("warmup_steps"), py::arg("include_current"), py::arg("judge"),
        py::arg("update"));
  m.attr("CUDA_MAX_KERNEL_HISTORY") = kMaxKernelHistory;
}

}  // namespace cuda
}  // namespace gradstab
