// Contract: the fused CUDA kernels of gradstab's norm ops (plain CUDA: no torch headers, so CI
// compiles this file with nvcc on a machine without a GPU, and the CPU execution harness
// csrc/testing/cuda_sim compiles it unchanged as host C++ and runs it). The launcher is
// norm_ops.cpp (the <<<...>>> launches are in norm_launch.cu); the shared layout (units, descriptor
// table, records) is described in norm_kernels.cuh, the device building blocks (element access,
// warp reductions, spans, scaling) are in device_common.cuh.
//
// reduce_kernel: one launch over every unit of every gradient (any mix of float16, bfloat16,
//   float32, float64). Per unit (one warp, 16-byte vector loads where the data is 16-byte
//   aligned, scalar loads for the unaligned head and the tail):
//   * p = 2 / inf: each lane keeps one float32 accumulator per vector lane (float64 for float64
//     data) of x^2 and a NaN-free running max |x|; after every 8 vectors the accumulators are
//     added, in a fixed order, into the lane's double sum (so a float32 partial holds at most 8
//     terms), and the 32 lanes are combined by a fixed xor-butterfly in double. p = 1: the same
//     with |x|. A float32 unit sum that is non-finite or below 1e-30 (squares may have
//     underflowed) is recomputed from the data in double, so float16/bfloat16/float32 sums can
//     neither overflow nor lose tiny terms (the CPU kernel's rule, per 16 KB unit).
//   * other p: |x|^p summed in double (pow per element).
//   * when the unit sum is non-finite, the unit is re-read to count its NaN/Inf elements and to
//     make its max NaN-propagating (a finite sum proves there are none).
//   * value clipping: a unit holding an element beyond the bound is clamped right after its
//     statistics are taken (the bound rounded to the element type, compared in float32 for
//     16-bit types as PyTorch does, NaN kept), or by the scale kernel for kClipValueDeferred.
//   The warp finishing a tensor's last unit combines the tensor's unit partials (fixed order),
//   rescues an overflowed/underflowed float64 (or p-power) sum by recomputing it scaled by the max
//   |x| (re-reading the tensor, a rare and slow path), and writes the tensor's results and its
//   per-layer coefficient; the warp finishing the last tensor computes the total norm as the p-root
//   of the summed p-powers (from the norms, scaled, if a sum is not exact) and the global
//   coefficient min(1, bound / (total + eps)) (NaN kept). Per-layer modes use each tensor's min(1,
//   bound / (norm + eps)), or bound / (norm + eps) to normalize to a target norm. Statistics are of
//   the data as it was on entry. Every reduction has a fixed order: results are bit-identical run
//   to run and do not depend on the grid size or on which warp ran which unit. They do depend on
//   where each gradient starts modulo 16 bytes (that decides the split into scalar head, vectors
//   and tail), so a view starting mid-vector may differ in the last bit from an aligned copy of the
//   same values. No floating-point atomics; integer counters implement the last-block-done
//   hand-off.
// writeback_kernel: copies a strided gradient's contiguous working copy back, only if the call
//   changed that tensor (a device flag).
// scale_kernel: clipping and normalizing; walks the units in reverse order (the reduce kernel's
//   last units are still in L2) and scales every unit whose coefficient is not 1 (a NaN
//   coefficient writes NaN, as PyTorch does) with the CPU kernel's arithmetic
//   (cpu/range_kernels.h, scale_range): float16/bfloat16/float32 multiply in float32 by
//   float(coef), float64 in double, and float32 in double, rounded once, where |coef| lies
//   outside float32's normal range [FLT_MIN, FLT_MAX].
//   Nothing is written when every coefficient is 1.
#include "cuda/norm_kernels.cuh"
#include "cuda/device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace gradstab {
namespace cuda {
namespace {


// The elements of unit `local` of tensor d.
template <typename T>
__device__ __forceinline__ Span unit_span(const TensorDesc& d, int64_t local) {
  constexpr int V = Traits<T>::V;
  constexpr int64_t U = kUnitBytes / static_cast<int64_t>(sizeof(T));
  Span s;
  s.begin = local * U;
  s.end = s.begin + U < d.numel ? s.begin + U : d.numel;
  if (d.align_offset < 0) {  // not even element-aligned: scalar loads throughout
    s.head_end = s.end;
    s.body_end = s.end;
    return s;
  }
  // begin is a multiple of V, so the first aligned element is align_offset elements in.
  s.head_end = s.begin + d.align_offset < s.end ? s.begin + d.align_offset : s.end;
  s.body_end = s.head_end + (s.end - s.head_end) / V * V;
  return s;
}

// Does the NaN-free max |x| of a unit exceed the clamp bound? float16/bfloat16/float32 compare
// against the bound rounded to float32 (what the element-wise comparison uses), float64 exactly.
template <typename T>
__device__ __forceinline__ bool beyond(double max_free, double bound) {
  return max_free > static_cast<double>(__double2float_rn(bound));
}
template <>
__device__ __forceinline__ bool beyond<double>(double max_free, double bound) {
  return max_free > bound;
}

// Clamp a unit to [-bound, bound]; elements within keep their bits (NaN stays NaN); a vector is
// stored only if one of its elements changed.
template <typename T>
__device__ __noinline__ void clamp_unit(T* p, const Span& s, int lane, double bound) {
  constexpr int V = Traits<T>::V;
  const float bf = __double2float_rn(bound);
  const T hi = from_float(T{}, bf), lo = from_float(T{}, -bf);
  const unsigned short hib = bits16(T{}, bf), lob = bits16(T{}, -bf);
  for_span(
      p, s, lane,
      [&](int64_t i) {
        const float x = to_acc(gload(p + i));
        if (x > bf) gstore(p + i, hi);
        if (x < -bf) gstore(p + i, lo);
      },
      [&](const Vec& v, int64_t k) {
        Vec w = v;
        bool changed = false;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float x = vec_get<T>(v, j);
          if (x > bf) {
            w.h[j] = hib;
            changed = true;
          }
          if (x < -bf) {
            w.h[j] = lob;
            changed = true;
          }
        }
        if (changed) gstore_vec(vec_ptr(p, s, k), w.u);
      });
}
template <>
__device__ __noinline__ void clamp_unit<float>(float* p, const Span& s, int lane, double bound) {
  const float bf = __double2float_rn(bound);
  for_span(
      p, s, lane,
      [&](int64_t i) {
        const float x = gload(p + i);
        if (x > bf) gstore(p + i, bf);
        if (x < -bf) gstore(p + i, -bf);
      },
      [&](const Vec& v, int64_t k) {
        Vec w = v;
        bool changed = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (v.f[j] > bf) {
            w.f[j] = bf;
            changed = true;
          }
          if (v.f[j] < -bf) {
            w.f[j] = -bf;
            changed = true;
          }
        }
        if (changed) gstore_vec(vec_ptr(p, s, k), w.u);
      });
}
template <>
__device__ __noinline__ void clamp_unit<double>(double* p, const Span& s, int lane, double bound) {
  for_span(
      p, s, lane,
      [&](int64_t i) {
        const double x = gload(p + i);
        if (x > bound) gstore(p + i, bound);
        if (x < -bound) gstore(p + i, -bound);
      },
      [&](const Vec& v, int64_t k) {
        Vec w = v;
        bool changed = false;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (v.d[j] > bound) {
            w.d[j] = bound;
            changed = true;
          }
          if (v.d[j] < -bound) {
            w.d[j] = -bound;
            changed = true;
          }
        }
        if (changed) gstore_vec(vec_ptr(p, s, k), w.u);
      });
}

