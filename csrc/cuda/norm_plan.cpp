// Contract: see norm_plan.h (the torch-free plan of one call of the norm ops' CUDA kernels).
#include "cuda/norm_plan.h"

#include <algorithm>
#include <cstring>
#include <numeric>

namespace gradstab {
namespace cuda {

int32_t align_offset(uint64_t ptr, int32_t dtype) {
  const uint64_t size = static_cast<uint64_t>(dtype_size(dtype));
  if (ptr % size != 0) return -1;
  return static_cast<int32_t>(((16 - ptr % 16) % 16) / size);
}

HostTable build_norm_table(const std::vector<KeyItem>& key) {
  const int64_t T = static_cast<int64_t>(key.size());
  std::vector<int64_t> units(T);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t per = unit_elems(key[i].dtype);
    units[i] = (key[i].numel + per - 1) / per;
  }
  // Work order: most units first (so the tensors that finish last are small and quick to
  // combine), ties in input order; zero-size tensors last.
  std::vector<int32_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return units[a] > units[b]; });
  HostTable host;
  host.meta.assign(kPerTensor + 2 * T, 0);
  std::vector<TensorDesc> desc(T);
  int64_t first = 0, num_work = 0;
  for (int64_t w = 0; w < T; ++w) {
    const int32_t i = order[w];
    const KeyItem& k = key[i];
    TensorDesc& d = desc[w];
    d.ptr = k.ptr;
    d.numel = k.numel;
    d.first_unit = first;
    d.num_units = units[i];
    d.dtype = k.dtype;
    d.orig = i;
    d.align_offset = align_offset(k.ptr, k.dtype);
    d.pad = 0;
    host.meta[kPerTensor + i] = first;
    host.meta[kPerTensor + T + i] = units[i];
    first += units[i];
    if (units[i] > 0) ++num_work;
  }
  std::vector<ByteSpan> spans;
  spans.reserve(T);
  for (const KeyItem& k : key) {
    spans.push_back(dense_byte_span(k.ptr, k.numel, dtype_size(k.dtype)));
  }
  host.meta[kTotalUnits] = first;
  host.meta[kNumWork] = num_work;
  host.meta[kKeyOverlap] = spans_overlap(std::move(spans), {}) ? 1 : 0;
  host.bytes.resize(T * sizeof(TensorDesc));
  if (T > 0) std::memcpy(host.bytes.data(), desc.data(), T * sizeof(TensorDesc));
  return host;
}

int32_t norm_mode(Op op, int32_t kind, bool any_double, bool shared) {
  switch (op) {
    case Op::kStats: return kStats;
    case Op::kClipNorm: return kClipNorm;
    case Op::kClipNormPerLayer: return kClipPerLayer;
    case Op::kNormalizePerLayer: return kNormalize;
    case Op::kClipValue: break;
  }
  // float64 norms and p-norms may be recomputed from the data, and a gradient sharing memory
  // with another may be read by other warps: clamp after the statistics.
  return (any_double || kind == kLp || shared) ? kClipValueDeferred : kClipValue;
}

NormScratch norm_scratch(int64_t num_tensors, int64_t total_units) {
  NormScratch s;
  s.zeroed = (num_tensors + 1) * static_cast<int64_t>(sizeof(int32_t));  // tensor_done, all_done
  s.global = align16(s.zeroed);
  s.tensors = s.global + static_cast<int64_t>(sizeof(GlobalRecord));
  s.units = align16(s.tensors + num_tensors * static_cast<int64_t>(sizeof(TensorRecord)));
  s.bytes = s.units + total_units * static_cast<int64_t>(sizeof(UnitRecord));
  return s;
}

Params norm_params(const void* table, const std::vector<int64_t>& meta, int64_t num_tensors,
                   char* scratch, const NormScratch& layout, int32_t kind, int32_t mode, double p,
                   double eps, const double* bound_ptr, double bound_value,
                   const NormOutputs& out) {
  Params P{};
  P.table = static_cast<const TensorDesc*>(table);
  P.num_tensors = static_cast<int32_t>(num_tensors);
  P.num_work = static_cast<int32_t>(meta[kNumWork]);
  P.total_units = meta[kTotalUnits];
  P.scale_begin = 0;
  P.scale_end = meta[kTotalUnits];
  P.kind = kind;
  P.mode = mode;
  P.p = p;
  P.eps = eps;
  P.bound_ptr = bound_ptr;
  P.bound_value = bound_value;
  P.units = reinterpret_cast<UnitRecord*>(scratch + layout.units);
  P.tensors = reinterpret_cast<TensorRecord*>(scratch + layout.tensors);
  P.global = reinterpret_cast<GlobalRecord*>(scratch + layout.global);
  P.tensor_done = reinterpret_cast<int32_t*>(scratch);
  P.all_done = reinterpret_cast<int32_t*>(scratch) + num_tensors;
  P.out_norms = out.norms;
  P.out_max_abs = out.max_abs;
  P.out_nonfinite = out.nonfinite;
  P.out_total = out.total;
  P.out_double = out.out_double ? 1 : 0;
  return P;
}

void norm_reduce(const Params& P, const NormScratch& layout, NormDevice& dev) {
  dev.zero(P.tensor_done, layout.zeroed);
  dev.reduce(P, P.total_units);
}

void norm_write(const Params& P, const std::vector<int64_t>& meta, bool shared,
                const std::vector<char>& has_copy, NormDevice& dev) {
  if (P.mode == kStats) return;
  const int64_t T = P.num_tensors;
  const bool writes = P.mode == kClipNorm || P.mode == kClipPerLayer || P.mode == kNormalize ||
                      P.mode == kClipValueDeferred;
  // A copy is written back only if the call changed its gradient (a device flag).
  auto write_back = [&](int64_t i) {
    if (P.mode == kClipNorm) {
      dev.write_back(i, &P.global->scale, nullptr);
    } else {
      dev.write_back(i, nullptr, &P.tensors[i].write);
    }
  };
  if (!shared) {
    if (writes) dev.scale(P, P.total_units);
    for (int64_t i = 0; i < T; ++i) {
      if (has_copy[i]) write_back(i);
    }
    return;
  }
  // One gradient at a time, in list order, each with its coefficient from the statistics on
  // entry (a gradient passed twice is scaled twice, as by PyTorch's loops); a strided gradient
  // is re-read into its copy just before (an earlier gradient may have changed its memory).
  for (int64_t i = 0; i < T; ++i) {
    const int64_t units = meta[kPerTensor + T + i];
    if (units == 0) continue;
    if (has_copy[i]) dev.refresh_copy(i);
    Params Q = P;
    Q.scale_begin = meta[kPerTensor + i];
    Q.scale_end = Q.scale_begin + units;
    dev.scale(Q, units);
    if (has_copy[i]) write_back(i);
  }
}

}  // namespace cuda
}  // namespace gradstab
