// Contract: CPU kernels for the gradstab ops (schemas in gradstab/_library.py).
//
// All gradients of a call are cut into chunks of at most kChunk elements; one parallel pass
// reduces every chunk (the chunk table split into one contiguous range per thread with about
// equal element counts; each chunk's partial is its own, so they do not depend on the split),
// the partials are combined per tensor in chunk order (fixed, deterministic), the coefficients
// are computed, and a second parallel pass, in reverse chunk order so the most recently read
// chunks are still in cache, scales only the chunks whose coefficient is not 1. In per-layer
// mode a tensor that fits in one chunk is scaled right after it is reduced, while it is in cache.
// clip_with_norm reduces nothing: its coefficient comes from the total norm it is given, and at
// 1 it reads and writes nothing. Value clipping clamps in the reducing pass itself.
// Every argument is checked before any gradient is touched.
//
// Gradients that share memory (the same tensor twice, overlapping views) would race in the
// parallel write passes, so the clip ops then write them one at a time, in list order (as
// PyTorch's loops do: a gradient passed twice is scaled twice). A gradient whose own elements
// share memory (an expanded view) cannot be written in place: it is read as usual, and a clip
// that would have to change it raises before any gradient is written.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "common/args.h"
#include "common/messages.h"
#include "common/overlap.h"
#include "cpu/norm_ops.h"
#include "cpu/range_kernels.h"

namespace gradstab {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;            // elements per parallel work item
constexpr int64_t kSerialBelow = 1 << 15;      // total elements under which one thread is faster
constexpr double kTinySum = 1e-280;            // sums this small may have lost terms to underflow

struct Item {
  char* base;          // first element of the grad, or of its contiguous copy
  at::Tensor copy;     // the contiguous copy of a strided grad (undefined otherwise)
  const at::Tensor* grad;
  int64_t element_size;
  DType dtype;
  int64_t numel;
  bool copied;         // data is a copy: write it back if changed
  bool self_overlap;   // some elements share memory (an expanded view): not writable in place
  int64_t first_chunk; // chunks [first_chunk, first_chunk + num_chunks)
  int64_t num_chunks;
};

struct Chunk {
  int64_t item;
  int64_t begin;
  int64_t len;
};

struct TensorResult {
  double sum;       // sum of |x|^p (overflow-rescued); unused for p = inf
  double norm;
  double max_abs;
  int64_t nonfinite;
};

// Validates every gradient (before anything is written) and builds the item and chunk tables.
struct Plan {
  std::vector<Item> items;
  std::vector<Chunk> chunks;
  int64_t total_numel = 0;
  bool any_double = false;
  at::Device device = at::kCPU;

  explicit Plan(at::TensorList grads) {
    items.reserve(grads.size());
    check_grads(grads, at::kCPU, "CPU");
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor& g = grads[i];
      Item it;
      it.grad = &grads[i];
      it.dtype = to_dtype(g.scalar_type());
      it.numel = g.numel();
      // A dense, non-overlapping tensor (contiguous, channels_last, permuted) is one flat span
      // starting at data_ptr(); anything else is processed on a contiguous copy.
      it.copied = it.numel > 0 && !g.is_non_overlapping_and_dense();
      it.self_overlap = it.copied && at::has_internal_overlap(g) == at::MemOverlap::Yes;
      if (it.copied) it.copy = g.contiguous();
      it.base = static_cast<char*>(it.copied ? it.copy.data_ptr() : g.data_ptr());
      it.element_size = static_cast<int64_t>(g.element_size());
      it.first_chunk = static_cast<int64_t>(chunks.size());
      it.num_chunks = (it.numel + kChunk - 1) / kChunk;
      for (int64_t c = 0; c < it.num_chunks; ++c) {
        int64_t b = c * kChunk;
        chunks.push_back({static_cast<int64_t>(i), b, std::min(kChunk, it.numel - b)});
      }
      total_numel += it.numel;
      any_double = any_double || g.scalar_type() == at::kDouble;
      items.push_back(std::move(it));
    }
  }

  // Whether a gradient overlaps itself or another one: then the gradients must be written one
  // at a time, in list order (write_serially), not by the parallel passes (common/overlap.h).
  bool shares_memory(at::TensorList grads) const {
    std::vector<ByteSpan> spans;
    spans.reserve(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      if (it.numel == 0) continue;
      if (it.self_overlap) return true;
      spans.push_back(it.copied ? byte_span(grads[i])
                                : dense_byte_span(reinterpret_cast<uint64_t>(it.base), it.numel,
                                                  it.element_size));
    }
    return spans_overlap(std::move(spans), {});
  }