// ------------------------------------------------------------------------ reduce a unit --

// p = 1, 2, inf.
template <typename T, bool kL1>
__device__ __noinline__ void reduce_unit(const TensorDesc d, int64_t local, int lane, int32_t mode,
                                         double bound, UnitRecord* out) {
  T* p = reinterpret_cast<T*>(d.ptr);
  const Span s = unit_span<T>(d, local);
  const SpanStats q = span_stats_l12<T, kL1>(p, s, lane);
  const bool clamp =
      (mode == kClipValue || mode == kClipValueDeferred) && beyond<T>(q.max_free, bound);
  if (lane == 0) {
    out->sum = q.sum;
    out->max_abs = q.max_abs;
    out->nonfinite = static_cast<int32_t>(q.nonfinite);
    out->clamp = clamp ? 1 : 0;
  }
  if (clamp && mode == kClipValue) clamp_unit(p, s, lane, bound);
}

// Any other p: |x|^p in double, non-finite elements counted in the same pass.
template <typename T>
__device__ __noinline__ void reduce_unit_lp(const TensorDesc d, int64_t local, int lane,
                                            int32_t mode, double np, double bound,
                                            UnitRecord* out) {
  T* p = reinterpret_cast<T*>(d.ptr);
  const Span s = unit_span<T>(d, local);
  const SpanStats q = span_stats_lp<T>(p, s, lane, np);
  const bool clamp =
      (mode == kClipValue || mode == kClipValueDeferred) && beyond<T>(q.max_free, bound);
  if (lane == 0) {
    out->sum = q.sum;
    out->max_abs = q.max_abs;
    out->nonfinite = static_cast<int32_t>(q.nonfinite);
    out->clamp = clamp ? 1 : 0;
  }
  if (clamp && mode == kClipValue) clamp_unit(p, s, lane, bound);
}

