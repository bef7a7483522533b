// Contract: CPU kernel of gradstab::adaptive_clip (schema in gradstab/_library.py), unit-wise
// adaptive gradient clipping (AGC, Brock et al. 2021, NFNets), in place on the gradients.
//
// A unit is a slice along dim 0 of a tensor of >= 2 dimensions (an output channel of a conv
// weight, a row of a linear weight); a 0-/1-D tensor is one unit. For every unit i of every
// (gradient G, parameter W) pair:
//     max_norm_i = clip_factor * max(||W_i||_p, eps)          (a NaN ||W_i|| stays NaN)
//     if ||G_i||_p > max_norm_i:  G_i *= max_norm_i / ||G_i||_p   (never when a norm is NaN)
// i.e. exactly the paper's rule, with no epsilon on ||G_i|| (max_norm_i > 0 whenever the
// comparison holds with ||G_i|| finite; ||G_i|| = inf gives a coefficient of 0).
//
// Memory traffic: W is read once, G is read once, and a unit of G is written only when it is
// clipped. Units are grouped into work items of about kChunk elements, and the items into one
// contiguous range per thread with about equal element counts; within an item each unit is
// reduced (W, then G) and, if clipped, scaled at once while it is in cache. A unit longer than
// kChunk is split into pieces that are reduced in parallel, combined in piece order, and scaled
// in a second parallel pass.
// Norms use reduce_range (range_kernels.h): float32 partial sums over 2,048-element blocks,
// exact double where a block overflows or underflows; float64 unit sums that overflow or
// underflow are recomputed scaled by the unit's max |x|. Every result is combined in a fixed
// order, so the output is bit-identical run to run and for any thread count.
//
// Returns (norms [T], clipped [T] int64, nonfinite [T] int64, total_norm []): the pre-clip
// p-norm of each gradient, the number of its clipped units, its NaN/Inf count, and the pre-clip
// total norm; floating results in float64 if any gradient is float64, float32 otherwise.
// Every argument is checked before any gradient is touched.
//
// Memory shared between arguments (as norm_ops.cpp): when a gradient overlaps another gradient
// or any parameter (the same tensor twice, overlapping views, a parameter aliasing a gradient),
// the parallel pass would race, so every unit is first decided from the data as it was on entry
// (a pure read, in parallel), and the clipped units are then written one gradient at a time, in
// list order: a gradient passed twice is scaled twice by its entry coefficients, as PyTorch's
// clip_grad_norm_ scales it twice by its one coefficient. A gradient whose own elements share
// memory (an expanded view) cannot be written in place: if any of its units is clipped, a
// ValueError naming it is raised before any gradient is written.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/args.h"
#include "common/overlap.h"
#include "cpu/norm_ops.h"
#include "cpu/range_kernels.h"

