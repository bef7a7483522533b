// Contract: per-range gradient kernels for the CPU backend (no ATen, only c10 dtype headers;
// dtype and norm codes from common/codes.h).
//
// reduce_range(dtype, ptr, n, kind, p, clamp): one read of n contiguous elements, returning
//   sum   = sum of |x|^p (p = 2 for kind kL2 and kLinf, where it only detects non-finite
//           values; p = 1 for kL1; norm_p for kLp), accumulated so that its relative error is
//           ~1e-8 on random data (below the float32 rounding of the result), a few 1e-7 at worst
//           (e.g. constant-valued blocks; the contract allows 1e-6), and it can neither overflow nor
//           underflow for float16/bfloat16/float32 input: 16-lane float32 partial sums over
//           blocks of <= 512 elements, each block's lanes added lane by lane in double, and the
//           range recomputed in double if a float32 lane sum was non-finite or the sum is tiny
//           for its length (when clamping: the block, before it is clamped).
//           float64 input accumulates in double (overflow is rescued per tensor by the caller).
//   max_abs = max |x| (NaN if the range holds a NaN), nonfinite = count of NaN/Inf elements;
//   if clamp >= 0, every block whose max |x| exceeds clamp is clamped to [-clamp, clamp] in
//   the same pass (the bound rounded to the element dtype, NaN kept), and wrote = true; the
//   statistics are those of the values before the clamp (a caller that needs rescaled_sum must
//   not clamp in this pass: the rescue re-reads the range).
// rescaled_sum(...): sum of (|x| / scale)^p in double, the slow overflow/underflow rescue.
// scale_range(dtype, ptr, n, coef): x *= coef in place, as PyTorch's mul_ by a coefficient of the
//   gradient's dtype computes it: float16/bfloat16/float32 multiply in float32 by float(coef)
//   (rounded to nearest even to the dtype), float64 in double. One exception keeps every bit of
//   the coefficient: where |coef| lies outside float32's normal range [FLT_MIN, FLT_MAX] (or is
//   NaN), float32 multiplies in double and rounds once.
//
// Results are bit-identical run to run and across the ISA clones (fixed lane and block order,
// no FMA contraction: build with -ffp-contract=off).
#pragma once

#include <cstdint>

#include "common/codes.h"

namespace gradstab {
namespace cpu {

struct Partial {
  double sum = 0.0;
  double max_abs = 0.0;
  int64_t nonfinite = 0;
  bool wrote = false;
};

Partial reduce_range(DType dtype, void* ptr, int64_t n, NormKind kind, double norm_p,
                     double clamp);
double rescaled_sum(DType dtype, const void* ptr, int64_t n, double norm_p, double scale);
void scale_range(DType dtype, void* ptr, int64_t n, double coef);

// Name of the instruction-set level isa_level() picked for this machine ("x86-64-v4", ...).
const char* selected_isa();

}  // namespace cpu
}  // namespace gradstab
