// Contract: see plan_common.h (torch-free host helpers shared by the CUDA launchers and the CPU
// execution harness of the kernels).
#include "cuda/plan_common.h"

namespace gradstab {
namespace cuda {

std::vector<std::pair<int64_t, int64_t>> coalesced_dims(const int64_t* sizes,
                                                        const int64_t* strides, int64_t ndim) {
  std::vector<std::pair<int64_t, int64_t>> d;
  for (int64_t i = 0; i < ndim; ++i) {
    const int64_t n = sizes[i], st = strides[i];
    if (n == 1) continue;
    if (!d.empty() && d.back().second == st * n) {
      d.back() = {d.back().first * n, st};
    } else {
      d.emplace_back(n, st);
    }
  }
  return d;
}

bool writeback_params(const void* src, void* dst, int64_t numel, int64_t elem_size,
                      const std::vector<std::pair<int64_t, int64_t>>& dims, const int32_t* flag32,
                      const int64_t* flag64, WritebackParams* out) {
  if (static_cast<int64_t>(dims.size()) > kMaxWritebackDims) return false;
  WritebackParams W{};
  W.src = src;
  W.dst = dst;
  W.numel = numel;
  W.ndim = static_cast<int32_t>(dims.size());
  W.elem_size = static_cast<int32_t>(elem_size);
  for (size_t d = 0; d < dims.size(); ++d) {
    W.sizes[d] = dims[d].first;
    W.strides[d] = dims[d].second;
  }
  W.flag32 = flag32;
  W.flag64 = flag64;
  *out = W;
  return true;
}

}  // namespace cuda
}  // namespace gradstab
