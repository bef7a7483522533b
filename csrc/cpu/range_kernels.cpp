// Contract: see range_kernels.h. Each public entry point is compiled three times by GCC/Clang
// `target_clones` (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline) and the dynamic loader
// picks the best one for the CPU it runs on; all helpers are always_inline so they take the
// clone's instruction set. The hot loops use GCC vector extensions with fixed lane counts, so
// every clone does the same arithmetic in the same order (bit-identical results).
#include "cpu/range_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define GS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GS_CLONES
#endif
#define GS_INLINE inline __attribute__((always_inline))

namespace gradstab {
namespace cpu {
namespace {

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef double vd8 __attribute__((vector_size(64)));
typedef int64_t vl8 __attribute__((vector_size(64)));

constexpr int64_t kBlock = 2048;       // max elements per float32 partial-sum block
constexpr double kTinyBlock = 1e-30;   // float32 block sums below this are redone in double
constexpr double kDblMax = std::numeric_limits<double>::max();

template <typename T>
GS_INLINE float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
GS_INLINE T from_float(float x) {
  return static_cast<T>(x);  // c10::Half / c10::BFloat16 round to nearest even
}

template <typename T>
GS_INLINE vf16 load16(const T* p) {
  vf16 v;
  for (int j = 0; j < 16; ++j) v[j] = to_float(p[j]);
  return v;
}
template <>
GS_INLINE vf16 load16<float>(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
GS_INLINE vd8 load8(const double* p) {
  vd8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

GS_INLINE vf16 vabs(vf16 x) { return (vf16)((vi16)x & 0x7fffffff); }
GS_INLINE vd8 vabs(vd8 x) { return (vd8)((vl8)x & 0x7fffffffffffffffLL); }
// max that never lets a NaN candidate into the accumulator (acc starts at 0, stays NaN-free).
GS_INLINE vf16 vmax_acc(vf16 acc, vf16 x) { return x > acc ? x : acc; }
GS_INLINE vd8 vmax_acc(vd8 acc, vd8 x) { return x > acc ? x : acc; }

GS_INLINE double hsum(vf16 a) {
  double s = 0.0;
  for (int j = 0; j < 16; ++j) s += static_cast<double>(a[j]);
  return s;
}
GS_INLINE double hsum(vd8 a) {
  double s = 0.0;
  for (int j = 0; j < 8; ++j) s += a[j];
  return s;
}
template <typename V>
GS_INLINE double hmax(V a) {
  double m = 0.0;
  for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(a[0])); ++j) {
    m = a[j] > m ? static_cast<double>(a[j]) : m;
  }
  return m;
}

template <typename T>
GS_INLINE double elem_double(T x) {
  return static_cast<double>(to_float(x));
}
template <>
GS_INLINE double elem_double<double>(double x) {
  return x;
}

// Sum of |x| (kL1) or x^2 (otherwise) in double, sequentially: the exact slow path.
template <typename T>
GS_INLINE double sum_double(const T* p, int64_t n, bool l1) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double a = std::fabs(elem_double(p[i]));
    s += l1 ? a : a * a;
  }
  return s;
}

// Exact non-finite count and NaN-propagating max |x|: run only when the fast sum is non-finite.
template <typename T>
GS_INLINE void count_nonfinite(const T* p, int64_t n, Partial& r) {
  int64_t count = 0;
  bool nan = false;
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double x = elem_double(p[i]);
    if (!std::isfinite(x)) {
      ++count;
      nan = nan || std::isnan(x);
    }
    double a = std::fabs(x);
    m = a > m ? a : m;
  }
  r.nonfinite = count;
  r.max_abs = nan ? std::numeric_limits<double>::quiet_NaN() : m;
}