  char* chunk_ptr(const Chunk& c) const {
    const Item& it = items[c.item];
    return it.base + c.begin * it.element_size;
  }

  // Runs body(chunk_index) for every chunk, in parallel when the work is large enough.
  template <typename F>
  void for_each_chunk(bool reverse, const F& body) const {
    const int64_t n = static_cast<int64_t>(chunks.size());
    auto run = [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) body(reverse ? b + e - 1 - k : k);
    };
    const int64_t nt =
        total_numel < kSerialBelow ? 1 : std::min<int64_t>(at::get_num_threads(), n);
    parallel_balanced(n, nt, [&](int64_t k) { return chunks[k].len; }, run);
  }
};

// Combines the partials of one tensor (in chunk order) and rescues an overflowed or underflowed
// sum of p-powers by recomputing it scaled by the tensor's max |x|.
TensorResult finish_tensor(const Item& it, const Partial* parts, NormKind kind,
                           double p) {
  TensorResult r{0.0, 0.0, 0.0, 0};
  bool nan = false;
  for (int64_t c = 0; c < it.num_chunks; ++c) {
    const Partial& q = parts[c];
    r.sum += q.sum;
    r.nonfinite += q.nonfinite;
    nan = nan || std::isnan(q.max_abs);
    r.max_abs = q.max_abs > r.max_abs ? q.max_abs : r.max_abs;
  }
  if (nan) r.max_abs = std::numeric_limits<double>::quiet_NaN();
  if (kind == NormKind::kLinf) {
    r.norm = r.max_abs;
    return r;
  }
  const bool overflowed = std::isinf(r.sum) && r.nonfinite == 0;
  const bool underflowed = r.sum < kTinySum && r.max_abs > 0.0;
  double scale = 1.0;
  if ((overflowed || underflowed) && std::isfinite(r.max_abs)) {
    scale = r.max_abs;
    r.sum = rescaled_sum(it.dtype, it.base, it.numel, p, scale);
  }
  if (kind == NormKind::kL2) {
    r.norm = scale * std::sqrt(r.sum);
  } else if (kind == NormKind::kL1) {
    r.norm = scale * r.sum;
  } else {
    r.norm = scale * std::pow(r.sum, 1.0 / p);
  }
  if (scale != 1.0) r.sum = std::numeric_limits<double>::infinity();  // only the norm is valid
  return r;
}

// p-norm of the per-tensor norms, as the p-root of the summed p-powers (never a sum of norms).
double total_norm(const std::vector<TensorResult>& res, NormKind kind, double p) {
  double m = 0.0;
  bool nan = false;
  for (const auto& r : res) {
    nan = nan || std::isnan(r.norm);
    m = r.norm > m ? r.norm : m;
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (kind == NormKind::kLinf || std::isinf(m)) return m;
  double s = 0.0;
  for (const auto& r : res) s += r.sum;
  const bool exact = std::isfinite(s) && !(s < kTinySum && m > 0.0);
  if (!exact) {  // a tensor was rescued, or the sum itself over/underflows: work from the norms
    s = 0.0;
    for (const auto& r : res) {
      double a = r.norm / m;
      s += kind == NormKind::kL2 ? a * a : (kind == NormKind::kL1 ? a : std::pow(a, p));
    }
  }
  double scale = exact ? 1.0 : m;
  if (kind == NormKind::kL2) return scale * std::sqrt(s);
  if (kind == NormKind::kL1) return scale * s;
  return scale * std::pow(s, 1.0 / p);
}

// Reduces every chunk (clamping to `clamp` in the same pass when clamp >= 0).
std::vector<Partial> reduce_all(const Plan& plan, NormKind kind, double p, double clamp) {
  std::vector<Partial> parts(plan.chunks.size());
  plan.for_each_chunk(false, [&](int64_t k) {
    const Chunk& c = plan.chunks[k];
    parts[k] = reduce_range(plan.items[c.item].dtype, plan.chunk_ptr(c), c.len, kind, p, clamp);
  });
  return parts;
}

std::vector<TensorResult> finish_all(const Plan& plan, const std::vector<Partial>& parts,
                                     NormKind kind, double p) {
  std::vector<TensorResult> res;
  res.reserve(plan.items.size());
  for (const Item& it : plan.items) {
    res.push_back(finish_tensor(it, parts.data() + it.first_chunk, kind, p));
  }
  return res;
}

Stats make_stats(const Plan& plan, const std::vector<TensorResult>& res, double total) {
  const int64_t n = static_cast<int64_t>(res.size());
  auto dd = at::TensorOptions().dtype(at::kDouble);
  at::Tensor norms = at::empty({n}, dd), maxabs = at::empty({n}, dd);
  at::Tensor nonfinite = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  double* pn = norms.data_ptr<double>();
  double* pm = maxabs.data_ptr<double>();
  int64_t* pf = nonfinite.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    pn[i] = res[i].norm;
    pm[i] = res[i].max_abs;
    pf[i] = res[i].nonfinite;
  }
  const auto rd = plan.any_double ? at::kDouble : at::kFloat;
  // Through a double tensor: a total beyond the float32 range rounds to inf (scalar_tensor
  // would throw instead).
  return {norms.to(rd), maxabs.to(rd), nonfinite, at::scalar_tensor(total, at::kDouble).to(rd)};
}

