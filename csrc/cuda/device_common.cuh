// Contract: device building blocks shared by the CUDA kernel files (norm_kernels.cu,
// agc_kernels.cu): element access for float16/bfloat16/float32/float64, correctly rounded
// arithmetic that is never contracted into FMAs, fixed-order warp reductions, the walk over a
// span of elements (scalar head up to the first 16-byte aligned element, 16-byte vectors,
// scalar tail), the exact double redo of a span's sum, the exact non-finite count, a span's
// statistics in one read (span_stats_l12 / span_stats_lp), a norm from its sum (root / power),
// result stores, and scaling with the CPU kernel's rounding. Plain CUDA, no torch headers;
// everything has internal linkage (an anonymous namespace), so each kernel file gets its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common/codes.h"
#include "common/scale_rule.h"

namespace gradstab {
namespace cuda {
namespace {

constexpr int kUnroll = 8;            // 16-byte vectors in flight per lane (hot passes)
constexpr int kUnrollRare = 2;        // the same for the rare passes (less code)
constexpr double kTinyUnit = 1e-30;   // float32 unit sums below this are redone in double
constexpr double kTinySum = 1e-280;   // double sums below this may have lost terms to underflow
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ double nan64() { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ double inf64() { return __longlong_as_double(0x7ff0000000000000LL); }

// A p-norm from its sum of p-powers `s` of values divided by `scale` (1: not rescaled), and
// the p-th power of a norm; kind is a NormKind (common/codes.h), np the order for kLp.
__device__ __forceinline__ double root(double s, double scale, int32_t kind, double np) {
  if (kind == kL2) return __dmul_rn(scale, sqrt(s));
  if (kind == kL1) return __dmul_rn(scale, s);
  return __dmul_rn(scale, pow(s, __ddiv_rn(1.0, np)));
}

__device__ __forceinline__ double power(double a, int32_t kind, double np) {
  return kind == kL2 ? __dmul_rn(a, a) : (kind == kL1 ? a : pow(a, np));
}

// A result into a float64 (dbl) or float32 output array.
__device__ __forceinline__ void store_out(void* base, int64_t i, double v, bool dbl) {
  if (dbl) {
    static_cast<double*>(base)[i] = v;
  } else {
    static_cast<float*>(base)[i] = __double2float_rn(v);
  }
}

// ------------------------------------------------------------------------ element access --

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using Acc = float;
  static constexpr int V = 4;
};
template <>
struct Traits<__half> {
  using Acc = float;
  static constexpr int V = 8;
};
template <>
struct Traits<__nv_bfloat16> {
  using Acc = float;
  static constexpr int V = 8;
};
template <>
struct Traits<double> {
  using Acc = double;
  static constexpr int V = 2;
};

// 16 bytes of data as whatever the element type is.
union Vec {
  uint4 u;
  float f[4];
  double d[2];
  unsigned short h[8];
};

// ------------------------------------------------------------------ global data accesses --
// Every load and store of gradient/parameter data in the kernel files goes through these. Under
// nvcc they are the plain accesses (gload_vec: ld.global.cg, cached in L2 only, for streaming
// data). The CPU execution harness (csrc/testing/cuda_sim, which defines GRADSTAB_CUDA_SIM)
// checks each one before doing it: inside the bytes of a tensor it registered, naturally
// aligned (16 bytes for a vector, as the GPU requires); the caller's file and line name it.
#if defined(GRADSTAB_CUDA_SIM)
template <typename T>
inline T gload(const T* p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::gs_sim::global_load(p, file, line);
}
template <typename T>
inline void gstore(T* p, T v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::gs_sim::global_store(p, v, file, line);
}
inline uint4 gload_vec(const uint4* p, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  return ::gs_sim::global_load(p, file, line);
}
inline void gstore_vec(uint4* p, uint4 v, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::gs_sim::global_store(p, v, file, line);
}
// A flag several warps may set while others read it (volatile: relaxed, never a data race).
inline int32_t load_flag(const int32_t* p) { return ::gs_sim::relaxed_load(p); }
inline void store_flag(int32_t* p, int32_t v) { ::gs_sim::relaxed_store(p, v); }
#else
template <typename T>
__device__ __forceinline__ T gload(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void gstore(T* p, T v) {
  *p = v;
}
__device__ __forceinline__ uint4 gload_vec(const uint4* p) { return __ldcg(p); }
__device__ __forceinline__ void gstore_vec(uint4* p, uint4 v) { *p = v; }
// A flag several warps may set while others read it (volatile: relaxed, never a data race).
__device__ __forceinline__ int32_t load_flag(const int32_t* p) {
  return *static_cast<const volatile int32_t*>(p);
}
__device__ __forceinline__ void store_flag(int32_t* p, int32_t v) {
  *static_cast<volatile int32_t*>(p) = v;
}
#endif

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ typename Traits<T>::Acc vec_get(const Vec& v, int j);
template <>
__device__ __forceinline__ float vec_get<float>(const Vec& v, int j) {
  return v.f[j];
}
template <>
__device__ __forceinline__ double vec_get<double>(const Vec& v, int j) {
  return v.d[j];
}
template <>
__device__ __forceinline__ float vec_get<__half>(const Vec& v, int j) {
  return __half2float(__ushort_as_half(v.h[j]));
}
template <>
__device__ __forceinline__ float vec_get<__nv_bfloat16>(const Vec& v, int j) {
  return __uint_as_float(static_cast<unsigned>(v.h[j]) << 16);  // exact
}

// Element bits of a value rounded (to nearest even) to T, for 16-bit types.
__device__ __forceinline__ unsigned short bits16(__half, float x) {
  return __half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ unsigned short bits16(__nv_bfloat16, float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ __half from_float(__half, float x) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_float(__nv_bfloat16, float x) {
  return __float2bfloat16_rn(x);
}

// Correctly rounded arithmetic, never contracted into FMAs (whatever the compiler flags).
__device__ __forceinline__ float radd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double radd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float rabs(float x) { return fabsf(x); }
__device__ __forceinline__ double rabs(double x) { return fabs(x); }

// ------------------------------------------------------------------------ warp reductions --
// xor butterflies: every lane ends with the same bits (addition is commutative).

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
// Max of NaN-free values.
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    A w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// ------------------------------------------------------------------------------ spans --

// The elements of one unit: a scalar head [begin, head_end) up to the first 16-byte aligned
// element, whole 16-byte vectors [head_end, body_end), a scalar tail [body_end, end).
struct Span {
  int64_t begin;
  int64_t head_end;
  int64_t body_end;
  int64_t end;
};

// Visits the unit: scalar(i) for the head and tail elements of this lane, vec(v, k) for the
// body vectors of this lane (k: vector index from head_end), group() after every kU vectors.
// Lane l takes head/tail elements l, l + 32, ... and body vectors l, l + 32, ...; kU vectors are
// loaded before any is used.
template <int kU, typename T, typename ScalarFn, typename VecFn, typename GroupFn>
__device__ __forceinline__ void for_span_grouped(T* p, const Span& s, int lane, ScalarFn&& scalar,
                                                 VecFn&& vec, GroupFn&& group) {
  constexpr int V = Traits<T>::V;
  for (int64_t i = s.begin + lane; i < s.head_end; i += 32) scalar(i);
  const int64_t nvec = (s.body_end - s.head_end) / V;
  const uint4* vp = reinterpret_cast<const uint4*>(p + s.head_end);
  for (int64_t k0 = 0; k0 < nvec; k0 += 32 * kU) {
    Vec r[kU];
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int64_t k = k0 + q * 32 + lane;
      if (k < nvec) {
        r[q].u = gload_vec(vp + k);  // 16-byte global load, cached in L2 only
      } else {
        r[q].u = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int64_t k = k0 + q * 32 + lane;
      if (k < nvec) vec(r[q], k);
    }
    group();
  }
  for (int64_t i = s.body_end + lane; i < s.end; i += 32) scalar(i);
}

template <int kU = kUnrollRare, typename T, typename ScalarFn, typename VecFn>
__device__ __forceinline__ void for_span(T* p, const Span& s, int lane, ScalarFn&& scalar,
                                         VecFn&& vec) {
  for_span_grouped<kU>(p, s, lane, scalar, vec, [] {});
}

template <typename T>
__device__ __forceinline__ uint4* vec_ptr(T* p, const Span& s, int64_t k) {
  return reinterpret_cast<uint4*>(p + s.head_end) + k;
}

// ------------------------------------------------------------------------- unit passes --

// Sum of |x| (kL1) or x^2 in double, one accumulator per lane: the exact redo of a unit.
template <typename T, bool kL1>
__device__ __noinline__ double unit_sum_double(T* p, const Span& s, int lane) {
  constexpr int V = Traits<T>::V;
  double acc = 0.0;
  auto add = [&](double x) {
    const double a = fabs(x);
    acc = __dadd_rn(acc, kL1 ? a : __dmul_rn(a, a));
  };
  for_span(
      p, s, lane, [&](int64_t i) { add(static_cast<double>(to_acc(gload(p + i)))); },
      [&](const Vec& v, int64_t) {
#pragma unroll
        for (int j = 0; j < V; ++j) add(static_cast<double>(vec_get<T>(v, j)));
      });
  return warp_sum(acc);
}

// Exact count of NaN/Inf elements and the NaN-propagating max |x| of a unit.
template <typename T>
__device__ __noinline__ void unit_count_nonfinite(T* p, const Span& s, int lane, int32_t* count,
                                     double* max_abs) {
  constexpr int V = Traits<T>::V;
  long long n = 0;
  bool nan = false;
  double m = 0.0;
  auto look = [&](double x) {
    if (!isfinite(x)) {
      ++n;
      nan = nan || isnan(x);
    }
    const double a = fabs(x);
    m = a > m ? a : m;
  };
  for_span(
      p, s, lane, [&](int64_t i) { look(static_cast<double>(to_acc(gload(p + i)))); },
      [&](const Vec& v, int64_t) {
#pragma unroll
        for (int j = 0; j < V; ++j) look(static_cast<double>(vec_get<T>(v, j)));
      });
  n = warp_sum(n);
  nan = __any_sync(kFull, nan);
  m = warp_max(m);
  *count = static_cast<int32_t>(n);
  *max_abs = nan ? nan64() : m;
}

// ---------------------------------------------------------------------- span statistics --

// What one warp learns from one read of a span: the sum of |x|^p (double), the NaN-free max
// |x| (what a clamp decision uses), the max |x| with NaN propagated, and the NaN/Inf count.
struct SpanStats {
  double sum;
  double max_free;
  double max_abs;
  long long nonfinite;
};

// p = 1 (kL1) or 2 (also used for inf, whose norm is the max). Per lane: one accumulator per
// vector lane (float32 for 16/32-bit data), flushed in a fixed order into a double after every
// kUnroll vectors, so a float32 partial sums at most kUnroll terms (plus the few head
// elements). A float32-based sum that is non-finite or below kTinyUnit is redone in double; a
// non-finite sum makes the warp count the NaN/Inf and take the NaN-propagating max.
template <typename T, bool kL1>
__device__ __forceinline__ SpanStats span_stats_l12(T* p, const Span& s, int lane) {
  using Acc = typename Traits<T>::Acc;
  constexpr int V = Traits<T>::V;
  Acc acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = Acc(0);
  Acc m = Acc(0);
  double lane_sum = 0.0;
  auto add = [&](Acc& a, Acc x) {
    const Acc ax = rabs(x);
    a = radd(a, kL1 ? ax : rmul(ax, ax));
    m = ax > m ? ax : m;  // a NaN never enters
  };
  auto flush = [&] {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      lane_sum = __dadd_rn(lane_sum, static_cast<double>(acc[j]));
      acc[j] = Acc(0);
    }
  };
  for_span_grouped<kUnroll>(
      p, s, lane, [&](int64_t i) { add(acc[0], to_acc(gload(p + i))); },
      [&](const Vec& v, int64_t) {
#pragma unroll
        for (int j = 0; j < V; ++j) add(acc[j], vec_get<T>(v, j));
      },
      flush);
  flush();
  SpanStats q;
  q.sum = warp_sum(lane_sum);
  q.max_free = static_cast<double>(warp_max(m));
  if (sizeof(Acc) == 4 &&
      (!(q.sum <= DBL_MAX) || (!kL1 && q.sum < kTinyUnit && q.max_free > 0.0))) {
    q.sum = unit_sum_double<T, kL1>(p, s, lane);  // float32 lanes overflowed or underflowed
  }
  // Separate scalars for the out-of-line count (an address taken of a field of q would put q
  // in local memory).
  double max_abs = q.max_free;
  int32_t count = 0;
  if (!(q.sum <= DBL_MAX)) unit_count_nonfinite(p, s, lane, &count, &max_abs);
  q.max_abs = max_abs;
  q.nonfinite = count;
  return q;
}

// Any other p: |x|^p in double, non-finite elements counted in the same pass.
template <typename T>
__device__ __forceinline__ SpanStats span_stats_lp(T* p, const Span& s, int lane, double np) {
  constexpr int V = Traits<T>::V;
  double acc = 0.0, m = 0.0;
  long long n = 0;
  bool nan = false;
  auto add = [&](double x) {
    const double a = fabs(x);
    acc = __dadd_rn(acc, pow(a, np));
    if (!isfinite(x)) {
      ++n;
      nan = nan || isnan(x);
    }
    m = a > m ? a : m;
  };
  for_span(
      p, s, lane, [&](int64_t i) { add(static_cast<double>(to_acc(gload(p + i)))); },
      [&](const Vec& v, int64_t) {
#pragma unroll
        for (int j = 0; j < V; ++j) add(static_cast<double>(vec_get<T>(v, j)));
      });
  SpanStats q;
  q.sum = warp_sum(acc);
  q.max_free = warp_max(m);
  q.nonfinite = warp_sum(n);
  q.max_abs = __any_sync(kFull, nan) ? nan64() : q.max_free;
  return q;
}

// ------------------------------------------------------------------ last-arriver hand-off --

// Adds `n` to *counter for the calling warp (every lane calls it, converged); true in every lane
// of the warp whose addition brings the counter to `total`. Memory ordering (PTX model):
//   * release: __syncwarp() makes every lane's earlier writes (records, clamped data) precede
//     lane 0's __threadfence() (fence.sc, cumulative), which precedes the atomic add;
//   * acquire: the last arriver's lane 0 fences again after its add (which read every earlier
//     warp's add in the counter's modification order), and the final __syncwarp() orders
//     lanes 1-31 after that fence: a shuffle alone carries the value but orders no memory.
// Every warp that reads what the others published goes through this function.
template <typename C>
__device__ __forceinline__ bool arrive_last(C* counter, C n, C total, int lane) {
  __syncwarp();
  int last = 0;
  if (lane == 0) {
    __threadfence();
    last = atomicAdd(counter, n) + n == total;
    if (last) __threadfence();
  }
  last = __shfl_sync(kFull, last, 0);
  __syncwarp();
  return last != 0;
}

// float32 elements of a span times a coefficient: mul(x) for every element.
template <typename Mul>
__device__ __forceinline__ void scale_floats(float* p, const Span& s, int lane, const Mul& mul) {
  for_span<kUnroll>(
      p, s, lane, [&](int64_t i) { gstore(p + i, mul(gload(p + i))); },
      [&](const Vec& v, int64_t k) {
        Vec w;
#pragma unroll
        for (int j = 0; j < 4; ++j) w.f[j] = mul(v.f[j]);
        gstore_vec(vec_ptr(p, s, k), w.u);
      });
}

template <typename T>
__device__ __noinline__ void scale_unit(T* p, const Span& s, int lane, double coef) {
  constexpr int V = Traits<T>::V;
  const float cf = __double2float_rn(coef);
  for_span<kUnroll>(
      p, s, lane,
      [&](int64_t i) { gstore(p + i, from_float(T{}, __fmul_rn(to_acc(gload(p + i)), cf))); },
      [&](const Vec& v, int64_t k) {
        Vec w;
#pragma unroll
        for (int j = 0; j < V; ++j) w.h[j] = bits16(T{}, __fmul_rn(vec_get<T>(v, j), cf));
        gstore_vec(vec_ptr(p, s, k), w.u);
      });
}
template <>
__device__ __noinline__ void scale_unit<float>(float* p, const Span& s, int lane, double coef) {
  if (scales_in_float(coef)) {  // common/scale_rule.h
    const float cf = __double2float_rn(coef);
    scale_floats(p, s, lane, [cf](float x) { return __fmul_rn(x, cf); });
  } else {
    scale_floats(p, s, lane, [coef](float x) {
      return __double2float_rn(__dmul_rn(static_cast<double>(x), coef));
    });
  }
}
template <>
__device__ __noinline__ void scale_unit<double>(double* p, const Span& s, int lane, double coef) {
  for_span<kUnroll>(
      p, s, lane, [&](int64_t i) { gstore(p + i, __dmul_rn(gload(p + i), coef)); },
      [&](const Vec& v, int64_t k) {
        Vec w;
#pragma unroll
        for (int j = 0; j < 2; ++j) w.d[j] = __dmul_rn(v.d[j], coef);
        gstore_vec(vec_ptr(p, s, k), w.u);
      });
}

}  // namespace
}  // namespace cuda
}  // namespace gradstab