template <typename T>
__device__ __forceinline__ void reduce_unit_any(const Params& P, const TensorDesc& d,
                                                int64_t local, int lane, double bound,
                                                UnitRecord* out) {
  if (P.kind == kLp) {
    reduce_unit_lp<T>(d, local, lane, P.mode, P.p, bound, out);
  } else if (P.kind == kL1) {
    reduce_unit<T, true>(d, local, lane, P.mode, bound, out);
  } else {
    reduce_unit<T, false>(d, local, lane, P.mode, bound, out);
  }
}

// Sum of (|x| / scale)^p over a whole tensor, by one warp: the overflow/underflow rescue.
template <typename T>
__device__ __noinline__ double tensor_rescaled_sum(const TensorDesc d, double np, double scale,
                                                   int lane) {
  constexpr int V = Traits<T>::V;
  T* p = reinterpret_cast<T*>(d.ptr);
  double acc = 0.0;
  auto add = [&](double x) {
    const double a = __ddiv_rn(fabs(x), scale);
    acc = __dadd_rn(acc, np == 2.0 ? __dmul_rn(a, a) : (np == 1.0 ? a : pow(a, np)));
  };
  for (int64_t u = 0; u < d.num_units; ++u) {
    const Span s = unit_span<T>(d, u);
    for_span(
        p, s, lane, [&](int64_t i) { add(static_cast<double>(to_acc(gload(p + i)))); },
        [&](const Vec& v, int64_t) {
#pragma unroll
          for (int j = 0; j < V; ++j) add(static_cast<double>(vec_get<T>(v, j)));
        });
  }
  return warp_sum(acc);
}

__device__ double rescaled_sum(const TensorDesc& d, double np, double scale, int lane) {
  switch (d.dtype) {
    case kHalf: return tensor_rescaled_sum<__half>(d, np, scale, lane);
    case kBFloat16: return tensor_rescaled_sum<__nv_bfloat16>(d, np, scale, lane);
    case kFloat: return tensor_rescaled_sum<float>(d, np, scale, lane);
    default: return tensor_rescaled_sum<double>(d, np, scale, lane);
  }
}

// ----------------------------------------------------------------------------- finishing --


// min(1, bound / (norm + eps)), NaN kept (as torch.clamp(max=1) keeps it).
__device__ __forceinline__ double clip_coef(double bound, double norm, double eps) {
  const double c = __ddiv_rn(bound, __dadd_rn(norm, eps));
  return (c < 1.0 || isnan(c)) ? c : 1.0;
}

__device__ void write_tensor(const Params& P, int32_t orig, const TensorRecord& r) {
  P.tensors[orig] = r;
  store_out(P.out_norms, orig, r.norm, P.out_double != 0);
  store_out(P.out_max_abs, orig, r.max_abs, P.out_double != 0);
  P.out_nonfinite[orig] = r.nonfinite;
}