// min(1, bound / (norm + eps)), NaN kept (as torch.clamp(max=1) keeps it).
double clip_coef(double bound, double norm, double eps) {
  double c = bound / (norm + eps);
  return c < 1.0 || std::isnan(c) ? c : 1.0;
}

// Per-layer coefficient: clipping (at most 1) or normalization (bound / (norm + eps), any size).
double layer_coef(double bound, double norm, double eps, bool normalize) {
  return normalize ? bound / (norm + eps) : clip_coef(bound, norm, eps);
}

// A tensor is written unless its coefficient is exactly 1 (a NaN coefficient is written).
inline bool writes(double coef) { return !(coef == 1.0); }

// Scales, in reverse chunk order, every chunk whose tensor coefficient is not 1; writes back
// copies of strided tensors that changed.
void scale_chunks(const Plan& plan, const std::vector<double>& coef,
                  const std::vector<uint8_t>& skip_item) {
  plan.for_each_chunk(true, [&](int64_t k) {
    const Chunk& c = plan.chunks[k];
    if (skip_item[c.item] || !writes(coef[c.item])) return;
    scale_range(plan.items[c.item].dtype, plan.chunk_ptr(c), c.len, coef[c.item]);
  });
  for (size_t i = 0; i < plan.items.size(); ++i) {
    const Item& it = plan.items[i];
    if (it.copied && writes(coef[i])) it.grad->copy_(it.copy);
  }
}

// Refuses, before anything is written, to change a gradient whose elements share memory.
void check_writable(const Plan& plan, const std::vector<uint8_t>& todo, const char* what) {
  for (size_t i = 0; i < plan.items.size(); ++i) {
    if (!todo[i] || !plan.items[i].self_overlap) continue;
    TORCH_CHECK_VALUE(false, "gradstab: gradient ", i, " of ", plan.items.size(), " (shape ",
                      plan.items[i].grad->sizes(), ") must be ", what,
                      ", but several of its elements share one memory location (an expanded "
                      "view?), so it cannot be written in place. Give it its own memory first, "
                      "e.g. `p.grad = p.grad.clone()`. No gradient was changed.");
  }
}

// The write pass for gradients that share memory (Plan::shares_memory): op(item, data) on each
// gradient with todo set, one at a time, in list order. A strided gradient is re-read just
// before (an earlier gradient may have changed its memory) and written back if op wrote.
template <typename F>
void write_serially(const Plan& plan, const std::vector<uint8_t>& todo, const F& op) {
  for (size_t i = 0; i < plan.items.size(); ++i) {
    const Item& it = plan.items[i];
    if (!todo[i] || it.numel == 0) continue;
    if (!it.copied) {
      op(it, it.base);
      continue;
    }
    at::Tensor fresh = it.grad->contiguous();
    if (op(it, static_cast<char*>(fresh.data_ptr()))) it.grad->copy_(fresh);
  }
}

double read_bound(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1, "gradstab: ", name, " must be a tensor with one element, "
                    "got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "gradstab: ", name, " is on ", t.device(),
                    " but the gradients are on cpu");
  double v = t.item<double>();
  TORCH_CHECK_VALUE(v >= 0.0, "gradstab: ", name, " must be a non-negative number, got ", v);
  return v;
}

std::string nonfinite_message(double p, double total, at::TensorList grads,
                              const std::vector<TensorResult>& res) {
  std::vector<int64_t> counts;
  counts.reserve(res.size());
  for (const auto& r : res) counts.push_back(r.nonfinite);
  return gradstab::nonfinite_message(p, total, grads, counts);
}

