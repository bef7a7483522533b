// Contract: see range_kernels.h. Every public entry point is compiled for three x86-64 levels
// (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline) as explicit per-level functions, picked
// once by isa_level() (GRADSTAB_CPU_ISA=baseline|x86-64-v3 caps it, for tests and for timing
// each level on one machine). All helpers are always_inline so they take their caller's
// instruction set. The reduction loops use GCC vector extensions with fixed lane counts, so every
// level does the same arithmetic in the same order (bit-identical results; tests/test_ops.py
// compares them); the scale loops are element-wise, so any vector width gives the same bits.
//
// The baseline vectors are 128 bits wide (4 float32 / 2 float64 lanes), the width every x86-64
// ISA has registers for: GCC splits a wider generic vector into scalar code for comparisons and
// selects on an ISA without registers that wide (a 512-bit max ran 5x slower than a plain loop
// on AVX2). The reductions keep 4 sum and 4 max accumulators (16 float32 or 8 float64 lanes).
// The x86-64-v3/v4 float32-family reductions hold the same 16 float32 lanes in two 256-bit
// accumulators (reduce_block_wide): the same elements reach the same lane in the same order, in
// half the instructions.
// A block's lane sums go into 16 float64 lanes, lane by lane (add_lanes), combined once per
// range (hsum16): the per-block work stays a few vector instructions.
#include "cpu/range_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/scale_rule.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define GS_TARGET(arch) __attribute__((target(arch)))
#define GS_HAVE_WIDE 1
#else
#define GS_HAVE_WIDE 0
#endif
#define GS_INLINE inline __attribute__((always_inline))

