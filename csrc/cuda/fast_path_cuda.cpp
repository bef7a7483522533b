// Contract: gradstab._C.cuda_fast_path(op, parameters, norm_type, bound, eps, error_if_nonfinite),
// the eager shortcut of gradstab.functional for gradients on one CUDA device, plus test hooks.
//
// The CUDA twin of cpu_fast_path (csrc/cpu/fast_path.cpp), with the same arguments and result:
// `parameters` is a list or tuple of tensors; for each one with a gradient, the gradient is
// taken straight from the C++ tensor and the CUDA kernel of op 0-4 (grad_stats, clip_norm,
// clip_norm_per_layer, clip_value, normalize_per_layer; ops_cuda.h) runs on all of them with the
// GIL released.
// `bound` (max_norm / clip_value) is a Python number (passed to the kernel by value: no fill
// kernel, no host sync) or a one-element tensor on the CPU or on the gradients' device. Returns
// (norms, max_abs, nonfinite, total_norm), or None -- having read and changed nothing -- when
// the shortcut does not apply: an item (or a tensor bound) is not exactly a torch.Tensor or
// nn.Parameter (a subclass), a gradient has a Python dispatch key or is not a dense CUDA tensor,
// the gradients are on several devices, a TorchDispatchMode or TorchFunctionMode is active, or
// no parameter has a gradient. The caller then takes the dispatcher path
// (torch.ops.gradstab.*), which gives the same results. Like that path, a writing op bumps the
// version counter of every gradient it was given.
//
// Why: the dispatcher's boxed call with a Tensor[] argument costs about 0.3-0.4 us per tensor
// (plus the Python loop over p.grad): for 1,000 small gradients that is most of a clip call,
// whose GPU time is a few microseconds.
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "cuda/ops_cuda.h"
#include "version_counter.h"

namespace gradstab {
namespace cuda {
namespace {

namespace py = pybind11;

// Exactly a torch.Tensor or an nn.Parameter (a subclass may override __torch_function__: the
// dispatcher path serves it). Only symbols libtorch_python exports are used here.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.key_set().has(c10::DispatchKey::Python)) return nullptr;
  return &t;
}

bool plain_cuda_grad(const at::Tensor& g) {
  return g.device().is_cuda() && g.layout() == at::kStrided &&
         !g.key_set().has(c10::DispatchKey::Python) && !g.is_neg() && !g.is_conj();
}

py::object cuda_fast_path(int op, py::handle parameters, double norm_type, py::handle bound,
                          double eps, bool error_if_nonfinite) {
  HANDLE_TH_ERRORS
  PyObject* seq = parameters.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return py::none();
  TORCH_CHECK_VALUE(op >= 0 && op <= 4, "gradstab: cuda_fast_path got an unknown op code ", op);
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
    if (!plain_cuda_grad(g)) return py::none();
    if (!grads.empty() && g.device() != grads[0].device()) return py::none();
    grads.push_back(g);  // a reference taken with the GIL held; dropped with it held, below
  }
  if (grads.empty()) return py::none();
  Bound b;
  at::Tensor bound_tensor;
  if (op != static_cast<int>(Op::kStats)) {
    PyObject* obj = bound.ptr();
    if (THPVariable_Check(obj)) {
      const at::Tensor* t = plain_tensor(obj);
      if (t == nullptr || t->key_set().has(c10::DispatchKey::Python)) return py::none();
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
        "Eager CUDA shortcut of gradstab.functional: run op 0-4 (grad_stats, clip_norm, "
        "clip_norm_per_layer, clip_value, normalize_per_layer) over the gradients of a list of "
        "parameters on one CUDA device; None when the shortcut does not apply.",
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