namespace gradstab {
namespace cpu {
namespace {

using AgcStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kChunk = 1 << 16;        // elements of G per work item (and of W)
constexpr int64_t kSerialBelow = 1 << 15;  // total elements under which one thread is faster
constexpr double kTinySum = 1e-280;        // sums this small may have lost terms to underflow
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double root(double s, NormKind kind, double p) {
  if (kind == NormKind::kL2) return std::sqrt(s);
  if (kind == NormKind::kL1) return s;
  return std::pow(s, 1.0 / p);
}

// p-norm of n elements at `base` from their reduce_range partial; rescues an overflowed or
// underflowed sum of p-powers by recomputing it scaled by max |x|. *sum_out receives the sum of
// p-powers, or inf where only the norm is valid (rescued).
double finish_norm(DType dt, const char* base, int64_t n, const Partial& q, NormKind kind,
                   double p, double* sum_out) {
  if (kind == NormKind::kLinf) {
    *sum_out = 0.0;
    return q.max_abs;
  }
  const bool overflowed = std::isinf(q.sum) && q.nonfinite == 0;
  const bool underflowed = q.sum < kTinySum && q.max_abs > 0.0;
  double s = q.sum;
  double scale = 1.0;
  if ((overflowed || underflowed) && std::isfinite(q.max_abs)) {
    scale = q.max_abs;
    s = rescaled_sum(dt, base, n, p, scale);
  }
  *sum_out = scale != 1.0 ? kInf : s;
  return scale * root(s, kind, p);
}

// p-norm of a vector whose parts have sums of p-powers `sums` (inf: only the norm is valid)
// and norms `norms`, combined in index order; *sum_out as in finish_norm.
double combine(const double* sums, const double* norms, int64_t n, NormKind kind, double p,
               double* sum_out) {
  double m = 0.0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan = nan || std::isnan(norms[i]);
    m = norms[i] > m ? norms[i] : m;
  }
  *sum_out = kInf;
  if (nan) return kNaN;
  if (kind == NormKind::kLinf || std::isinf(m)) return m;
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += sums[i];
  const bool exact = std::isfinite(s) && !(s < kTinySum && m > 0.0);
  if (exact) {
    *sum_out = s;
    return root(s, kind, p);
  }
  s = 0.0;  // a part was rescued, or the sum itself over/underflows: work from the norms
  for (int64_t i = 0; i < n; ++i) {
    const double a = norms[i] / m;
    s += kind == NormKind::kL2 ? a * a : (kind == NormKind::kL1 ? a : std::pow(a, p));
  }
  return m * root(s, kind, p);
}

// The AGC rule: the coefficient of a unit (1 when it is not clipped).
double agc_coef(double gnorm, double wnorm, double clip_factor, double eps) {
  const double floored = wnorm < eps ? eps : wnorm;  // NaN stays NaN
  const double max_norm = clip_factor * floored;
  return gnorm > max_norm ? max_norm / gnorm : 1.0;
}

// One (gradient, parameter) pair: where its units live.
struct Pair {
  const at::Tensor* grad;
  at::Tensor gcopy;  // row-major copy of a gradient whose units are not contiguous blocks
  at::Tensor wcopy;  // same for the parameter (read only)
  char* g = nullptr;
  const char* w = nullptr;
  DType gdt, wdt;
  int64_t gsize, wsize;  // element sizes in bytes
  int64_t units, unit_len;
  int64_t first_unit;  // index of unit 0 in the per-unit arrays
  bool gcopied = false;
  bool self_overlap = false;  // some elements of the gradient share memory (an expanded view)
};

// A work item: whole units [u_begin, u_end) of one pair, or piece `piece` of a long unit.
struct Work {
  int64_t pair;
  int64_t u_begin, u_end;
  int64_t e_begin, e_len;  // pieces: element range within the unit
  int64_t piece;           // -1 for whole units
};

struct LongUnit {
  int64_t pair, unit, first_piece, num_pieces;
  double coef = 1.0;
};

struct UnitResult {
  double sum = 0.0;   // sum of |g|^p of the unit (inf: rescued, only norm valid)
  double norm = 0.0;  // ||G_i||_p
  int64_t nonfinite = 0;
  bool clipped = false;
};

// Units of `t` are the row-major blocks [i * unit_len, (i + 1) * unit_len) of its memory when
// it is dense and non-overlapping with dim 0 outermost (contiguous, channels_last, ...); then
// the norm and a uniform scale of a unit do not depend on the order within the block.
bool units_are_blocks(const at::Tensor& t, int64_t units, int64_t unit_len) {
  if (t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense()) return false;
  return units == 1 || t.stride(0) == unit_len;
}

// Whether some gradient overlaps itself, another gradient, or any parameter (parameters are
// only read: two parameters may share memory): common/overlap.h's test, conservative for
// interleaved views such as g[::2] and g[1::2], which merely take the serial write path.
bool shares_memory(at::TensorList grads, at::TensorList params, const std::vector<Pair>& pairs) {
  std::vector<ByteSpan> gs, ws;
  gs.reserve(grads.size());
  ws.reserve(params.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    if (pairs[i].self_overlap) return true;
    gs.push_back(byte_span(grads[i]));
    ws.push_back(byte_span(params[i]));
  }
  return spans_overlap(std::move(gs), std::move(ws));
}

AgcStats adaptive_clip_cpu(at::TensorList grads, at::TensorList params, double clip_factor,
                           double eps, double norm_type) {
  check_adaptive_clip_args(grads, params, clip_factor, eps, norm_type, at::kCPU, "CPU");
  const NormKind kind = norm_kind(norm_type);
  const double p = norm_type;
  const int64_t T = static_cast<int64_t>(grads.size());

  // ---- plan: pairs, work items, long units
  std::vector<Pair> pairs(T);
  std::vector<Work> works;
  std::vector<LongUnit> longs;
  int64_t total_units = 0, total_numel = 0, num_pieces = 0;
  bool any_double = false;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& g = grads[t];
    const at::Tensor& w = params[t];
    Pair& pr = pairs[t];
    pr.grad = &grads[t];
    pr.gdt = to_dtype(g.scalar_type());
    pr.wdt = to_dtype(w.scalar_type());
    pr.gsize = static_cast<int64_t>(g.element_size());
    pr.wsize = static_cast<int64_t>(w.element_size());
    pr.units = g.dim() <= 1 ? 1 : g.size(0);
    pr.unit_len = pr.units == 0 ? 0 : g.numel() / pr.units;
    pr.first_unit = total_units;
    total_units += pr.units;
    any_double = any_double || g.scalar_type() == at::kDouble;
    if (g.numel() == 0) continue;
    total_numel += g.numel();
    pr.gcopied = !units_are_blocks(g, pr.units, pr.unit_len);
    pr.self_overlap = pr.gcopied && at::has_internal_overlap(g) == at::MemOverlap::Yes;
    if (pr.gcopied) pr.gcopy = g.contiguous();
    pr.g = static_cast<char*>(pr.gcopied ? pr.gcopy.data_ptr() : g.data_ptr());
    if (!units_are_blocks(w, pr.units, pr.unit_len)) pr.wcopy = w.contiguous();
    pr.w = static_cast<const char*>(pr.wcopy.defined() ? pr.wcopy.const_data_ptr()
                                                        : w.const_data_ptr());
    const int64_t K = pr.unit_len;
    if (K > kChunk) {
      for (int64_t u = 0; u < pr.units; ++u) {
        LongUnit lu{t, u, num_pieces, (K + kChunk - 1) / kChunk};
        for (int64_t c = 0; c < lu.num_pieces; ++c) {
          const int64_t b = c * kChunk;
          works.push_back({t, u, u + 1, b, std::min(kChunk, K - b), num_pieces + c});
        }
        num_pieces += lu.num_pieces;
        longs.push_back(lu);
      }
    } else {
      const int64_t per = std::max<int64_t>(1, kChunk / K);
      for (int64_t u = 0; u < pr.units; u += per) {
        works.push_back({t, u, std::min(pr.units, u + per), 0, 0, -1});
      }
    }
  }