namespace gradstab {
namespace cpu {
namespace {

typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef uint32_t vu4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));  // float32 lane sums widened (add_lanes)
typedef int64_t vl2 __attribute__((vector_size(16)));
typedef uint16_t vh4 __attribute__((vector_size(8)));
typedef int16_t vs4 __attribute__((vector_size(8)));
// 256-bit forms of the same lanes, used only inside functions compiled for x86-64-v3/v4.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

constexpr int64_t kBlock = 2048;       // max elements per float64 partial-sum block
// Max elements per float32 partial-sum block: 32 per lane of the 16 float32 lanes, so the
// rounding error of a lane's running sum stays within the contract's 1e-6 (docs/design.md;
// measured worst case, a constant-valued block, ~5e-7 for p = 1; 128 per lane reached 1.7e-6).
constexpr int64_t kFloatBlock = 512;
// Software prefetch distance of the reductions: 1 KB ahead of the load. On a 2-core AMD EPYC
// (AVX2) it took a float32 range from 3-8% slower than the same loop without block bookkeeping
// to 3-6% faster (the hardware prefetcher alone leaves the short per-block loops waiting);
// 512 B and 2-4 KB were slower than 1 KB.
constexpr int64_t kPrefetchBytes = 1024;
constexpr double kTinyBlock = 1e-30;   // float32 sums below this per block: redone in double
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
GS_INLINE vf4 load4(const T* p) {
  vf4 v;
  for (int j = 0; j < 4; ++j) v[j] = to_float(p[j]);
  return v;
}
template <>
GS_INLINE vf4 load4<float>(const float* p) {
  vf4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <>
GS_INLINE vf4 load4<c10::BFloat16>(const c10::BFloat16* p) {
  vh4 raw;  // bfloat16 is the upper half of a float32: interleave with zeros, exactly
  std::memcpy(&raw, p, sizeof raw);
  const vh4 zero = {0, 0, 0, 0};
  return (vf4)__builtin_shufflevector(zero, raw, 0, 4, 1, 5, 2, 6, 3, 7);
}
// float16 -> float32, exactly, in integer lanes (GCC scalarises a vector _Float16 conversion):
// rebias the exponent; Inf/NaN get the float32 maximum exponent; subnormals (and zero) are
// formed as 2^-14 * (1 + m / 1024) and 2^-14 subtracted, which is exact.
GS_INLINE vu4 half_bits(const c10::Half* p) {
  vh4 raw;
  std::memcpy(&raw, p, sizeof raw);
  const vh4 zero = {0, 0, 0, 0};
  return (vu4)__builtin_shufflevector(raw, zero, 0, 4, 1, 5, 2, 6, 3, 7);
}
// |x| of float16 bits h (sign already cleared) as float32.
GS_INLINE vf4 half_magnitude(vu4 h) {
  vu4 o = h << 13;                             // exponent and mantissa, in place
  const vu4 e = o & 0x0f800000u;               // the float16 exponent field, shifted
  o += 0x38000000u;                            // exponent bias 15 -> 127
  o += (vu4)(e == 0x0f800000u) & 0x38000000u;  // Inf/NaN: exponent 255
  const vu4 magic = {0x38800000u, 0x38800000u, 0x38800000u, 0x38800000u};  // 2^-14
  const vf4 sub = (vf4)(o + 0x00800000u) - (vf4)magic;
  const vu4 is_sub = (vu4)(e == 0u);
  return (vf4)((is_sub & (vu4)sub) | (~is_sub & o));
}
template <>
GS_INLINE vf4 load4<c10::Half>(const c10::Half* p) {
  const vu4 h = half_bits(p);
  return (vf4)((vu4)half_magnitude(h & 0x7fffu) | ((h & 0x8000u) << 16));
}
// |x| as float32: the reductions' load (float16 skips the sign bit's round trip).
GS_INLINE vd2 load2(const double* p) {
  vd2 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

GS_INLINE vf4 vabs(vf4 x) { return (vf4)((vi4)x & 0x7fffffff); }
GS_INLINE vd2 vabs(vd2 x) { return (vd2)((vl2)x & 0x7fffffffffffffffLL); }
template <typename T>
GS_INLINE vf4 load4_abs(const T* p) {
  return vabs(load4(p));
}
template <>
GS_INLINE vf4 load4_abs<c10::Half>(const c10::Half* p) {
  return half_magnitude(half_bits(p) & 0x7fffu);
}
GS_INLINE void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes);
}
// Lane select as bit operations (mask lanes are all ones or all zeros).
GS_INLINE vf4 vsel(vi4 m, vf4 a, vf4 b) { return (vf4)((m & (vi4)a) | (~m & (vi4)b)); }
GS_INLINE vd2 vsel(vl2 m, vd2 a, vd2 b) { return (vd2)((m & (vl2)a) | (~m & (vl2)b)); }
// max that never lets a NaN candidate into the accumulator (acc starts at 0, stays NaN-free):
// x > acc ? x : acc, which is exactly SSE's maxps(x, acc) (it returns acc when x is NaN).
#if defined(__SSE2__)
GS_INLINE vf4 vmax_acc(vf4 acc, vf4 x) { return __builtin_ia32_maxps(x, acc); }
GS_INLINE vd2 vmax_acc(vd2 acc, vd2 x) { return __builtin_ia32_maxpd(x, acc); }
#else
GS_INLINE vf4 vmax_acc(vf4 acc, vf4 x) { return vsel(x > acc, x, acc); }
GS_INLINE vd2 vmax_acc(vd2 acc, vd2 x) { return vsel(x > acc, x, acc); }
#endif

// Sum of 16 float64 lanes (4 vectors of 4) as a fixed tree (depth 4, not a chain of 16
// dependent adds): the vectors pairwise, then the last vector's lanes pairwise.
GS_INLINE double hsum16(const vd4* d) {
  const vd4 u = (d[0] + d[1]) + (d[2] + d[3]);
  return (u[0] + u[1]) + (u[2] + u[3]);
}
GS_INLINE double hsum(const vd2* a) {
  double s = 0.0;
  for (int h = 0; h < 4; ++h) {
    for (int l = 0; l < 2; ++l) s += a[h][l];
  }
  return s;
}
template <typename V>
GS_INLINE double hmax(const V* a) {
  V m = a[0];
  for (int k = 1; k < 4; ++k) m = vmax_acc(m, a[k]);
  double r = 0.0;
  for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(m[0])); ++j) {
    r = m[j] > r ? static_cast<double>(m[j]) : r;
  }
  return r;
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

