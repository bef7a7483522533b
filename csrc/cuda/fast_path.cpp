// Contract: gradstab._C.cuda_fast_path(op, parameters, norm_type, bound, eps, error_if_nonfinite),
// the eager shortcut of gradstab.functional for gradients on one CUDA device, plus test hooks.
//
// The CUDA twin of cpu_fast_path (csrc/cpu/fast_path.cpp), with the same arguments and result:
// `parameters` is a list or tuple of tensors; for each one with a gradient, the gradient is
// taken straight from the C++ tensor and the CUDA kernel of the op (an Op code, common/codes.h;
// norm_ops.h) runs on all of them with the GIL released.
// `bound` (max_norm / clip_value) is a Python number (passed to the kernel by value: no fill
// kernel, no host sync) or a one-element tensor on the CPU or on the gradients' device. Returns
// (norms, max_abs, nonfinite, total_norm), or None -- having read and changed nothing -- when
// the shortcut does not apply (common/fast_path.h: a tensor subclass, including a tensor bound,
// a mode, a gradient that is not a dense CUDA tensor, gradients on several devices, no gradient
// at all). The caller then takes the dispatcher path (torch.ops.gradstab.*), which gives the
// same results. Like that path, a writing op bumps the version counter of every gradient it was
// given, and the call shows in torch.profiler under the op's name.
//
// Why: the dispatcher's boxed call with a Tensor[] argument costs about 0.3-0.4 us per tensor
// (plus the Python loop over p.grad): for 1,000 small gradients that is most of a clip call,
// whose GPU time is a few microseconds.
#include <torch/extension.h>

#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "common/codes.h"
#include "common/fast_path.h"
#include "common/version_counter.h"
#include "cuda/norm_ops.h"

namespace gradstab {
namespace cuda {
namespace {

namespace py = pybind11;

py::object cuda_fast_path(int op, py::handle parameters, double norm_type, py::handle bound,
                          double eps, bool error_if_nonfinite) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_VALUE(op >= 0 && op < kNumOps, "gradstab: cuda_fast_path got an unknown op code ",
                    op);
  std::vector<at::Tensor> grads;
  if (!collect_grads(parameters, at::kCUDA, &grads)) return py::none();
  Bound b;
  at::Tensor bound_tensor;
  if (op != static_cast<int>(Op::kStats)) {
    PyObject* obj = bound.ptr();
    if (THPVariable_Check(obj)) {
      const at::Tensor* t = plain_tensor(obj);
      if (t == nullptr) return py::none();
      bound_tensor = *t;
      b.tensor = &bound_tensor;
    } else if (PyFloat_Check(obj) || (PyLong_Check(obj) && !PyBool_Check(obj))) {
      b.value = py::cast<double>(bound);
    } else {
      return py::none();
    }
  }
  Stats out;
  {
    py::gil_scoped_release no_gil;
    RECORD_FUNCTION(op_profiler_name(static_cast<Op>(op)), std::vector<c10::IValue>());
    out = run_op(static_cast<Op>(op), grads, b, norm_type, eps, error_if_nonfinite);
    if (op != static_cast<int>(Op::kStats)) bump_versions(grads);  // as the dispatcher path does
  }
  return py::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::dict cache_info() {
  const CacheStats s = cache_stats();
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["built_in_capture"] = s.built_in_capture;
  d["entries"] = s.entries;
  d["retained"] = s.retained;
  return d;
}

}  // namespace

void register_fast_path(pybind11::module& m) {
  m.def("cuda_fast_path", &cuda_fast_path,
        "Eager CUDA shortcut of gradstab.functional: run an op of OP_CODES over the gradients "
        "of a list of parameters on one CUDA device; None when the shortcut does not apply.",
        py::arg("op"), py::arg("parameters"), py::arg("norm_type"), py::arg("bound"),
        py::arg("eps"), py::arg("error_if_nonfinite"));
  m.def("_cuda_set_max_blocks", &set_max_blocks,
        "Test hook: cap the CUDA kernels' grid at this many blocks (0: no cap). Results must "
        "not depend on it.",
        py::arg("blocks"));
  m.def("_cuda_cache_info", &cache_info,
        "Counters of the CUDA descriptor-table cache: hits, misses, built_in_capture, entries, "
        "retained.");
  m.def("_cuda_clear_cache", &clear_cache,
        "Drop every cached CUDA descriptor table not used by a CUDA graph capture.");
}

}  // namespace cuda
}  // namespace gradstab