// One warp: combine the unit partials of a tensor (fixed order), rescue, write its results.
__device__ __noinline__ void finalize_tensor(const Params& P, const TensorDesc d, int lane,
                                             double bound) {
  const UnitRecord* rec = P.units + d.first_unit;
  const int64_t n = d.num_units;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, m = 0.0;
  long long count = 0;
  bool nan = false;
  auto take = [&](int64_t k, double& acc) {
    acc = __dadd_rn(acc, __ldcg(&rec[k].sum));
    const double um = __ldcg(&rec[k].max_abs);
    nan = nan || isnan(um);
    m = um > m ? um : m;
    count += __ldcg(&rec[k].nonfinite);
  };
  // Lane l takes units l, l + 32, ... into four accumulators in turn (independent chains).
  for (int64_t k = lane; k < n; k += 128) {
    take(k, s0);
    if (k + 32 < n) take(k + 32, s1);
    if (k + 64 < n) take(k + 64, s2);
    if (k + 96 < n) take(k + 96, s3);
  }
  TensorRecord r;
  r.sum = warp_sum(__dadd_rn(__dadd_rn(s0, s1), __dadd_rn(s2, s3)));
  r.nonfinite = warp_sum(count);
  r.max_abs = __any_sync(kFull, nan) ? nan64() : warp_max(m);
  if (P.kind == kLinf) {
    r.norm = r.max_abs;
  } else {
    const bool overflowed = isinf(r.sum) && r.nonfinite == 0;
    const bool underflowed = r.sum < kTinySum && r.max_abs > 0.0;
    double scale = 1.0;
    if ((overflowed || underflowed) && isfinite(r.max_abs)) {
      scale = r.max_abs;
      r.sum = rescaled_sum(d, P.p, scale, lane);
    }
    r.norm = root(r.sum, scale, P.kind, P.p);
    if (scale != 1.0) r.sum = inf64();  // only the norm is valid
  }
  r.coef = P.mode == kNormalize ? __ddiv_rn(bound, __dadd_rn(r.norm, P.eps))
                                 : clip_coef(bound, r.norm, P.eps);
  r.write = 0;
  if (P.mode == kClipPerLayer || P.mode == kNormalize) {
    r.write = !(r.coef == 1.0);  // a coefficient of exactly 1 is not written; NaN is
  } else if (P.mode == kClipValue || P.mode == kClipValueDeferred) {
    bool any = false;
    for (int64_t k = lane; k < n; k += 32) any = any || __ldcg(&rec[k].clamp) != 0;
    r.write = __any_sync(kFull, any);
  }
  if (lane == 0) write_tensor(P, d.orig, r);
}

// One warp, once per call: zero-size tensors' results, the total norm, the global coefficient.
__device__ __noinline__ void finalize_all(const Params& P, int lane, double bound) {
  for (int t = P.num_work + lane; t < P.num_tensors; t += 32) {
    TensorRecord r;
    r.sum = 0.0;
    r.norm = 0.0;
    r.max_abs = 0.0;
    r.coef = clip_coef(bound, 0.0, P.eps);
    r.nonfinite = 0;
    r.write = 0;
    write_tensor(P, P.table[t].orig, r);
  }
  __syncwarp();
  __threadfence();
  const int T = P.num_tensors;
  const TensorRecord* R = P.tensors;
  double m = 0.0;
  bool nan = false;
  bool write = false;
  for (int i = lane; i < T; i += 32) {
    const double x = __ldcg(&R[i].norm);
    nan = nan || isnan(x);
    m = x > m ? x : m;
    write = write || __ldcg(reinterpret_cast<const long long*>(&R[i].write)) != 0;
  }
  nan = __any_sync(kFull, nan);
  m = warp_max(m);
  write = __any_sync(kFull, write);
  double total;
  if (nan) {
    total = nan64();
  } else if (P.kind == kLinf || isinf(m)) {
    total = m;
  } else {
    double s0 = 0.0, s1 = 0.0;
    for (int i = lane; i < T; i += 64) {
      s0 = __dadd_rn(s0, __ldcg(&R[i].sum));
      if (i + 32 < T) s1 = __dadd_rn(s1, __ldcg(&R[i + 32].sum));
    }
    double s = warp_sum(__dadd_rn(s0, s1));
    const bool exact = isfinite(s) && !(s < kTinySum && m > 0.0);
    if (!exact) {  // a tensor was rescued, or the sum itself over/underflows: from the norms
      s0 = 0.0;
      s1 = 0.0;
      for (int i = lane; i < T; i += 64) {
        s0 = __dadd_rn(s0, power(__ddiv_rn(__ldcg(&R[i].norm), m), P.kind, P.p));
        if (i + 32 < T) {
          s1 = __dadd_rn(s1, power(__ddiv_rn(__ldcg(&R[i + 32].norm), m), P.kind, P.p));
        }
      }
      s = warp_sum(__dadd_rn(s0, s1));
    }
    total = root(s, exact ? 1.0 : m, P.kind, P.p);
  }
  if (lane == 0) {
    const double coef = clip_coef(bound, total, P.eps);
    P.global->total = total;
    P.global->coef = coef;
    P.global->scale = P.mode == kClipNorm ? !(coef >= 1.0) : (write ? 1 : 0);
    store_out(P.out_total, 0, total, P.out_double != 0);
  }
}

// ---------------------------------------------------------------------------- kernels --