// Number of +-Inf elements of p[0..n), counted before a clamp turns them into the bound.
template <typename T>
GS_INLINE int64_t count_inf(const T* p, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += std::isinf(elem_double(p[i])) ? 1 : 0;
  return count;
}

// The statistics' non-finite part after a pass: r.max_abs holds the NaN-ignoring max and
// clamped_inf the Infs that clamping removed; the range is re-read for the rest (NaN survives
// a clamp, unclamped Infs are still there).
template <typename T>
GS_INLINE void finish_nonfinite(const T* p, int64_t n, int64_t clamped_inf, Partial& r) {
  Partial c;
  count_nonfinite(p, n, c);
  r.nonfinite = c.nonfinite + clamped_inf;
  if (std::isnan(c.max_abs)) r.max_abs = c.max_abs;
}

// Clamp p[0..n) to [-bound, bound], compared in float32 for float types (PyTorch's opmath) and
// in double for float64; NaN stays NaN. Branch-free: each 4-element group is re-stored with
// the bound's bits selected where the value lies beyond it (the other elements keep their bits).
template <typename T>
GS_INLINE void clamp_range(T* p, int64_t n, double bound) {
  static_assert(sizeof(T) == 2, "16-bit element types");
  const float bf = static_cast<float>(bound);
  const T hi_t = from_float<T>(bf), lo_t = from_float<T>(-bf);
  int16_t hi, lo;
  std::memcpy(&hi, &hi_t, 2);
  std::memcpy(&lo, &lo_t, 2);
  const vs4 hiv = {hi, hi, hi, hi}, lov = {lo, lo, lo, lo};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    vf4 x = load4(p + i);
    vs4 up = __builtin_convertvector(x > bf, vs4), down = __builtin_convertvector(x < -bf, vs4);
    vs4 raw;
    std::memcpy(&raw, p + i, sizeof raw);
    raw = (up & hiv) | (~up & raw);
    raw = (down & lov) | (~down & raw);
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
  const vf4 hi = {bf, bf, bf, bf}, lo = -hi;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    vf4 x = load4(p + i);
    x = vsel(x > hi, hi, x);
    x = vsel(x < lo, lo, x);
    std::memcpy(p + i, &x, sizeof x);
  }
  for (; i < n; ++i) p[i] = p[i] > bf ? bf : (p[i] < -bf ? -bf : p[i]);
}
template <>
GS_INLINE void clamp_range<double>(double* p, int64_t n, double bound) {
  const vd2 hi = {bound, bound}, lo = -hi;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    vd2 x = load2(p + i);
    x = vsel(x > hi, hi, x);
    x = vsel(x < lo, lo, x);
    std::memcpy(p + i, &x, sizeof x);
  }
  for (; i < n; ++i) p[i] = p[i] > bound ? bound : (p[i] < -bound ? -bound : p[i]);
}

