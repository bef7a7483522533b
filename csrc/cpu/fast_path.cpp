// Contract: gradstab._C.cpu_fast_path(op, parameters, norm_type, bound, eps, error_if_nonfinite),
// op: an Op code (common/codes.h; Python reads them from gradstab._C.OP_CODES);
// the eager shortcut of gradstab.functional for gradients on the CPU.
//
// `parameters` is a list or tuple of tensors. For each one with a gradient, the gradient is
// taken straight from the C++ tensor (no Python `p.grad` loop) and the CPU kernel of the op
// (norm_ops.h) runs on all of them with the GIL released, with `bound` as max_norm / clip_value.
// Returns the op's (norms, max_abs, nonfinite, total_norm), or None -- having read and changed
// nothing -- whenever the shortcut does not apply (common/fast_path.h: a tensor subclass, a
// mode, a gradient that is not a dense CPU tensor, no gradient at all). The caller then takes
// the dispatcher path (torch.ops.gradstab.*), which gives the same results. Like that path, a
// writing op bumps the version counter of every gradient it was given, and the call shows in
// torch.profiler under the op's name.
//
// Why: through the dispatcher, a call from Python with a Tensor[] argument costs about 0.3-0.4 us
// per tensor in torch 2.13 (boxing, and a GIL round trip for every refcount change made while
// the GIL is released), plus the Python loop over `p.grad`; for 1,000 small gradients that is
// most of the time of a clip. Here the references are taken and dropped with the GIL held.
#include <torch/extension.h>

#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>

#include <vector>

#include "common/codes.h"
#include "common/fast_path.h"
#include "common/version_counter.h"
#include "cpu/norm_ops.h"

namespace gradstab {
namespace cpu {
namespace {

namespace py = pybind11;

py::object cpu_fast_path(int op, py::handle parameters, double norm_type, double bound,
                         double eps, bool error_if_nonfinite) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_VALUE(op >= 0 && op < kNumOps, "gradstab: cpu_fast_path got an unknown op code ",
                    op);
  std::vector<at::Tensor> grads;
  if (!collect_grads(parameters, at::kCPU, &grads)) return py::none();
  const Op code = static_cast<Op>(op);
  Stats out;
  {
    py::gil_scoped_release no_gil;
    RECORD_FUNCTION(op_profiler_name(code), std::vector<c10::IValue>());
    const at::Tensor b = at::scalar_tensor(bound, at::kDouble);
    switch (code) {
      case Op::kStats:
        out = grad_stats_cpu(grads, norm_type);
        break;
      case Op::kClipNorm:
        out = clip_norm_cpu(grads, b, norm_type, eps, error_if_nonfinite);
        break;
      case Op::kClipNormPerLayer:
        out = clip_norm_per_layer_cpu(grads, b, norm_type, eps);
        break;
      case Op::kNormalizePerLayer:
        out = normalize_per_layer_cpu(grads, b, norm_type, eps);
        break;
      case Op::kClipValue:
        out = clip_value_cpu(grads, b, norm_type);
        break;
    }
    if (code != Op::kStats) bump_versions(grads);  // as the dispatcher path does
  }
  return py::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void register_fast_path(pybind11::module& m) {
  m.def("cpu_fast_path", &cpu_fast_path,
        "Eager CPU shortcut of gradstab.functional: run an op of OP_CODES (grad_stats, "
        "clip_norm, clip_norm_per_layer, clip_value, normalize_per_layer) over the gradients of "
        "a list of parameters; None when the shortcut does not apply.",
        py::arg("op"), py::arg("parameters"), py::arg("norm_type"), py::arg("bound"),
        py::arg("eps"), py::arg("error_if_nonfinite"));
}

}  // namespace cpu
}  // namespace gradstab