__device__ __forceinline__ int find_tensor(const Params& P, int64_t u) {
  int lo = 0, hi = P.num_work - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (P.table[mid].first_unit <= u) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ double read_bound(const Params& P) {
  return P.bound_ptr != nullptr ? *P.bound_ptr : P.bound_value;
}

template <typename T>
__device__ __forceinline__ void write_unit(const Params& P, const TensorDesc& d, int64_t local,
                                           int lane, double coef, double bound) {
  T* p = reinterpret_cast<T*>(d.ptr);
  const Span s = unit_span<T>(d, local);
  if (P.mode == kClipValueDeferred) {
    clamp_unit(p, s, lane, bound);
  } else {
    scale_unit(p, s, lane, coef);
  }
}

}  // namespace

__global__ void __launch_bounds__(kThreads, 3) reduce_kernel(const __grid_constant__ Params P) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const double bound = P.mode == kStats ? 0.0 : read_bound(P);
  if (P.num_work == 0) {  // only zero-size tensors
    if (warp == 0) finalize_all(P, lane, bound);
    return;
  }
  for (int64_t u = warp; u < P.total_units; u += warps) {
    const int t = find_tensor(P, u);
    const TensorDesc d = P.table[t];
    const int64_t local = u - d.first_unit;
    UnitRecord* rec = P.units + u;
    switch (d.dtype) {
      case kHalf: reduce_unit_any<__half>(P, d, local, lane, bound, rec); break;
      case kBFloat16: reduce_unit_any<__nv_bfloat16>(P, d, local, lane, bound, rec); break;
      case kFloat: reduce_unit_any<float>(P, d, local, lane, bound, rec); break;
      default: reduce_unit_any<double>(P, d, local, lane, bound, rec); break;
    }
    // Last-block-done hand-off (arrive_last: release before the count, acquire after it): the
    // warp that completes a tensor sees every record of it, the one that completes the last
    // tensor sees every tensor's result.
    if (!arrive_last<int32_t>(&P.tensor_done[t], 1, static_cast<int32_t>(d.num_units), lane)) {
      continue;
    }
    finalize_tensor(P, d, lane, bound);
    if (arrive_last<int32_t>(P.all_done, 1, P.num_work, lane)) finalize_all(P, lane, bound);
  }
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const __grid_constant__ Params P) {
  if (P.global->scale == 0) return;  // a healthy step: nothing to write
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const double gcoef = P.global->coef;
  const double bound = P.mode == kClipValueDeferred ? read_bound(P) : 0.0;
  const int64_t n = P.scale_end - P.scale_begin;
  for (int64_t k = warp; k < n; k += warps) {
    const int64_t u = P.scale_end - 1 - k;  // reverse: the last units read are still in L2
    const int t = find_tensor(P, u);
    const TensorDesc d = P.table[t];
    double coef = gcoef;
    if (P.mode == kClipPerLayer || P.mode == kNormalize) {
      const TensorRecord& r = P.tensors[d.orig];
      if (r.write == 0) continue;
      coef = r.coef;
    } else if (P.mode == kClipValueDeferred) {
      if (P.units[u].clamp == 0) continue;
    }
    const int64_t local = u - d.first_unit;
    switch (d.dtype) {
      case kHalf: write_unit<__half>(P, d, local, lane, coef, bound); break;
      case kBFloat16: write_unit<__nv_bfloat16>(P, d, local, lane, coef, bound); break;
      case kFloat: write_unit<float>(P, d, local, lane, coef, bound); break;
      default: write_unit<double>(P, d, local, lane, coef, bound); break;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    writeback_kernel(const __grid_constant__ WritebackParams W) {
  const bool go = W.flag32 != nullptr ? *W.flag32 != 0 : *W.flag64 != 0;
  if (!go) return;  // nothing changed: the strided gradient is not written
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < W.numel;
       i += step) {
    int64_t rem = i, off = 0;
    for (int d = W.ndim - 1; d >= 0; --d) {
      off += rem % W.sizes[d] * W.strides[d];
      rem /= W.sizes[d];
    }
    switch (W.elem_size) {
      case 2:
        gstore(static_cast<uint16_t*>(W.dst) + off, gload(static_cast<const uint16_t*>(W.src) + i));
        break;
      case 4:
        gstore(static_cast<uint32_t*>(W.dst) + off, gload(static_cast<const uint32_t*>(W.src) + i));
        break;
      default:
        gstore(static_cast<uint64_t*>(W.dst) + off, gload(static_cast<const uint64_t*>(W.src) + i));
        break;
    }
  }
}

}  // namespace cuda
}  // namespace gradstab
