// Contract: the codes every layer shares, written once: the element dtypes and norm kinds the CPU
// and CUDA kernels dispatch on, and the op codes of the eager shortcuts (cpu/fast_path.cpp,
// cuda/fast_path.cpp), which Python reads from gradstab._C.OP_CODES. Plain C++17, no torch and no
// CUDA headers: the CUDA kernel files and the CPU execution harness (csrc/testing/cuda_sim)
// include it too. The numeric values are part of the device tables' layout: do not renumber.
#pragma once

#include <cmath>
#include <cstdint>

namespace gradstab {

enum DType : int32_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum NormKind : int32_t { kL2 = 0, kL1 = 1, kLinf = 2, kLp = 3 };

// The ops an eager shortcut serves (their names are the schemas' in gradstab/_library.py).
enum class Op : int32_t {
  kStats = 0,
  kClipNorm = 1,
  kClipNormPerLayer = 2,
  kClipValue = 3,
  kNormalizePerLayer = 4,
};
constexpr int32_t kNumOps = 5;

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kStats: return "grad_stats";
    case Op::kClipNorm: return "clip_norm";
    case Op::kClipNormPerLayer: return "clip_norm_per_layer";
    case Op::kClipValue: return "clip_value";
    case Op::kNormalizePerLayer: return "normalize_per_layer";
  }
  return "?";
}

// The op's name as the dispatcher records it in torch.profiler ("gradstab::grad_stats"); the
// eager shortcuts record the same name.
inline const char* op_profiler_name(Op op) {
  switch (op) {
    case Op::kStats: return "gradstab::grad_stats";
    case Op::kClipNorm: return "gradstab::clip_norm";
    case Op::kClipNormPerLayer: return "gradstab::clip_norm_per_layer";
    case Op::kClipValue: return "gradstab::clip_value";
    case Op::kNormalizePerLayer: return "gradstab::normalize_per_layer";
  }
  return "gradstab::?";
}

// The kernels' code of a norm type p > 0.
inline NormKind norm_kind(double p) {
  if (std::isinf(p)) return kLinf;
  if (p == 2.0) return kL2;
  if (p == 1.0) return kL1;
  return kLp;
}

}  // namespace gradstab
