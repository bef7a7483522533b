// Contract: what the two eager shortcuts (cpu/fast_path.cpp, cuda/fast_path.cpp) share, written
// once: when a Python call may skip the dispatcher, and the gradients it then runs on. Called
// with the GIL held. Every "no" leaves the caller to return None, having read and changed nothing,
// so that gradstab.functional takes the dispatcher path (torch.ops.gradstab.*), which gives the
// same results.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace gradstab {

// The tensor behind a Python object when a shortcut may use it, else nullptr: exactly a
// torch.Tensor or a torch.nn.Parameter (no other subclass, so no __torch_function__ override)
// without a Python dispatch key (DTensor and other tensor subclasses).
const at::Tensor* plain_tensor(PyObject* obj);

// True while a TorchDispatchMode or TorchFunctionMode is active: the mode wants to see the op.
bool modes_active();

// The gradients of the items of `parameters` (a Python list or tuple) that have one, into
// `grads`, when all of them are plain (plain_tensor), dense, strided, without a lazy neg/conj
// bit, of device type `device_type` and on one device. False (and `grads` unspecified) when the
// shortcut does not apply: not a list or tuple, a mode active, an item or gradient not plain, a
// gradient elsewhere, or no gradient at all. The references are taken with the GIL held; the
// caller drops them with it held too.
bool collect_grads(pybind11::handle parameters, at::DeviceType device_type,
                   std::vector<at::Tensor>* grads);

}  // namespace gradstab