// Clamp p[0..n) to [-bound, bound], compared in float32 for float types (PyTorch's opmath) and
// in double for float64; NaN stays NaN. Branch-free: each 16-element group is re-stored with
// the bound's bits selected where the value lies beyond it (the other elements keep their bits).
template <typename T>
GS_INLINE void clamp_range(T* p, int64_t n, double bound) {
  static_assert(sizeof(T) == 2, "16-bit element types");
  typedef int16_t vs16 __attribute__((vector_size(32)));
  const float bf = static_cast<float>(bound);
  const T hi_t = from_float<T>(bf), lo_t = from_float<T>(-bf);
  int16_t hi, lo;
  std::memcpy(&hi, &hi_t, 2);
  std::memcpy(&lo, &lo_t, 2);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vf16 x = load16(p + i);
    vs16 up = __builtin_convertvector(x > bf, vs16), down = __builtin_convertvector(x < -bf, vs16);
    vs16 raw;
    std::memcpy(&raw, p + i, sizeof raw);
    raw = up ? hi : raw;
    raw = down ? lo : raw;
    std::memcpy(p + i, &raw, sizeof raw);
  }
  for (; i < n; ++i) {
    float x = to_float(p[i]);
    if (x > bf) p[i] = hi_t;
    if (x < -bf) p[i] = lo_t;
  }
}
template <>
GS_INLINE void clamp_range<float>(float* p, int64_t n, double bound) {
  const float bf = static_cast<float>(bound);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vf16 x = load16(p + i);
    x = x > bf ? bf : x;
    x = x < -bf ? -bf : x;
    std::memcpy(p + i, &x, sizeof x);
  }
  for (; i < n; ++i) p[i] = p[i] > bf ? bf : (p[i] < -bf ? -bf : p[i]);
}
template <>
GS_INLINE void clamp_range<double>(double* p, int64_t n, double bound) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vd8 x = load8(p + i);
    x = x > bound ? bound : x;
    x = x < -bound ? -bound : x;
    std::memcpy(p + i, &x, sizeof x);
  }
  for (; i < n; ++i) p[i] = p[i] > bound ? bound : (p[i] < -bound ? -bound : p[i]);
}

// float16 / bfloat16 / float32: float32 lanes per block, blocks added in double.
template <typename T, bool kL1>
GS_INLINE Partial reduce_float_family(T* p, int64_t n, double clamp) {
  Partial r;
  const bool do_clamp = clamp >= 0.0;
  double sum = 0.0;
  double max_abs = 0.0;
  int64_t i = 0;
  const int64_t n_vec = n - n % 64;  // whole 64-element steps; blocks of up to kBlock of them
  for (int64_t len = 0; i < n_vec; i += len) {
    len = std::min(kBlock, n_vec - i);
    const T* q = p + i;
    vf16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, m0 = {}, m1 = {}, m2 = {}, m3 = {};
    for (int64_t s = 0; s < len; s += 64) {
      vf16 x0 = vabs(load16(q + s)), x1 = vabs(load16(q + s + 16));
      vf16 x2 = vabs(load16(q + s + 32)), x3 = vabs(load16(q + s + 48));
      if (kL1) {
        a0 += x0, a1 += x1, a2 += x2, a3 += x3;
      } else {
        a0 += x0 * x0, a1 += x1 * x1, a2 += x2 * x2, a3 += x3 * x3;
      }
      m0 = vmax_acc(m0, x0), m1 = vmax_acc(m1, x1), m2 = vmax_acc(m2, x2), m3 = vmax_acc(m3, x3);
    }
    double block_sum = hsum((a0 + a1) + (a2 + a3));
    double block_max = hmax(vmax_acc(vmax_acc(m0, m1), vmax_acc(m2, m3)));
    // float32 lanes overflowed (or saw Inf/NaN), or squares may have underflowed: redo exactly.
    if (!(block_sum <= kDblMax) || (!kL1 && block_sum < kTinyBlock && block_max > 0.0)) {
      block_sum = sum_double(q, len, kL1);
    }
    sum += block_sum;
    max_abs = block_max > max_abs ? block_max : max_abs;
    if (do_clamp && block_max > static_cast<float>(clamp)) {
      clamp_range(p + i, len, clamp);
      r.wrote = true;
    }
  }
  if (i < n) {
    double tail_max = 0.0;
    for (int64_t k = i; k < n; ++k) {
      double a = std::fabs(elem_double(p[k]));
      sum += kL1 ? a : a * a;
      tail_max = a > tail_max ? a : tail_max;
    }
    max_abs = tail_max > max_abs ? tail_max : max_abs;
    if (do_clamp && tail_max > static_cast<float>(clamp)) {
      clamp_range(p + i, n - i, clamp);
      r.wrote = true;
    }
  }
  r.sum = sum;
  r.max_abs = max_abs;
  if (!(sum <= kDblMax)) count_nonfinite(p, n, r);
  return r;
}