#if GS_HAVE_WIDE
// The 16 float32 lanes of a block as two 256-bit accumulators: lane j of b[h] is lane j % 4 of
// a[2 h + j / 4] of the 128-bit loop, fed the same elements in the same order, so the block's
// sums and maxima are bit-identical to it. Only inlined into x86-64-v3/v4 functions.
template <typename T>
GS_INLINE vf8 load8_abs(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    vf8 v;
    std::memcpy(&v, p, sizeof v);
    return (vf8)((vi8)v & 0x7fffffff);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "float16 goes through the buffer");
    vh8 raw;
    std::memcpy(&raw, p, sizeof raw);
    const vh8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const vf8 v = (vf8)__builtin_shufflevector(zero, raw, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5,
                                               13, 6, 14, 7, 15);
    return (vf8)((vi8)v & 0x7fffffff);
  }
}
// x > acc ? x : acc (a NaN x leaves acc), as vmax_acc lane by lane; exactly vmaxps(x, acc),
// which the compiler emits for it inside the x86-64-v3/v4 functions.
GS_INLINE vf8 vmax_acc8(vf8 acc, vf8 x) { return x > acc ? x : acc; }
template <typename T, bool kL1>
GS_INLINE void reduce_block_wide(const T* q, const float* buf, int64_t len, vf4* a, vf4* m) {
  vf8 b[2] = {}, mb[2] = {};
  for (int64_t s = 0; s < len; s += 16) {
    if constexpr (!std::is_same_v<T, c10::Half>) prefetch_ahead(q + s);
    for (int h = 0; h < 2; ++h) {
      vf8 x;
      if constexpr (std::is_same_v<T, c10::Half>) {
        std::memcpy(&x, buf + s + 8 * h, sizeof x);  // already |x| as float32
      } else {
        x = load8_abs(q + s + 8 * h);
      }
      b[h] += kL1 ? x : x * x;
      mb[h] = vmax_acc8(mb[h], x);
    }
  }
  for (int h = 0; h < 2; ++h) {
    a[2 * h] = __builtin_shufflevector(b[h], b[h], 0, 1, 2, 3);
    a[2 * h + 1] = __builtin_shufflevector(b[h], b[h], 4, 5, 6, 7);
    m[2 * h] = __builtin_shufflevector(mb[h], mb[h], 0, 1, 2, 3);
    m[2 * h + 1] = __builtin_shufflevector(mb[h], mb[h], 4, 5, 6, 7);
  }
}
#endif

// Whether a float32-lane sum of |x|^p over n elements (sum: its lanes added in double, max_abs:
// the largest |x|) may be wrong: a lane overflowed or saw Inf/NaN, or, for squares, the sum is
// so small for n elements that terms may have underflowed while some element is non-zero. The
// threshold grows with n so that what underflow can lose (under 2^-149 per square) stays below
// 1e-12 of the sum. Such a sum is recomputed in double (sum_double).
template <bool kL1>
GS_INLINE bool float_sum_inexact(double sum, double max_abs, int64_t n) {
  const double tiny = kTinyBlock * static_cast<double>(std::max<int64_t>(1, n / kFloatBlock));
  return !(sum <= kDblMax) || (!kL1 && sum < tiny && max_abs > 0.0);
}
// Adds a block's 16 float32 lane sums a[0..4) to 16 float64 lanes d[0..4), lane by lane (one
// vcvtps2pd and one vaddpd per 4 lanes where 256-bit registers exist, two of each elsewhere).
GS_INLINE void add_lanes(vd4* d, const vf4* a) {
  for (int k = 0; k < 4; ++k) d[k] += __builtin_convertvector(a[k], vd4);
}