// Scales every gradient by c (not 1): in parallel, or one at a time in list order when some
// share memory (an expanded one is refused first).
void scale_all(const Plan& plan, at::TensorList grads, double c) {
  const size_t n = plan.items.size();
  if (plan.shares_memory(grads)) {
    const std::vector<uint8_t> todo(n, 1);
    check_writable(plan, todo, "scaled");
    write_serially(plan, todo, [&](const Item& it, char* data) {
      scale_range(it.dtype, data, it.numel, c);
      return true;
    });
  } else {
    scale_chunks(plan, std::vector<double>(n, c), std::vector<uint8_t>(n, 0));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------- the ops --

Stats grad_stats_cpu(at::TensorList grads, double norm_type) {
  check_norm_type(norm_type);
  Plan plan(grads);
  const NormKind kind = norm_kind(norm_type);
  auto parts = reduce_all(plan, kind, norm_type, -1.0);
  auto res = finish_all(plan, parts, kind, norm_type);
  return make_stats(plan, res, total_norm(res, kind, norm_type));
}

Stats clip_norm_cpu(at::TensorList grads, const at::Tensor& max_norm, double norm_type,
                    double eps, bool error_if_nonfinite) {
  check_norm_type(norm_type);
  Plan plan(grads);
  const double bound = read_bound(max_norm, "max_norm");
  const NormKind kind = norm_kind(norm_type);
  auto parts = reduce_all(plan, kind, norm_type, -1.0);
  auto res = finish_all(plan, parts, kind, norm_type);
  const double total = total_norm(res, kind, norm_type);
  Stats stats = make_stats(plan, res, total);
  if (error_if_nonfinite) {  // the norm as returned: inf also where it exceeds float32
    const double reported = std::get<3>(stats).item<double>();
    TORCH_CHECK(std::isfinite(reported), nonfinite_message(norm_type, reported, grads, res));
  }
  const double c = clip_coef(bound, total, eps);
  if (writes(c)) scale_all(plan, grads, c);
  return stats;
}

void clip_with_norm_cpu(at::TensorList grads, const at::Tensor& max_norm,
                        const at::Tensor& total_norm, double eps) {
  check_grads(grads, at::kCPU, "CPU");
  const double bound = read_bound(max_norm, "max_norm");
  TORCH_CHECK_VALUE(total_norm.numel() == 1, "gradstab: total_norm must be a tensor with one "
                    "element, got shape ", total_norm.sizes());
  TORCH_CHECK_VALUE(total_norm.device().is_cpu(), "gradstab: total_norm is on ",
                    total_norm.device(), " but the gradients are on cpu");
  const double c = clip_coef(bound, total_norm.item<double>(), eps);
  if (!writes(c) || grads.empty()) return;  // coefficient 1: nothing is read or written
  Plan plan(grads);
  scale_all(plan, grads, c);
}

namespace {

// clip_norm_per_layer (normalize = false) and normalize_per_layer (normalize = true).
Stats per_layer_cpu(at::TensorList grads, const at::Tensor& bound_t, double norm_type, double eps,
                    bool normalize) {
  check_norm_type(norm_type);
  Plan plan(grads);
  const double bound = read_bound(bound_t, normalize ? "target_norm" : "max_norm");
  const NormKind kind = norm_kind(norm_type);
  const size_t n = plan.items.size();
  const bool serial = plan.shares_memory(grads);
  std::vector<Partial> parts(plan.chunks.size());
  std::vector<TensorResult> res(n);
  std::vector<double> coef(n, 1.0);
  std::vector<uint8_t> done(n, 0);  // not vector<bool>: written from several threads
  // One-chunk tensors: reduce, then scale at once while the tensor is in cache.
  plan.for_each_chunk(false, [&](int64_t k) {
    const Chunk& c = plan.chunks[k];
    const Item& it = plan.items[c.item];
    parts[k] = reduce_range(it.dtype, plan.chunk_ptr(c), c.len, kind, norm_type, -1.0);
    if (it.num_chunks == 1 && !it.copied && !serial) {
      res[c.item] = finish_tensor(it, &parts[k], kind, norm_type);
      coef[c.item] = layer_coef(bound, res[c.item].norm, eps, normalize);
      if (writes(coef[c.item])) scale_range(it.dtype, plan.chunk_ptr(c), c.len, coef[c.item]);
      done[c.item] = 1;
    }
  });
  for (size_t i = 0; i < n; ++i) {
    const Item& it = plan.items[i];
    if (done[i]) continue;
    res[i] = it.numel == 0 ? TensorResult{0.0, 0.0, 0.0, 0}
                           : finish_tensor(it, parts.data() + it.first_chunk, kind,
                                           norm_type);
    coef[i] = layer_coef(bound, res[i].norm, eps, normalize);
  }
  if (serial) {
    std::vector<uint8_t> todo(n);
    for (size_t i = 0; i < n; ++i) todo[i] = writes(coef[i]);
    check_writable(plan, todo, "scaled");
    write_serially(plan, todo, [&](const Item& it, char* data) {
      scale_range(it.dtype, data, it.numel, coef[&it - plan.items.data()]);
      return true;
    });
  } else {
    scale_chunks(plan, coef, done);
  }
  return make_stats(plan, res, total_norm(res, kind, norm_type));
}

}  // namespace

Stats clip_norm_per_layer_cpu(at::TensorList grads, const at::Tensor& max_norm,
                              double norm_type, double eps) {
  return per_layer_cpu(grads, max_norm, norm_type, eps, /*normalize=*/false);
}

Stats normalize_per_layer_cpu(at::TensorList grads, const at::Tensor& target_norm,
                              double norm_type, double eps) {
  return per_layer_cpu(grads, target_norm, norm_type, eps, /*normalize=*/true);
}

Stats clip_value_cpu(at::TensorList grads, const at::Tensor& clip_value, double norm_type) {
  check_norm_type(norm_type);
  Plan plan(grads);
  const double bound = read_bound(clip_value, "clip_value");
  const NormKind kind = norm_kind(norm_type);
  if (plan.shares_memory(grads)) {
    // Statistics first (pure reads), then the clamps one gradient at a time. A gradient that
    // overlaps itself is clamped on a scratch copy first, to refuse it before anything changes
    // if it has values beyond the bound.
    auto parts = reduce_all(plan, kind, norm_type, -1.0);
    auto res = finish_all(plan, parts, kind, norm_type);
    std::vector<uint8_t> todo(plan.items.size(), 1);
    for (size_t i = 0; i < plan.items.size(); ++i) {
      const Item& it = plan.items[i];
      if (!it.self_overlap) continue;
      at::Tensor scratch = it.copy.clone();
      todo[i] = reduce_range(it.dtype, scratch.data_ptr(), it.numel, NormKind::kL2, 2.0, bound)
                    .wrote;
    }
    check_writable(plan, todo, "clamped");
    write_serially(plan, todo, [&](const Item& it, char* data) {
      return reduce_range(it.dtype, data, it.numel, NormKind::kL2, 2.0, bound).wrote;
    });
    return make_stats(plan, res, total_norm(res, kind, norm_type));
  }
  // Clamped in the reducing pass, except where finish_tensor may have to rescue an overflowed
  // or underflowed sum by re-reading the gradient (float64 gradients, p other than 1, 2, inf):
  // those are clamped after the statistics are final, chunk by chunk, so the statistics stay
  // those of the gradients on entry.
  auto fused = [&](const Item& it) { return kind != NormKind::kLp && it.dtype != DType::kDouble; };
  std::vector<Partial> parts(plan.chunks.size());
  bool late = false;
  for (const Item& it : plan.items) late = late || (it.numel > 0 && !fused(it));
  plan.for_each_chunk(false, [&](int64_t k) {
    const Chunk& c = plan.chunks[k];
    const Item& it = plan.items[c.item];
    parts[k] = reduce_range(it.dtype, plan.chunk_ptr(c), c.len, kind, norm_type,
                            fused(it) ? bound : -1.0);
  });
  auto res = finish_all(plan, parts, kind, norm_type);
  if (late) {
    plan.for_each_chunk(false, [&](int64_t k) {
      const Chunk& c = plan.chunks[k];
      const Item& it = plan.items[c.item];
      if (fused(it) || parts[k].max_abs <= bound) return;  // (a NaN max-abs proves nothing)
      parts[k].wrote =
          reduce_range(it.dtype, plan.chunk_ptr(c), c.len, NormKind::kL2, 2.0, bound).wrote;
    });
  }
  for (const Item& it : plan.items) {
    if (!it.copied) continue;
    bool wrote = false;
    for (int64_t c = 0; c < it.num_chunks; ++c) wrote = wrote || parts[it.first_chunk + c].wrote;
    if (wrote) it.grad->copy_(it.copy);
  }
  return make_stats(plan, res, total_norm(res, kind, norm_type));
}

TORCH_LIBRARY_IMPL(gradstab, CPU, m) {
  m.impl("grad_stats", &grad_stats_cpu);
  m.impl("clip_norm", &clip_norm_cpu);
  m.impl("clip_norm_per_layer", &clip_norm_per_layer_cpu);
  m.impl("clip_value", &clip_value_cpu);
  m.impl("normalize_per_layer", &normalize_per_layer_cpu);
  m.impl("clip_with_norm", &clip_with_norm_cpu);
}

}  // namespace cpu
}  // namespace gradstab
