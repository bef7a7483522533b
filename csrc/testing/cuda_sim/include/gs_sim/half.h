// Contract: float16 and bfloat16 for the CPU execution harness (cuda_fp16.h / cuda_bf16.h
// stand-ins): 16-bit structs holding the bits, exact widening to float, and narrowing from float
// rounded to nearest even as the GPU's cvt.rn instructions do (overflow to infinity, subnormal
// results rounded, every NaN to the canonical 0x7fff). Plain integer arithmetic: the results do
// not depend on the host's floating-point environment. tests/test_cuda_sim.py checks them
// against PyTorch's conversions on every float16 and bfloat16 value and on edge-case floats.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};

namespace gs_sim {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float16 bits of f, rounded to nearest even.
inline unsigned short half_bits_rn(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                                   // NaN
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25: rounds to 0
  uint32_t mant, shift;
  if (a < 0x38800000u) {  // below 2^-14: a float16 subnormal, q * 2^-24
    // a is a normal float here (>= 2^-25): its 24-bit significand M times 2^(E - 150) is
    // M * 2^(E - 126) units of 2^-24, E the biased exponent (102..112): shift by 126 - E.
    mant = (a & 0x7fffffu) | 0x800000u;
    shift = 126u - (a >> 23);
  } else {
    mant = a & 0x7fffffu;
    shift = 13u;
  }
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half_ulp = 1u << (shift - 1u);
  if (a >= 0x38800000u) q |= ((a >> 23) - 112u) << 10;  // biased float16 exponent
  // Round to nearest, ties to even; a carry out of the mantissa bumps the exponent, which is
  // the right result (up to the largest finite value: 65520 and above were handled).
  if (rem > half_ulp || (rem == half_ulp && (q & 1u))) ++q;
  return static_cast<unsigned short>(sign | q);
}

// bfloat16 bits of f, rounded to nearest even.
inline unsigned short bfloat16_bits_rn(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  // The low 16 bits decide: above half, or exactly half with an odd result, round up (a carry
  // into the exponent is right, up to infinity).
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m << 13));  // inf, NaN (payload kept)
  if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return bits_float(sign);
  // subnormal m * 2^-24: normalize
  uint32_t exp = 113u;  // float exponent of 2^-14
  while ((m & 0x400u) == 0) {
    m <<= 1;
    --exp;
  }
  return bits_float(sign | (exp << 23) | ((m & 0x3ffu) << 13));
}

}  // namespace gs_sim

inline float __half2float(__half h) { return gs_sim::half_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{gs_sim::half_bits_rn(f)}; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

inline float __bfloat162float(__nv_bfloat16 b) {
  return gs_sim::bits_float(static_cast<uint32_t>(b.x) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{gs_sim::bfloat16_bits_rn(f)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