// float16 / bfloat16 / float32: float32 lanes per block, the blocks' lanes added in double.
template <typename T, bool kL1, bool kWide>
GS_INLINE Partial reduce_float_family(T* p, int64_t n, double clamp) {
  Partial r;
  const bool do_clamp = clamp >= 0.0;
  // A bound that rounds to Inf in T (float16 from 65520, bfloat16 just below FLT_MAX) writes
  // an Inf back as Inf: it stays in the range and is counted when the range is re-read, so only
  // a finite rounded bound removes Infs that must be counted before the clamp.
  const bool clamp_removes_inf =
      do_clamp && std::isfinite(to_float(from_float<T>(static_cast<float>(clamp))));
  // Each block's 16 float32 lane sums are added, lane by lane, into 16 float64 lanes
  // (add_lanes), and its maxima into 16 float32 lanes; the lanes are combined once, at the end
  // (hsum16, hmax). Beyond its loads a block costs a few vector instructions (a horizontal sum
  // and max per 512-element block cost ~10% of the read). Whether float32 lanes overflowed or
  // underflowed is asked once, of the whole range, except where a clamp writes: there each
  // block is asked before it changes.
  vd4 lane_sum[4] = {};
  vf4 lane_max[4] = {};
  double redone = 0.0;      // blocks redone in double (clamping calls only), in block order
  int64_t clamped_inf = 0;  // Infs a clamp replaced by the bound (counted before it)
  const float bound = static_cast<float>(clamp);
  int64_t i = 0;
  const int64_t n_vec = n - n % 16;  // whole 16-element steps; blocks of up to kFloatBlock
  for (int64_t len = 0; i < n_vec; i += len) {
    len = std::min(kFloatBlock, n_vec - i);
    const T* q = p + i;
    vf4 a[4] = {}, m[4] = {};
    // float16: two tight loops (widen the block into an L1 buffer, then reduce float32) instead
    // of one that runs out of vector registers and spills the accumulators.
    alignas(32) float buf[std::is_same_v<T, c10::Half> ? kFloatBlock : 1];
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (int64_t s = 0; s < len; s += 4) {
        const vf4 x = load4_abs(q + s);
        std::memcpy(buf + s, &x, sizeof x);
      }
    }
    if constexpr (kWide) {
      reduce_block_wide<T, kL1>(q, buf, len, a, m);
    } else {
      for (int64_t s = 0; s < len; s += 16) {
        if constexpr (!std::is_same_v<T, c10::Half>) prefetch_ahead(q + s);
        for (int k = 0; k < 4; ++k) {
          const vf4 x = std::is_same_v<T, c10::Half> ? load4(buf + s + 4 * k)
                                                     : load4_abs(q + s + 4 * k);
          a[k] += kL1 ? x : x * x;
          m[k] = vmax_acc(m[k], x);
        }
      }
    }
    for (int k = 0; k < 4; ++k) lane_max[k] = vmax_acc(lane_max[k], m[k]);
    bool block_redone = false;
    if (do_clamp) {
      const double block_max = hmax(m);
      vd4 block_sum[4] = {};
      add_lanes(block_sum, a);
      if (float_sum_inexact<kL1>(hsum16(block_sum), block_max, len)) {
        redone += sum_double(q, len, kL1);
        block_redone = true;
      }
      if (block_max > bound) {
        if (clamp_removes_inf && std::isinf(block_max)) clamped_inf += count_inf(q, len);
        clamp_range(p + i, len, clamp);
        r.wrote = true;
      }
    }
    if (!block_redone) add_lanes(lane_sum, a);
  }
  double sum = hsum16(lane_sum);
  double max_abs = hmax(lane_max);
  if (!do_clamp && float_sum_inexact<kL1>(sum, max_abs, i)) sum = sum_double(p, i, kL1);
  sum += redone;
  if (i < n) {
    double tail_max = 0.0;
    for (int64_t k = i; k < n; ++k) {
      double a = std::fabs(elem_double(p[k]));
      sum += kL1 ? a : a * a;
      tail_max = a > tail_max ? a : tail_max;
    }
    max_abs = tail_max > max_abs ? tail_max : max_abs;
    if (do_clamp && tail_max > static_cast<float>(clamp)) {
      if (clamp_removes_inf && std::isinf(tail_max)) clamped_inf += count_inf(p + i, n - i);
      clamp_range(p + i, n - i, clamp);
      r.wrote = true;
    }
  }
  r.sum = sum;
  r.max_abs = max_abs;
  if (!(sum <= kDblMax)) finish_nonfinite(p, n, clamped_inf, r);
  return r;
}

