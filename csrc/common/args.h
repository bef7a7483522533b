// Contract: the argument checks every kernel makes, written once so that the CPU kernels
// (cpu/norm_ops.cpp, cpu/agc.cpp) and the CUDA launchers (cuda/norm_ops.cpp, cuda/agc.cpp) refuse
// the same inputs with the same words, in the same order, before any gradient is touched; and
// the ATen-side helpers they share: a ScalarType's dtype code, a tensor's byte span. Host code,
// ATen only (the torch-free codes and spans are in codes.h and overlap.h).
#pragma once

#include <ATen/ATen.h>

#include "common/codes.h"
#include "common/overlap.h"

namespace gradstab {

// The kernels' code of a float16/bfloat16/float32/float64 dtype (anything else maps to kDouble:
// check_grads refuses it first).
DType to_dtype(at::ScalarType t);

// A norm type p > 0 or inf (the kernels' range; the Python layer serves p <= 0 itself).
void check_norm_type(double p);

// Every check of a list of gradients: defined, strided, on one device of type `device_type`,
// float16/bfloat16/float32/float64. `kernel` ("CPU", "CUDA") names the kernel in the message of
// the last check. `what` names the items ("gradient", "parameter").
void check_grads(at::TensorList grads, at::DeviceType device_type, const char* kernel,
                 const char* what = "gradient");

// Every check of adaptive_clip's arguments (the gradients and their parameters, pairwise).
void check_adaptive_clip_args(at::TensorList grads, at::TensorList params, double clip_factor,
                              double eps, double norm_type, at::DeviceType device_type,
                              const char* kernel);

// The bytes a tensor's elements address (strides >= 0: data_ptr() is the lowest).
ByteSpan byte_span(const at::Tensor& t);

}  // namespace gradstab
