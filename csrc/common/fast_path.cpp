// Contract: see fast_path.h. Only symbols that libtorch_python exports are used here.
#include "common/fast_path.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

namespace gradstab {
namespace {

bool plain_grad(const at::Tensor& g, at::DeviceType device_type) {
  return g.device().type() == device_type && g.layout() == at::kStrided &&
         !g.key_set().has(c10::DispatchKey::Python) && !g.is_neg() && !g.is_conj();
}

}  // namespace

const at::Tensor* plain_tensor(PyObject* obj) {
  // CheckExact: exactly torch.Tensor or torch.nn.Parameter (torch treats the two alike), no
  // other subclass.
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.key_set().has(c10::DispatchKey::Python)) return nullptr;
  return &t;
}

bool modes_active() {
  return c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
         at::impl::torch_function_mode_enabled();
}

bool collect_grads(pybind11::handle parameters, at::DeviceType device_type,
                   std::vector<at::Tensor>* grads) {
  PyObject* seq = parameters.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  if (modes_active()) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  grads->clear();
  grads->reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* p = plain_tensor(items[i]);
    if (p == nullptr) return false;
    const at::Tensor& g = p->grad();
    if (!g.defined()) continue;
    if (!plain_grad(g, device_type)) return false;
    if (!grads->empty() && g.device() != grads->front().device()) return false;
    grads->push_back(g);
  }
  return !grads->empty();
}

}  // namespace gradstab