// float64: double lanes; overflow/underflow of the sum is rescued per tensor by the caller.
template <bool kL1>
GS_INLINE Partial reduce_double(double* p, int64_t n, double clamp) {
  Partial r;
  const bool do_clamp = clamp >= 0.0;
  double sum = 0.0;
  double max_abs = 0.0;
  int64_t clamped_inf = 0;  // Infs a clamp replaced by the bound (counted before it)
  int64_t i = 0;
  const int64_t n_vec = n - n % 8;
  for (int64_t len = 0; i < n_vec; i += len) {
    len = std::min(kBlock, n_vec - i);
    const double* q = p + i;
    vd2 a[4] = {}, m[4] = {};
    for (int64_t s = 0; s < len; s += 8) {
      for (int k = 0; k < 4; ++k) {
        vd2 x = vabs(load2(q + s + 2 * k));
        a[k] += kL1 ? x : x * x;
        m[k] = vmax_acc(m[k], x);
      }
    }
    sum += hsum(a);
    double block_max = hmax(m);
    max_abs = block_max > max_abs ? block_max : max_abs;
    if (do_clamp && block_max > clamp) {
      if (std::isinf(block_max)) clamped_inf += count_inf(q, len);
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
      if (std::isinf(tail_max)) clamped_inf += count_inf(p + i, n - i);
      clamp_range(p + i, n - i, clamp);
      r.wrote = true;
    }
  }
  r.sum = sum;
  r.max_abs = max_abs;
  if (!(sum <= kDblMax)) finish_nonfinite(p, n, clamped_inf, r);
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

template <typename T, bool kWide = false>
GS_INLINE Partial reduce_typed(T* p, int64_t n, NormKind kind, double norm_p, double clamp) {
  if constexpr (std::is_same_v<T, double>) {
    if (kind == NormKind::kLp) return reduce_general(p, n, norm_p, clamp);
    if (kind == NormKind::kL1) return reduce_double<true>(p, n, clamp);
    return reduce_double<false>(p, n, clamp);
  } else {
    if (kind == NormKind::kLp) return reduce_general(p, n, norm_p, clamp);
    if (kind == NormKind::kL1) return reduce_float_family<T, true, kWide>(p, n, clamp);
    return reduce_float_family<T, false, kWide>(p, n, clamp);
  }
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
// float32: the rule of common/scale_rule.h (PyTorch's float32 multiply, in double where the
// coefficient is outside float32's normal range). A double loop converts every element twice
// and ran at half the speed of the float32 loop on an AVX-512 Xeon.
template <>
GS_INLINE void scale_typed<float>(float* p, int64_t n, double coef) {
  if (scales_in_float(coef)) {
    const float cf = static_cast<float>(coef);
    for (int64_t i = 0; i < n; ++i) p[i] *= cf;
    return;
  }
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(static_cast<double>(p[i]) * coef);
}
template <>
GS_INLINE void scale_typed<double>(double* p, int64_t n, double coef) {
  for (int64_t i = 0; i < n; ++i) p[i] *= coef;
}

}  // namespace

// ---- Entry points: one function per dtype and ISA level, picked by isa_level() ----
// Explicit per-level functions rather than `target_clones`: the 256-bit reduction loop needs the
// level known at compile time, and one switch for every kernel lets GRADSTAB_CPU_ISA run (and
// time) the whole backend at a lower level, scaling included.
namespace detail {
namespace {
template <typename T>
GS_INLINE Partial reduce_any(void* p, int64_t n, NormKind k, double np, double c, bool wide) {
  return wide ? reduce_typed<T, true>(static_cast<T*>(p), n, k, np, c)
              : reduce_typed<T, false>(static_cast<T*>(p), n, k, np, c);
}
template <typename T>
Partial reduce_base(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_any<T>(p, n, k, np, c, false);
}
template <typename T>
void scale_base(void* p, int64_t n, double coef) {
  scale_typed(static_cast<T*>(p), n, coef);
}
#if GS_HAVE_WIDE
template <typename T>
GS_TARGET("arch=x86-64-v3") Partial reduce_v3(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_any<T>(p, n, k, np, c, true);
}
template <typename T>
GS_TARGET("arch=x86-64-v4") Partial reduce_v4(void* p, int64_t n, NormKind k, double np, double c) {
  return reduce_any<T>(p, n, k, np, c, true);
}
template <typename T>
GS_TARGET("arch=x86-64-v3") void scale_v3(void* p, int64_t n, double coef) {
  scale_typed(static_cast<T*>(p), n, coef);
}
template <typename T>
GS_TARGET("arch=x86-64-v4") void scale_v4(void* p, int64_t n, double coef) {
  scale_typed(static_cast<T*>(p), n, coef);
}
#endif
}  // namespace
}  // namespace detail

namespace {
// ISA level of every kernel here: 2 = x86-64-v4, 1 = x86-64-v3 (both with the 256-bit reduction
// loop), 0 = baseline (the 128-bit loop). The environment variable GRADSTAB_CPU_ISA
// (baseline, x86-64-v3 or x86-64-v4) caps it below what the CPU has, so tests can compare the
// levels' results bit for bit and benchmarks can time each level; other values are ignored.
int detect_isa_level() {
#if GS_HAVE_WIDE
  __builtin_cpu_init();
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c")) {
    level = 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd")) {
      level = 2;
    }
  }
  if (const char* cap = std::getenv("GRADSTAB_CPU_ISA")) {
    if (std::strcmp(cap, "baseline") == 0) level = 0;
    if (std::strcmp(cap, "x86-64-v3") == 0) level = std::min(level, 1);
  }
  return level;
#else
  return 0;
#endif
}