  // Shared memory: decide every unit first (pure reads), then write in list order.
  const bool serial = shares_memory(grads, params, pairs);
  std::vector<UnitResult> res(total_units);
  std::vector<double> ucoef(serial ? total_units : 0, 1.0);  // serial: each unit's coefficient
  std::vector<Partial> gpart(num_pieces), wpart(num_pieces);
  const bool one_thread = total_numel < kSerialBelow;
  // Runs body(k) for the work items k in `items`, one contiguous range of them per thread with
  // about equal element counts (parallel_balanced). Each item writes only its own results, so
  // the split does not change any result.
  auto for_each = [&](const std::vector<int64_t>& items, const auto& body) {
    const int64_t n = static_cast<int64_t>(items.size());
    const int64_t nt = one_thread ? 1 : std::min<int64_t>(at::get_num_threads(), n);
    auto size_of = [&](int64_t i) {
      const Work& wk = works[items[i]];
      return wk.piece >= 0 ? wk.e_len : (wk.u_end - wk.u_begin) * pairs[wk.pair].unit_len;
    };
    parallel_balanced(n, nt, size_of, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) body(items[i]);
    });
  };
  std::vector<int64_t> all_works(works.size());
  for (size_t k = 0; k < works.size(); ++k) all_works[k] = static_cast<int64_t>(k);

  // ---- pass 1: whole units reduced, decided and (unless serial) scaled; pieces of long units
  // reduced
  for_each(all_works, [&](int64_t k) {
    const Work& wk = works[k];
    const Pair& pr = pairs[wk.pair];
    const int64_t K = pr.unit_len;
    if (wk.piece >= 0) {
      const int64_t off = wk.u_begin * K + wk.e_begin;
      wpart[wk.piece] = reduce_range(pr.wdt, const_cast<char*>(pr.w) + off * pr.wsize,
                                     wk.e_len, kind, p, -1.0);
      gpart[wk.piece] = reduce_range(pr.gdt, pr.g + off * pr.gsize, wk.e_len, kind, p, -1.0);
      return;
    }
    for (int64_t u = wk.u_begin; u < wk.u_end; ++u) {
      const char* wp = pr.w + u * K * pr.wsize;
      char* gp = pr.g + u * K * pr.gsize;
      double unused = 0.0;
      const Partial wq = reduce_range(pr.wdt, const_cast<char*>(wp), K, kind, p, -1.0);
      const double wnorm = finish_norm(pr.wdt, wp, K, wq, kind, p, &unused);
      const Partial gq = reduce_range(pr.gdt, gp, K, kind, p, -1.0);
      UnitResult& r = res[pr.first_unit + u];
      r.norm = finish_norm(pr.gdt, gp, K, gq, kind, p, &r.sum);
      r.nonfinite = gq.nonfinite;
      const double c = agc_coef(r.norm, wnorm, clip_factor, eps);
      r.clipped = c < 1.0;
      if (!r.clipped) continue;
      if (serial) {
        ucoef[pr.first_unit + u] = c;
      } else {
        scale_range(pr.gdt, gp, K, c);
      }
    }
  });

  // ---- long units: combine pieces in order, decide; pass 2 scales the clipped ones
  bool any_long_clipped = false;
  for (LongUnit& lu : longs) {
    const Pair& pr = pairs[lu.pair];
    const int64_t K = pr.unit_len;
    Partial wq, gq;
    bool wnan = false, gnan = false;
    for (int64_t c = 0; c < lu.num_pieces; ++c) {
      const Partial& a = wpart[lu.first_piece + c];
      const Partial& b = gpart[lu.first_piece + c];
      wq.sum += a.sum;
      wq.nonfinite += a.nonfinite;
      wnan = wnan || std::isnan(a.max_abs);
      wq.max_abs = a.max_abs > wq.max_abs ? a.max_abs : wq.max_abs;
      gq.sum += b.sum;
      gq.nonfinite += b.nonfinite;
      gnan = gnan || std::isnan(b.max_abs);
      gq.max_abs = b.max_abs > gq.max_abs ? b.max_abs : gq.max_abs;
    }
    if (wnan) wq.max_abs = kNaN;
    if (gnan) gq.max_abs = kNaN;
    const char* wp = pr.w + lu.unit * K * pr.wsize;
    const char* gp = pr.g + lu.unit * K * pr.gsize;
    double unused = 0.0;
    const double wnorm = finish_norm(pr.wdt, wp, K, wq, kind, p, &unused);
    UnitResult& r = res[pr.first_unit + lu.unit];
    r.norm = finish_norm(pr.gdt, gp, K, gq, kind, p, &r.sum);
    r.nonfinite = gq.nonfinite;
    lu.coef = agc_coef(r.norm, wnorm, clip_factor, eps);
    r.clipped = lu.coef < 1.0;
    if (serial && r.clipped) ucoef[pr.first_unit + lu.unit] = lu.coef;
    any_long_clipped = any_long_clipped || r.clipped;
  }
  if (serial) {
    // Refuse, before anything is written, an expanded gradient that has a unit to clip.
    for (int64_t t = 0; t < T; ++t) {
      const Pair& pr = pairs[t];
      if (!pr.self_overlap) continue;
      bool clips = false;
      for (int64_t u = 0; u < pr.units && !clips; ++u) clips = res[pr.first_unit + u].clipped;
      TORCH_CHECK_VALUE(!clips, "gradstab: gradient ", t, " of ", T, " (shape ",
                        grads[t].sizes(), ") must be clipped, but several of its elements "
                        "share one memory location (an expanded view?), so it cannot be "
                        "written in place. Give it its own memory first, e.g. "
                        "`p.grad = p.grad.clone()`. No gradient was changed.");
    }
    // The clipped units, one gradient at a time in list order; a strided gradient is re-read
    // just before (an earlier gradient may have changed its memory) and written back.
    for (int64_t t = 0; t < T; ++t) {
      const Pair& pr = pairs[t];
      bool clips = false;
      for (int64_t u = 0; u < pr.units && !clips; ++u) clips = res[pr.first_unit + u].clipped;
      if (!clips) continue;
      at::Tensor fresh;
      char* g = pr.g;
      if (pr.gcopied) {
        fresh = grads[t].contiguous();
        g = static_cast<char*>(fresh.data_ptr());
      }
      const int64_t K = pr.unit_len;
      for (int64_t u = 0; u < pr.units; ++u) {
        if (!res[pr.first_unit + u].clipped) continue;
        scale_range(pr.gdt, g + u * K * pr.gsize, K, ucoef[pr.first_unit + u]);
      }
      if (pr.gcopied) grads[t].copy_(fresh);
    }
  } else if (any_long_clipped) {
    std::vector<double> piece_coef(num_pieces, 1.0);
    for (const LongUnit& lu : longs) {
      for (int64_t c = 0; c < lu.num_pieces; ++c) piece_coef[lu.first_piece + c] = lu.coef;
    }
    std::vector<int64_t> to_scale;  // the pieces of clipped long units
    for (size_t k = 0; k < works.size(); ++k) {
      if (works[k].piece >= 0 && piece_coef[works[k].piece] < 1.0) {
        to_scale.push_back(static_cast<int64_t>(k));
      }
    }
    for_each(to_scale, [&](int64_t k) {
      const Work& wk = works[k];
      const Pair& pr = pairs[wk.pair];
      const int64_t off = wk.u_begin * pr.unit_len + wk.e_begin;
      scale_range(pr.gdt, pr.g + off * pr.gsize, wk.e_len, piece_coef[wk.piece]);
    });
  }

  // ---- per-tensor results (units combined in order), copies written back
  auto dd = at::TensorOptions().dtype(at::kDouble);
  at::Tensor norms = at::empty({T}, dd);
  at::Tensor clipped = at::empty({T}, at::TensorOptions().dtype(at::kLong));
  at::Tensor nonfinite = at::empty({T}, at::TensorOptions().dtype(at::kLong));
  double* pn = norms.data_ptr<double>();
  int64_t* pc = clipped.data_ptr<int64_t>();
  int64_t* pf = nonfinite.data_ptr<int64_t>();
  std::vector<double> tsum(T), tnorm(T), usum, unorm;
  for (int64_t t = 0; t < T; ++t) {
    const Pair& pr = pairs[t];
    usum.resize(pr.units);
    unorm.resize(pr.units);
    int64_t nclip = 0, nbad = 0;
    for (int64_t u = 0; u < pr.units; ++u) {
      const UnitResult& r = res[pr.first_unit + u];
      usum[u] = r.sum;
      unorm[u] = r.norm;
      nclip += r.clipped ? 1 : 0;
      nbad += r.nonfinite;
    }
    tnorm[t] = combine(usum.data(), unorm.data(), pr.units, kind, p, &tsum[t]);
    pn[t] = tnorm[t];
    pc[t] = nclip;
    pf[t] = nbad;
    if (!serial && pr.gcopied && nclip > 0) pr.grad->copy_(pr.gcopy);
  }
  double unused = 0.0;
  const double total = combine(tsum.data(), tnorm.data(), T, kind, p, &unused);
  const auto rd = any_double ? at::kDouble : at::kFloat;
  return {norms.to(rd), clipped, nonfinite, at::scalar_tensor(total, dd).to(rd)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CPU, m) { m.impl("adaptive_clip", &adaptive_clip_cpu); }

}  // namespace cpu
}  // namespace gradstab
