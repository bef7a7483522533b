// Contract: how a float32 gradient is multiplied by its float64 clip coefficient, written once
// for the CPU kernel (cpu/range_kernels.cpp) and the CUDA kernel (cuda/device_common.cuh):
// in float32 by float(coef), PyTorch's arithmetic for mul_, wherever |coef| lies in float32's
// normal range [FLT_MIN, FLT_MAX] (float(coef) then keeps 24 bits of it); otherwise (0, inf
// and NaN included) in double, rounded once, so no bits of the coefficient are lost.
// float16/bfloat16 always multiply in float32, float64 in double.
#pragma once

#include <cfloat>
#include <cmath>

#if !defined(GRADSTAB_HD)
#if defined(__CUDACC__)
#define GRADSTAB_HD __host__ __device__
#else
#define GRADSTAB_HD
#endif
#endif

namespace gradstab {

// Whether float32 gradients are multiplied in float32 by float(coef) (else in double).
GRADSTAB_HD inline bool scales_in_float(double coef) {
  const double a = fabs(coef);
  return a >= static_cast<double>(FLT_MIN) && a <= static_cast<double>(FLT_MAX);
}

}  // namespace gradstab
