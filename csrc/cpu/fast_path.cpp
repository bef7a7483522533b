// Contract: gradstab._C.cpu_fast_path(op, parameters, norm_type, bound, eps, error_if_nonfinite),
// op: 0 grad_stats, 1 clip_norm, 2 clip_norm_per_layer, 3 clip_value, 4 normalize_per_layer;
// the eager shortcut of gradstab.functional for gradients on the CPU.
//
// `parameters` is a list or tuple of tensors. For each one with a gradient, the gradient is
// taken straight from the C++ tensor (no Python `p.grad` loop) and the CPU kernel of the op
// (ops_cpu.h) runs on all of them with the GIL released, with `bound` as max_norm / clip_value.
// Returns the op's (norms, max_abs, nonfinite, total_norm), or None -- having read and changed
// nothing -- whenever the shortcut does not apply: an item is not exactly a torch.Tensor or
// torch.nn.Parameter, a tensor or gradient has a Python dispatch key (a tensor subclass such
// as DTensor) or a gradient has a non-CPU device, a non-strided layout or a lazy neg/conj bit, a
// TorchDispatchMode or TorchFunctionMode is active, or no parameter has a gradient. The caller
// then takes the dispatcher path (torch.ops.gradstab.*), which gives the same results. Like that
// path, a writing op bumps the version counter of every gradient it was given.
//
// Why: through the dispatcher, a call from Python with a Tensor[] argument costs about 0.3-0.4 us
// per tensor in torch 2.13 (boxing, and a GIL round trip for every refcount change made while
// the GIL is released), plus the Python loop over `p.grad`; for 1,000 small gradients that is
// most of the time of a clip. Here the references are taken and dropped with the GIL held.
#include <torch/extension.h>

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <vector>

#include "cpu/ops_cpu.h"
#include "version_counter.h"

namespace gradstab {
namespace cpu {
namespace {

namespace py = pybind11;

enum Op : int {
  kStats = 0,
  kClipNorm = 1,
  kClipNormPerLayer = 2,
  kClipValue = 3,
  kNormalizePerLayer = 4
};

// torch.nn.Parameter, looked up once (with the GIL held).
PyTypeObject* parameter_type() {
  static PyTypeObject* type = [] {
    py::object cls = py::module_::import("torch.nn").attr("Parameter");
    return reinterpret_cast<PyTypeObject*>(cls.release().ptr());  // kept for the process
  }();
  return type;
}

// The tensor behind a Python object when the shortcut may use it, else nullptr: exactly a
// torch.Tensor or a torch.nn.Parameter (no other subclass, so no __torch_function__ override).
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj) && Py_TYPE(obj) != parameter_type()) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.key_set().has(c10::DispatchKey::Python)) return nullptr;
  return &t;
}

bool plain_cpu_grad(const at::Tensor& g) {
  return g.device().is_cpu() && g.layout() == at::kStrided &&
         !g.key_set().has(c10::DispatchKey::Python) && !g.is_neg() && !g.is_conj();
}

py::object cpu_fast_path(int op, py::handle parameters, double norm_type, double bound,
                         double eps, bool error_if_nonfinite) {
  HANDLE_TH_ERRORS
  PyObject* seq = parameters.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return py::none();
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::impl::torch_function_mode_enabled()) {
    return py::none();  // a mode wants to see the op
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<at::Tensor> grads;
  grads.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* p = plain_tensor(items[i]);
    if (p == nullptr) return py::none();
    const at::Tensor& g = p->grad();
    if (!g.defined()) continue;
    if (!plain_cpu_grad(g)) return py::none();
    grads.push_back(g);  // a reference taken with the GIL held; dropped with it held, below
  }
  if (grads.empty()) return py::none();
  Stats out;
  {
    py::gil_scoped_release no_gil;
    switch (op) {
      case kStats:
        out = grad_stats_cpu(grads, norm_type);
        break;
      case kClipNorm:
        out = clip_norm_cpu(grads, at::scalar_tensor(bound, at::kDouble), norm_type, eps,
                            error_if_nonfinite);
        break;
      case kClipNormPerLayer:
        out = clip_norm_per_layer_cpu(grads, at::scalar_tensor(bound, at::kDouble), norm_type,
                                      eps);
        break;
      case kNormalizePerLayer:
        out = normalize_per_layer_cpu(grads, at::scalar_tensor(bound, at::kDouble), norm_type,
                                      eps);
        break;
      case kClipValue:
        out = clip_value_cpu(grads, at::scalar_tensor(bound, at::kDouble), norm_type);
        break;
      default:
        TORCH_CHECK(false, "gradstab: cpu_fast_path got an unknown op code ", op);
    }
    if (op != kStats) bump_versions(grads);  // as the dispatcher path does (version_counter.cpp)
  }
  return py::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void register_fast_path(pybind11::module& m) {
  m.def("cpu_fast_path", &cpu_fast_path,
        "Eager CPU shortcut of gradstab.functional: run op 0-4 (grad_stats, clip_norm, "
        "clip_norm_per_layer, clip_value, normalize_per_layer) over the gradients of a list "
        "of parameters; None when the shortcut does not apply.",
        py::arg("op"), py::arg("parameters"), py::arg("norm_type"), py::arg("bound"),
        py::arg("eps"), py::arg("error_if_nonfinite"));
}

}  // namespace cpu
}  // namespace gradstab