// float64: double lanes; overflow/underflow of the sum is rescued per tensor by the caller.
template <bool kL1>
GS_INLINE Partial reduce_double(double* p, int64_t n, double clamp) {
  Partial r;
  const bool do_clamp = clamp >= 0.0;
  double sum = 0.0;
  double max_abs = 0.0;
  int64_t i = 0;
  const int64_t n_vec = n - n % 32;
  for (int64_t len = 0; i < n_vec; i += len) {
    len = std::min(kBlock, n_vec - i);
    const double* q = p + i;
    vd8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, m0 = {}, m1 = {}, m2 = {}, m3 = {};
    for (int64_t s = 0; s < len; s += 32) {
      vd8 x0 = vabs(load8(q + s)), x1 = vabs(load8(q + s + 8));
      vd8 x2 = vabs(load8(q + s + 16)), x3 = vabs(load8(q + s + 24));
      if (kL1) {
        a0 += x0, a1 += x1, a2 += x2, a3 += x3;
      } else {
        a0 += x0 * x0, a1 += x1 * x1, a2 += x2 * x2, a3 += x3 * x3;
      }
      m0 = vmax_acc(m0, x0), m1 = vmax_acc(m1, x1), m2 = vmax_acc(m2, x2), m3 = vmax_acc(m3, x3);
    }
    sum += hsum((a0 + a1) + (a2 + a3));
    double block_max = hmax(vmax_acc(vmax_acc(m0, m1), vmax_acc(m2, m3)));
    max_abs = block_max > max_abs ? block_max : max_abs;
    if (do_clamp && block_max > clamp) {
      clamp_range(p + i, len, clamp);
      r.wrote = true;
    }
  }
  if (i < n) {
    double tail_max = 0.0;
    for (int64_t k = i; k < n; ++k) {
      double a = std::fabs(p[k]);
      sum += kL1 ? a : a * a;
      tail_max = a > tail_max ? a : tail_max;
    }
    max_abs = tail_max > max_abs ? tail_max : max_abs;
    if (do_clamp && tail_max > clamp) {
      clamp_range(p + i, n - i, clamp);
      r.wrote = true;
    }
  }
  r.sum = sum;
  r.max_abs = max_abs;
  if (!(sum <= kDblMax)) count_nonfinite(p, n, r);
  return r;
}

// Any p: sum of |x|^p in double, element by element (the fused fast paths cover p = 1, 2, inf).
template <typename T>
GS_INLINE Partial reduce_general(T* p, int64_t n, double norm_p, double clamp) {
  Partial r;
  double sum = 0.0;
  double finite_max = 0.0;  // NaN-ignoring: decides whether anything lies beyond the bound
  for (int64_t i = 0; i < n; ++i) {
    double a = std::fabs(elem_double(p[i]));
    sum += std::pow(a, norm_p);
    finite_max = a > finite_max ? a : finite_max;
  }
  count_nonfinite(p, n, r);
  r.sum = sum;
  if (clamp >= 0.0 && finite_max > clamp) {
    clamp_range(p, n, clamp);
    r.wrote = true;
  }
  return r;
}

template <typename T>
GS_INLINE Partial reduce_typed(T* p, int64_t n, NormKind kind, double norm_p, double clamp) {
  if (kind == NormKind::kLp) return reduce_general(p, n, norm_p, clamp);
  if (kind == NormKind::kL1) return reduce_float_family<T, true>(p, n, clamp);
  return reduce_float_family<T, false>(p, n, clamp);
}
template <>
GS_INLINE Partial reduce_typed<double>(double* p, int64_t n, NormKind kind, double norm_p,
                                       double clamp) {
  if (kind == NormKind::kLp) return reduce_general(p, n, norm_p, clamp);
  if (kind == NormKind::kL1) return reduce_double<true>(p, n, clamp);
  return reduce_double<false>(p, n, clamp);
}