int isa_level() {
  static const int level = detect_isa_level();
  return level;
}

template <typename T>
Partial reduce_at_level(void* p, int64_t n, NormKind k, double np, double c) {
#if GS_HAVE_WIDE
  switch (isa_level()) {
    case 2: return detail::reduce_v4<T>(p, n, k, np, c);
    case 1: return detail::reduce_v3<T>(p, n, k, np, c);
    default: break;
  }
#endif
  return detail::reduce_base<T>(p, n, k, np, c);
}

template <typename T>
void scale_at_level(void* p, int64_t n, double coef) {
#if GS_HAVE_WIDE
  switch (isa_level()) {
    case 2: return detail::scale_v4<T>(p, n, coef);
    case 1: return detail::scale_v3<T>(p, n, coef);
    default: break;
  }
#endif
  detail::scale_base<T>(p, n, coef);
}
}  // namespace

Partial reduce_range(DType dtype, void* ptr, int64_t n, NormKind kind, double norm_p,
                     double clamp) {
  switch (dtype) {
    case DType::kHalf: return reduce_at_level<c10::Half>(ptr, n, kind, norm_p, clamp);
    case DType::kBFloat16: return reduce_at_level<c10::BFloat16>(ptr, n, kind, norm_p, clamp);
    case DType::kFloat: return reduce_at_level<float>(ptr, n, kind, norm_p, clamp);
    case DType::kDouble: return reduce_at_level<double>(ptr, n, kind, norm_p, clamp);
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
    case DType::kHalf: scale_at_level<c10::Half>(ptr, n, coef); break;
    case DType::kBFloat16: scale_at_level<c10::BFloat16>(ptr, n, coef); break;
    case DType::kFloat: scale_at_level<float>(ptr, n, coef); break;
    case DType::kDouble: scale_at_level<double>(ptr, n, coef); break;
  }
}

const char* selected_isa() {
#if GS_HAVE_WIDE
  switch (isa_level()) {
    case 2: return "x86-64-v4 (AVX-512)";
    case 1: return "x86-64-v3 (AVX2)";
    default: return "x86-64 baseline";
  }
#else
  return "portable C++ (no ISA clones on this platform)";
#endif
}

}  // namespace cpu
}  // namespace gradstab
