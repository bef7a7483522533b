// Contract: the arithmetic of gradstab.adaptive's two threshold rules on one tracked norm, in
// float64, written once without torch so that any kernel can include it (GRADSTAB_HD marks the
// functions host-and-device where nvcc compiles them). The Python classes ZScoreThreshold and
// PercentileThreshold define the rules; this file follows their order of operations, so that
// the compiled rules give the same thresholds (the warm-up mean and variance are summed in
// slot order here, which may differ from torch's reduction in the last bit).
//
// A rule sees one tracked norm `g` (NaN/inf allowed: never stored, never judged a spike unless
// +inf) and its state; the caller loops over the tracked norms of a [T] state. Every operation
// rounds once (add/mul/div below: the _rn intrinsics on the device, where nvcc would otherwise
// contract a * b + c into one fused multiply-add), so the CPU and the CUDA kernel agree bit for
// bit. The warm-up buffer is read and written through `Mem` (the CUDA kernel passes checked
// global accesses).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if !defined(GRADSTAB_HD)
#if defined(__CUDACC__)
#define GRADSTAB_HD __host__ __device__
#else
#define GRADSTAB_HD
#endif
#endif

namespace gradstab {
namespace rules {

constexpr double kInf = std::numeric_limits<double>::infinity();

#if defined(__CUDA_ARCH__)
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double div(double a, double b) { return __ddiv_rn(a, b); }
#else
inline double add(double a, double b) { return a + b; }
inline double mul(double a, double b) { return a * b; }
inline double div(double a, double b) { return a / b; }
#endif
GRADSTAB_HD inline double sub(double a, double b) { return add(a, -b); }

// Plain memory, for the CPU.
struct PlainMem {
  GRADSTAB_HD static double load(const double* p) { return *p; }
  GRADSTAB_HD static void store(double* p, double v) { *p = v; }
};

// torch.clamp(bound, max=cap) for a cap > 0 (no cap: cap is NaN): NaN stays NaN.
GRADSTAB_HD inline double capped(double bound, double cap) {
  return (cap == cap && bound > cap) ? cap : bound;
}

// ---- z-score (ZClip) -------------------------------------------------------------------
enum class ZRule : int32_t { kAdaptiveScaling = 0, kMean = 1, kThreshold = 2 };

struct ZConfig {
  double alpha;
  double z_thresh;
  double eps;
  double cap;  // NaN: none
  int64_t warmup_steps;
  ZRule rule;
  bool skip_on_spike;  // update_on_spike="skip"
};

struct ZState {
  double mean;
  double var;
  int64_t count;
  int64_t spikes;
};

// (spike, target) of norm g against the statistics; has_norm false: before the step.
GRADSTAB_HD inline void z_detect(const ZConfig& c, const ZState& s, double g, bool has_norm,
                                 bool* spike, double* target) {
  const double mu = s.mean;
  const double sigma = std::sqrt(s.var);
  const bool ready = s.count >= c.warmup_steps;
  const double zt = c.z_thresh;
  const double bound = add(mu, mul(zt, add(sigma, c.eps)));
  if (!has_norm) {
    *spike = ready;
    *target = bound;
    return;
  }
  const double z = div(sub(g, mu), add(sigma, c.eps));
  *spike = ready && (z > zt);
  if (c.rule == ZRule::kAdaptiveScaling) {
    *target = add(mu, mul(div(mul(zt, zt), z), sigma));
  } else if (c.rule == ZRule::kMean) {
    *target = mu;
  } else {
    *target = bound;
  }
}

GRADSTAB_HD inline double z_bound(const ZConfig& c, const ZState& s, double g, bool has_norm) {
  bool spike;
  double target;
  z_detect(c, s, g, has_norm, &spike, &target);
  return capped(spike ? target : kInf, c.cap);
}

// Folds norm g into the state; `warm` holds warmup_steps values at stride `stride`.
template <class Mem = PlainMem>
GRADSTAB_HD inline void z_update(const ZConfig& c, ZState* s, double* warm, int64_t stride,
                                 double g) {
  const int64_t n_warm = c.warmup_steps;
  const bool finite = std::isfinite(g);
  const bool in_warmup = s->count < n_warm;
  const int64_t slot = s->count < n_warm - 1 ? s->count : n_warm - 1;
  const bool take = in_warmup && finite;
  if (take) Mem::store(warm + slot * stride, g);
  const int64_t new_count = s->count + (finite ? 1 : 0);
  const bool completes = take && new_count == n_warm;
  double mu0 = 0.0, var0 = 0.0;
  if (completes) {
    double sum = 0.0;
    for (int64_t i = 0; i < n_warm; ++i) sum = add(sum, Mem::load(warm + i * stride));
    mu0 = div(sum, static_cast<double>(n_warm));
    double sq = 0.0;
    for (int64_t i = 0; i < n_warm; ++i) {
      const double d = sub(Mem::load(warm + i * stride), mu0);
      sq = add(sq, mul(d, d));
    }
    var0 = div(sq, static_cast<double>(n_warm));
  }
  bool spike;
  double target;
  z_detect(c, *s, g, true, &spike, &target);
  spike = spike && finite;
  const double x = spike ? target : g;
  const double a = c.alpha;
  const double b = sub(1.0, a);
  const double mu_e = add(mul(a, s->mean), mul(b, x));
  const double dx = sub(x, mu_e);
  const double var_e = add(mul(a, s->var), mul(b, mul(dx, dx)));
  bool upd = !in_warmup && finite;
  if (c.skip_on_spike) upd = upd && !spike;
  if (completes) {
    s->mean = mu0;
    s->var = var0;
  } else if (upd) {
    s->mean = mu_e;
    s->var = var_e;
  }
  s->count = new_count;
  s->spikes += spike ? 1 : 0;
}

// ---- percentile (AutoClip) -------------------------------------------------------------
struct PConfig {
  double percentile;  // in [0, 100]
  double cap;         // NaN: none
  int64_t history;
  int64_t warmup_steps;
  bool include_current;
};

// Where the percentile of m sorted values lies: ranks lo and hi, and the weight of hi.
GRADSTAB_HD inline void p_ranks(const PConfig& c, int64_t m, int64_t* lo, int64_t* hi,
                                double* frac) {
  const int64_t last = m > 1 ? m - 1 : 0;
  const double rank = mul(div(c.percentile, 100.0), static_cast<double>(last));
  int64_t l = static_cast<int64_t>(std::floor(rank));
  if (l > last) l = last;
  *lo = l;
  *hi = l + 1 < last ? l + 1 : last;
  *frac = sub(rank, static_cast<double>(l));
}

// The interpolated percentile from the values of ranks lo (a) and hi (b).
GRADSTAB_HD inline double p_value(double a, double b, double frac) {
  return add(a, mul(frac, sub(b, a)));
}

// The history this step's bound is judged on: `cnt`, the finite norms counted once this one is
// in (when it is part of it: `add_g`), and `m`, the valid slots [0, m) then.
GRADSTAB_HD inline void p_window(const PConfig& c, int64_t count, bool add_g, int64_t* cnt,
                                 int64_t* m) {
  *cnt = count + (add_g ? 1 : 0);
  *m = *cnt < c.history ? (*cnt > 0 ? *cnt : 0) : c.history;
}

// The bound from the percentile `b` of that history (inf when it is empty): with the current
// norm in it (`with_g`), only a norm above it is clipped; nothing before warmup_steps norms
// (at least one); then the cap.
GRADSTAB_HD inline double p_bound(const PConfig& c, double b, double g, bool with_g,
                                  int64_t cnt) {
  if (with_g && !(g > b)) b = kInf;
  const int64_t need = c.warmup_steps > 1 ? c.warmup_steps : 1;
  return capped(cnt >= need ? b : kInf, c.cap);
}

// The ring-buffer slot the next norm goes to (torch.remainder: never negative).
GRADSTAB_HD inline int64_t p_slot(const PConfig& c, int64_t count) {
  const int64_t r = count % c.history;
  return r < 0 ? r + c.history : r;
}

}  // namespace rules
}  // namespace gradstab