template <typename T>
GS_INLINE double rescaled_typed(const T* p, int64_t n, double norm_p, double scale) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double a = std::fabs(elem_double(p[i])) / scale;
    s += norm_p == 2.0 ? a * a : (norm_p == 1.0 ? a : std::pow(a, norm_p));
  }
  return s;
}

template <typename T>
GS_INLINE void scale_typed(T* p, int64_t n, double coef) {
  const float cf = static_cast<float>(coef);
  for (int64_t i = 0; i < n; ++i) p[i] = from_float<T>(to_float(p[i]) * cf);
}
template <>
GS_INLINE void scale_typed<float>(float* p, int64_t n, double coef) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(static_cast<double>(p[i]) * coef);
}
template <>
GS_INLINE void scale_typed<double>(double* p, int64_t n, double coef) {
  for (int64_t i = 0; i < n; ++i) p[i] *= coef;
}

}  // namespace

// ---- ISA-cloned entry points (one per dtype, so the clones inline a single instantiation) ----
namespace detail {
GS_CLONES Partial reduce_half(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_typed(static_cast<c10::Half*>(p), n, k, np, c);
}
GS_CLONES Partial reduce_bf16(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_typed(static_cast<c10::BFloat16*>(p), n, k, np, c);
}
GS_CLONES Partial reduce_f32(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_typed(static_cast<float*>(p), n, k, np, c);
}
GS_CLONES Partial reduce_f64(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_typed(static_cast<double*>(p), n, k, np, c);
}
GS_CLONES void scale_half(void* p, int64_t n, double coef) {
  scale_typed(static_cast<c10::Half*>(p), n, coef);
}
GS_CLONES void scale_bf16(void* p, int64_t n, double coef) {
  scale_typed(static_cast<c10::BFloat16*>(p), n, coef);
}
GS_CLONES void scale_f32(void* p, int64_t n, double coef) {
  scale_typed(static_cast<float*>(p), n, coef);
}
GS_CLONES void scale_f64(void* p, int64_t n, double coef) {
  scale_typed(static_cast<double*>(p), n, coef);
}
}  // namespace detail

Partial reduce_range(DType dtype, void* ptr, int64_t n, NormKind kind, double norm_p,
                     double clamp) {
  switch (dtype) {
    case DType::kHalf: return detail::reduce_half(ptr, n, kind, norm_p, clamp);
    case DType::kBFloat16: return detail::reduce_bf16(ptr, n, kind, norm_p, clamp);
    case DType::kFloat: return detail::reduce_f32(ptr, n, kind, norm_p, clamp);
    case DType::kDouble: return detail::reduce_f64(ptr, n, kind, norm_p, clamp);
  }
  return Partial{};
}

double rescaled_sum(DType dtype, const void* ptr, int64_t n, double norm_p, double scale) {
  switch (dtype) {
    case DType::kHalf: return rescaled_typed(static_cast<const c10::Half*>(ptr), n, norm_p, scale);
    case DType::kBFloat16:
      return rescaled_typed(static_cast<const c10::BFloat16*>(ptr), n, norm_p, scale);
    case DType::kFloat: return rescaled_typed(static_cast<const float*>(ptr), n, norm_p, scale);
    case DType::kDouble: return rescaled_typed(static_cast<const double*>(ptr), n, norm_p, scale);
  }
  return 0.0;
}

void scale_range(DType dtype, void* ptr, int64_t n, double coef) {
  switch (dtype) {
    case DType::kHalf: detail::scale_half(ptr, n, coef); break;
    case DType::kBFloat16: detail::scale_bf16(ptr, n, coef); break;
    case DType::kFloat: detail::scale_f32(ptr, n, coef); break;
    case DType::kDouble: detail::scale_f64(ptr, n, coef); break;
  }
}

const char* selected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return "x86-64-v4 (AVX-512)";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2)";
  return "x86-64 baseline";
#else
  return "portable C++ (no ISA clones on this platform)";
#endif
}

}  // namespace cpu
}  // namespace gradstab
