// Contract: the CUDA kernels of adaptive_clip (unit-wise adaptive gradient clipping, Brock et al.
// 2021), plain CUDA with no torch headers (CI compiles this file with nvcc on a machine without
// a GPU; the CPU execution harness csrc/testing/cuda_sim compiles it unchanged as host C++ and
// runs it). The launcher is agc.cpp (the <<<...>>> launches are in agc_launch.cu); the
// work layout and records are described in
// agc_kernels.cuh, the device building blocks in device_common.cuh. Same semantics and arithmetic
// as the CPU kernel (csrc/cpu/agc.cpp):
//
// agc_reduce_kernel: one launch over every work item of every (G, W) pair (any mix of float16,
//   bfloat16, float32, float64 in G and W). Per row (or piece of a long row) one warp reads W
//   once and G once (16-byte vector loads where aligned):
//   * p = 1, 2 (and inf, where only the max is used): float32 accumulators per vector lane for
//     16/32-bit data (float64 for float64), flushed in a fixed order into a double lane sum
//     after every 8 vectors, lanes combined by a fixed xor butterfly; a float32-based sum that
//     is non-finite or below 1e-30 is recomputed in double. Other p: |x|^p in double.
//   * a non-finite sum makes the warp count the span's NaN/Inf and take a NaN-propagating max.
//   * a row's norms: an overflowed or underflowed sum (float64 data, or p-powers) is recomputed
//     scaled by the row's max |x| (re-reading the row, a rare slow path), as on the CPU.
//   * coefficient: max_norm = clip_factor * max(||W_r||, eps) (NaN kept), clipped iff
//     ||G_r|| > max_norm, coefficient max_norm / ||G_r||. A clipped short row is scaled by the
//     same warp right after the decision (still in L1/L2), unless `deferred`.
//   The warp completing a long row combines its pieces in piece order; the warp completing a
//   pair combines its rows (the CPU's rule: the p-root of the summed p-powers, from the norms
//   scaled by their max where a sum is not exact); the warp completing the last pair computes
//   the total norm the same way from the pairs.
// agc_scale_kernel: walks its item range in reverse (the reduce kernel's last items are still in
//   L2): scales the pieces of clipped long rows, and, when deferred, every clipped short row.
//   Returns at once when the reduce kernel found nothing for it to write.
// Scaling rounds as the CPU kernel (scale_unit, cpu/range_kernels.h): float16/bfloat16/float32
// multiply in float32 by float(coef), float64 in double (float32 in double where |coef| lies
// outside float32's normal range). Rows that are not clipped are never written.
#include "cuda/agc_kernels.cuh"
#include "cuda/device_common.cuh"
#include "cuda/norm_kernels.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace gradstab {
namespace cuda {
namespace {



// Elements [begin, end) of the array at p: a scalar head up to the first 16-byte aligned
// element, 16-byte vectors, a scalar tail (scalar throughout if p is not element-aligned).
template <typename T>
__device__ __forceinline__ Span make_span(const T* p, int64_t begin, int64_t end) {
  constexpr int V = Traits<T>::V;
  Span s;
  s.begin = begin;
  s.end = end;
  const uint64_t addr = reinterpret_cast<uint64_t>(p) + static_cast<uint64_t>(begin) * sizeof(T);
  if (reinterpret_cast<uint64_t>(p) % sizeof(T) != 0) {
    s.head_end = end;
    s.body_end = end;
    return s;
  }
  const int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
  s.head_end = begin + head < end ? begin + head : end;
  s.body_end = s.head_end + (end - s.head_end) / V * V;
  return s;
}

// Statistics of a span (device_common.cuh's span_stats_*): sum of |x|^p, max |x| (NaN if a
// NaN), NaN/Inf count. Kept out of line, as the reduce loop's register budget wants.
using Part = SpanStats;

template <typename T, bool kL1>
__device__ __noinline__ Part span_part_l12(T* p, const Span s, int lane) {
  return span_stats_l12<T, kL1>(p, s, lane);
}

template <typename T>
__device__ __noinline__ Part span_part_lp(T* p, const Span s, int lane, double np) {
  return span_stats_lp<T>(p, s, lane, np);
}

template <typename T>
__device__ __forceinline__ Part span_part(uint64_t base, int64_t begin, int64_t end, int32_t kind,
                                          double np, int lane) {
  T* p = reinterpret_cast<T*>(base);
  const Span s = make_span(p, begin, end);
  if (kind == kLp) return span_part_lp<T>(p, s, lane, np);
  if (kind == kL1) return span_part_l12<T, true>(p, s, lane);
  return span_part_l12<T, false>(p, s, lane);
}

__device__ Part part_any(int32_t dtype, uint64_t base, int64_t begin, int64_t end, int32_t kind,
                         double np, int lane) {
  switch (dtype) {
    case kHalf: return span_part<__half>(base, begin, end, kind, np, lane);
    case kBFloat16: return span_part<__nv_bfloat16>(base, begin, end, kind, np, lane);
    case kFloat: return span_part<float>(base, begin, end, kind, np, lane);
    default: return span_part<double>(base, begin, end, kind, np, lane);
  }
}

// Sum of (|x| / scale)^p over a span, in double: the overflow/underflow rescue.
template <typename T>
__device__ __noinline__ double span_rescaled_sum(uint64_t base, int64_t begin, int64_t end,
                                                 double np, double scale, int lane) {
  constexpr int V = Traits<T>::V;
  T* p = reinterpret_cast<T*>(base);
  double acc = 0.0;
  auto add = [&](double x) {
    const double a = __ddiv_rn(fabs(x), scale);
    acc = __dadd_rn(acc, np == 2.0 ? __dmul_rn(a, a) : (np == 1.0 ? a : pow(a, np)));
  };
  for_span(
      p, make_span(p, begin, end), lane,
      [&](int64_t i) { add(static_cast<double>(to_acc(gload(p + i)))); },
      [&](const Vec& v, int64_t) {
#pragma unroll
        for (int j = 0; j < V; ++j) add(static_cast<double>(vec_get<T>(v, j)));
      });
  return warp_sum(acc);
}

__device__ double rescaled_any(int32_t dtype, uint64_t base, int64_t begin, int64_t end,
                               double np, double scale, int lane) {
  switch (dtype) {
    case kHalf: return span_rescaled_sum<__half>(base, begin, end, np, scale, lane);
    case kBFloat16: return span_rescaled_sum<__nv_bfloat16>(base, begin, end, np, scale, lane);
    case kFloat: return span_rescaled_sum<float>(base, begin, end, np, scale, lane);
    default: return span_rescaled_sum<double>(base, begin, end, np, scale, lane);
  }
}

__device__ void scale_any(int32_t dtype, uint64_t base, int64_t begin, int64_t end, double coef,
                          int lane) {
  switch (dtype) {
    case kHalf: {
      __half* p = reinterpret_cast<__half*>(base);
      scale_unit(p, make_span(p, begin, end), lane, coef);
      break;
    }
    case kBFloat16: {
      __nv_bfloat16* p = reinterpret_cast<__nv_bfloat16*>(base);
      scale_unit(p, make_span(p, begin, end), lane, coef);
      break;
    }
    case kFloat: {
      float* p = reinterpret_cast<float*>(base);
      scale_unit(p, make_span(p, begin, end), lane, coef);
      break;
    }
    default: {
      double* p = reinterpret_cast<double*>(base);
      scale_unit(p, make_span(p, begin, end), lane, coef);
      break;
    }
  }
}

// The p-norm of the row [begin, end) of `base` from its statistics `q`, rescuing an overflowed
// or underflowed sum (the CPU kernel's finish_norm); *sum_out: the sum of p-powers, +inf where
// only the norm is valid (rescued), 0 for p = inf.
__device__ double finish_norm(int32_t dtype, uint64_t base, int64_t begin, int64_t end,
                              const Part& q, int32_t kind, double np, int lane,
                              double* sum_out) {
  if (kind == kLinf) {
    *sum_out = 0.0;
    return q.max_abs;
  }
  const bool overflowed = isinf(q.sum) && q.nonfinite == 0;
  const bool underflowed = q.sum < kTinySum && q.max_abs > 0.0;
  double s = q.sum;
  double scale = 1.0;
  if ((overflowed || underflowed) && isfinite(q.max_abs)) {
    scale = q.max_abs;
    s = rescaled_any(dtype, base, begin, end, np, scale, lane);
  }
  *sum_out = scale != 1.0 ? inf64() : s;
  return root(s, scale, kind, np);
}

// The AGC rule: the row's coefficient, 1 when it is not clipped.
__device__ __forceinline__ double agc_coef(double gnorm, double wnorm, double clip_factor,
                                           double eps) {
  const double floored = wnorm < eps ? eps : wnorm;  // NaN stays NaN
  const double max_norm = __dmul_rn(clip_factor, floored);
  return gnorm > max_norm ? __ddiv_rn(max_norm, gnorm) : 1.0;
}

// Tells the scale kernel it has work (several warps may store the same 1).
__device__ __forceinline__ void flag_scale(const AgcParams& P) {
  if (load_flag(&P.global->scale) == 0) store_flag(&P.global->scale, 1);
}

// The p-norm of a vector whose n parts have sums of p-powers sum_of(k) (+inf: only the norm is
// valid) and norms norm_of(k), by one warp in a fixed order (the CPU kernel's combine). Returns
// the norm; *sum_out: the vector's sum of p-powers, +inf where only the norm is valid.
template <typename SumFn, typename NormFn>
__device__ double combine(int64_t n, int32_t kind, double np, int lane, SumFn&& sum_of,
                          NormFn&& norm_of, double* sum_out) {
  double m = 0.0, s0 = 0.0, s1 = 0.0;
  bool nan = false;
  for (int64_t k = lane; k < n; k += 64) {
    const double a = norm_of(k);
    nan = nan || isnan(a);
    m = a > m ? a : m;
    s0 = __dadd_rn(s0, sum_of(k));
    if (k + 32 < n) {
      const double b = norm_of(k + 32);
      nan = nan || isnan(b);
      m = b > m ? b : m;
      s1 = __dadd_rn(s1, sum_of(k + 32));
    }
  }
  nan = __any_sync(kFull, nan);
  m = warp_max(m);
  double s = warp_sum(__dadd_rn(s0, s1));
  *sum_out = inf64();
  if (nan) return nan64();
  if (kind == kLinf || isinf(m)) return m;
  if (isfinite(s) && !(s < kTinySum && m > 0.0)) {
    *sum_out = s;
    return root(s, 1.0, kind, np);
  }
  s0 = 0.0;  // a part was rescued, or the sum itself over/underflows: work from the norms
  s1 = 0.0;
  for (int64_t k = lane; k < n; k += 64) {
    s0 = __dadd_rn(s0, power(__ddiv_rn(norm_of(k), m), kind, np));
    if (k + 32 < n) s1 = __dadd_rn(s1, power(__ddiv_rn(norm_of(k + 32), m), kind, np));
  }
  s = warp_sum(__dadd_rn(s0, s1));
  return root(s, m, kind, np);
}

// One warp: whole row r of pair d (a short row): reduce W_r, G_r, decide, record, scale.
__device__ void process_row(const AgcParams& P, const AgcPair& d, int64_t r, int lane) {
  const int64_t b = r * d.row_len;
  const int64_t e = b + d.row_len;
  double unused = 0.0, gsum = 0.0;
  const Part wq = part_any(d.wdtype, d.w, b, e, P.kind, P.p, lane);
  const double wnorm = finish_norm(d.wdtype, d.w, b, e, wq, P.kind, P.p, lane, &unused);
  const Part gq = part_any(d.gdtype, d.g, b, e, P.kind, P.p, lane);
  const double gnorm = finish_norm(d.gdtype, d.g, b, e, gq, P.kind, P.p, lane, &gsum);
  const double c = agc_coef(gnorm, wnorm, P.clip_factor, P.eps);
  if (lane == 0) {
    AgcRow rec;
    rec.sum = gsum;
    rec.norm = gnorm;
    rec.coef = c;
    rec.nonfinite = gq.nonfinite;
    P.rows[d.first_row + r] = rec;
    if (c < 1.0 && P.deferred) flag_scale(P);
  }
  if (c < 1.0 && !P.deferred) scale_any(d.gdtype, d.g, b, e, c, lane);
}

// One warp: piece `local` (row-major over rows and pieces) of a long-row pair: partial sums.
__device__ void process_piece(const AgcParams& P, const AgcPair& d, int64_t local, int lane) {
  const int64_t r = local / d.per;
  const int64_t c = local % d.per;
  const int64_t row_end = (r + 1) * d.row_len;
  const int64_t b = r * d.row_len + c * kAgcItemElems;
  const int64_t e = b + kAgcItemElems < row_end ? b + kAgcItemElems : row_end;
  const Part wq = part_any(d.wdtype, d.w, b, e, P.kind, P.p, lane);
  const Part gq = part_any(d.gdtype, d.g, b, e, P.kind, P.p, lane);
  if (lane == 0) {
    AgcPiece q;
    q.wsum = wq.sum;
    q.wmax = wq.max_abs;
    q.gsum = gq.sum;
    q.gmax = gq.max_abs;
    q.wnonfinite = wq.nonfinite;
    q.gnonfinite = gq.nonfinite;
    P.pieces[d.first_piece + local] = q;
  }
}

// One warp: combine the pieces of long row r in piece order, decide, record.
__device__ __noinline__ void finish_long_row(const AgcParams& P, const AgcPair d, int64_t r,
                                             int lane) {
  const AgcPiece* pc = P.pieces + d.first_piece + r * d.per;
  double ws = 0.0, wm = 0.0, gs = 0.0, gm = 0.0;
  long long wn = 0, gn = 0;
  bool wnan = false, gnan = false;
  for (int64_t k = lane; k < d.per; k += 32) {
    ws = __dadd_rn(ws, __ldcg(&pc[k].wsum));
    gs = __dadd_rn(gs, __ldcg(&pc[k].gsum));
    const double a = __ldcg(&pc[k].wmax), b = __ldcg(&pc[k].gmax);
    wnan = wnan || isnan(a);
    gnan = gnan || isnan(b);
    wm = a > wm ? a : wm;
    gm = b > gm ? b : gm;
    wn += __ldcg(reinterpret_cast<const long long*>(&pc[k].wnonfinite));
    gn += __ldcg(reinterpret_cast<const long long*>(&pc[k].gnonfinite));
  }
  Part wq, gq;
  wq.sum = warp_sum(ws);
  gq.sum = warp_sum(gs);
  wq.nonfinite = warp_sum(wn);
  gq.nonfinite = warp_sum(gn);
  wm = warp_max(wm);
  gm = warp_max(gm);
  wq.max_abs = __any_sync(kFull, wnan) ? nan64() : wm;
  gq.max_abs = __any_sync(kFull, gnan) ? nan64() : gm;
  const int64_t b = r * d.row_len;
  const int64_t e = b + d.row_len;
  double unused = 0.0, gsum = 0.0;
  const double wnorm = finish_norm(d.wdtype, d.w, b, e, wq, P.kind, P.p, lane, &unused);
  const double gnorm = finish_norm(d.gdtype, d.g, b, e, gq, P.kind, P.p, lane, &gsum);
  const double c = agc_coef(gnorm, wnorm, P.clip_factor, P.eps);
  if (lane == 0) {
    AgcRow rec;
    rec.sum = gsum;
    rec.norm = gnorm;
    rec.coef = c;
    rec.nonfinite = gq.nonfinite;
    P.rows[d.first_row + r] = rec;
    if (c < 1.0) flag_scale(P);  // the scale kernel scales the pieces
  }
}

__device__ void write_pair(const AgcParams& P, int32_t orig, const AgcPairRecord& rec) {
  P.pair_rec[orig] = rec;
  store_out(P.out_norms, orig, rec.norm, P.out_double != 0);
  P.out_clipped[orig] = rec.clipped;
  P.out_nonfinite[orig] = rec.nonfinite;
}

// One warp: combine the rows of pair d in row order into its statistics.
__device__ __noinline__ void finish_pair(const AgcParams& P, const AgcPair d, int lane) {
  const AgcRow* R = P.rows + d.first_row;
  long long clipped = 0, nonfinite = 0;
  for (int64_t k = lane; k < d.rows; k += 32) {
    clipped += __ldcg(&R[k].coef) < 1.0 ? 1 : 0;
    nonfinite += __ldcg(reinterpret_cast<const long long*>(&R[k].nonfinite));
  }
  AgcPairRecord rec;
  rec.clipped = warp_sum(clipped);
  rec.nonfinite = warp_sum(nonfinite);
  rec.norm = combine(
      d.rows, P.kind, P.p, lane, [&](int64_t k) { return __ldcg(&R[k].sum); },
      [&](int64_t k) { return __ldcg(&R[k].norm); }, &rec.sum);
  if (lane == 0) write_pair(P, d.orig, rec);
}

// One warp, once per call: zero-size pairs' results and the total norm.
__device__ __noinline__ void finish_all(const AgcParams& P, int lane) {
  for (int t = P.num_work + lane; t < P.num_pairs; t += 32) {
    AgcPairRecord rec;
    rec.sum = 0.0;
    rec.norm = 0.0;
    rec.clipped = 0;
    rec.nonfinite = 0;
    write_pair(P, P.pairs[t].orig, rec);
  }
  __syncwarp();
  __threadfence();
  const AgcPairRecord* R = P.pair_rec;
  double unused = 0.0;
  const double total = combine(
      P.num_pairs, P.kind, P.p, lane, [&](int64_t k) { return __ldcg(&R[k].sum); },
      [&](int64_t k) { return __ldcg(&R[k].norm); }, &unused);
  if (lane == 0) {
    P.global->total = total;
    store_out(P.out_total, 0, total, P.out_double != 0);
  }
}

__device__ __forceinline__ int find_pair(const AgcParams& P, int64_t item) {
  int lo = 0, hi = P.num_work - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (P.pairs[mid].first_item <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace

__global__ void __launch_bounds__(kThreads) agc_reduce_kernel(const __grid_constant__ AgcParams P) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  if (P.num_work == 0) {  // only zero-size pairs
    if (warp == 0) finish_all(P, lane);
    return;
  }
  for (int64_t item = warp; item < P.total_items; item += warps) {
    const int t = find_pair(P, item);
    const AgcPair d = P.pairs[t];
    const int64_t local = item - d.first_item;
    int64_t rows_done = 0;
    if (!d.is_long) {
      const int64_t r0 = local * d.per;
      const int64_t r1 = r0 + d.per < d.rows ? r0 + d.per : d.rows;
      for (int64_t r = r0; r < r1; ++r) process_row(P, d, r, lane);
      rows_done = r1 - r0;
    } else {
      process_piece(P, d, local, lane);
      const int64_t r = local / d.per;
      if (!arrive_last<int32_t>(&P.long_done[d.first_long + r], 1, static_cast<int32_t>(d.per),
                                lane)) {
        continue;
      }
      finish_long_row(P, d, r, lane);
      rows_done = 1;
    }
    if (!arrive_last<unsigned long long>(&P.pair_done[t],
                                         static_cast<unsigned long long>(rows_done),
                                         static_cast<unsigned long long>(d.rows), lane)) {
      continue;
    }
    finish_pair(P, d, lane);
    if (arrive_last<int32_t>(P.all_done, 1, P.num_work, lane)) finish_all(P, lane);
  }
}

__global__ void __launch_bounds__(kThreads) agc_scale_kernel(const __grid_constant__ AgcParams P) {
  if (load_flag(&P.global->scale) == 0) return;  // nothing clipped
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t n = P.item_end - P.item_begin;
  for (int64_t k = warp; k < n; k += warps) {
    const int64_t item = P.item_end - 1 - k;  // reverse: the last items read are still in L2
    const AgcPair d = P.pairs[find_pair(P, item)];
    const int64_t local = item - d.first_item;
    if (d.is_long) {
      const int64_t r = local / d.per;
      const double coef = __ldcg(&P.rows[d.first_row + r].coef);
      if (!(coef < 1.0)) continue;
      const int64_t c = local % d.per;
      const int64_t row_end = (r + 1) * d.row_len;
      const int64_t b = r * d.row_len + c * kAgcItemElems;
      const int64_t e = b + kAgcItemElems < row_end ? b + kAgcItemElems : row_end;
      scale_any(d.gdtype, d.g, b, e, coef, lane);
    } else if (P.deferred) {
      const int64_t r0 = local * d.per;
      const int64_t r1 = r0 + d.per < d.rows ? r0 + d.per : d.rows;
      for (int64_t r = r0; r < r1; ++r) {
        const double coef = __ldcg(&P.rows[d.first_row + r].coef);
        if (coef < 1.0) scale_any(d.gdtype, d.g, r * d.row_len, (r + 1) * d.row_len, coef, lane);
      }
    }
  }
}

}  // namespace cuda
}  // namespace gradstab
