// Contract: the device side of the CPU execution harness: what the kernel files (norm_kernels.cu,
// agc_kernels.cu, device_common.cuh) use from CUDA, as host C++ run by gs_sim::launch (runtime.h).
// Compile kernel code with -ffp-contract=off on x86-64 (SSE arithmetic: IEEE round to nearest,
// no flush to zero), so that a + b, a * b, a / b and sqrt round exactly as __fadd_rn, __dmul_rn,
// __ddiv_rn and the device's correctly rounded sqrt do. pow is the host's (glibc), not CUDA's.
//   * threads: threadIdx/blockIdx/blockDim/gridDim are per-thread (thread_local) values.
//   * warp collectives (__shfl_sync, __shfl_xor_sync, __any_sync, __all_sync, __syncwarp): full
//     mask and width 32 only; every lane meets the others at a barrier, and the call site
//     (file:line) must be the same in all 32 lanes. __syncwarp orders memory among the lanes;
//     shuffles and votes do not (the harness tells ThreadSanitizer so).
//   * atomics and fences, the PTX patterns the kernels use: __threadfence() then an atomic is a
//     release; an atomic then __threadfence() is an acquire (of the atomic's location). Stronger
//     than PTX in one way (operations between the fence and the atomic count as released), weaker
//     in another (two fences alone never synchronize): ThreadSanitizer then reports a hand-off
//     whose fence is missing in every run, not only in unlucky interleavings.
//   * global data: gs_sim::global_load/global_store (used by device_common.cuh's gload/gstore
//     under GRADSTAB_CUDA_SIM) check each access before doing it (see runtime.h).
// The CUDA qualifiers (__device__, __noinline__, ...) become macros at the end of this header,
// after every standard header it needs (libstdc++ spells __attribute__((__noinline__))).
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "gs_sim/half.h"
#include "gs_sim/runtime.h"

// ------------------------------------------------------------------------- vector types --
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ----------------------------------------------------------- arithmetic, bit reinterpretation --
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double d) { return static_cast<float>(d); }
inline float __uint_as_float(unsigned int u) { return gs_sim::bits_float(u); }
inline unsigned int __float_as_uint(float f) { return gs_sim::float_bits(f); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, sizeof v);
  return v;
}

// ld.global.cg of the records (scratch memory, not checked): a plain load, as on the device.
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

namespace gs_sim {

// ------------------------------------------------------------------- lane-side runtime --
// Implemented in runtime.cpp; called only from threads of a launch.
void check_global(const void* p, unsigned bytes, bool store, bool vec, const char* file,
                  int line);
enum class Collective : int { kShflXor = 0, kShflIdx = 1, kAny = 2, kAll = 3, kSyncwarp = 4 };
uint64_t warp_collective(Collective op, unsigned mask, uint64_t bits, int arg, int width,
                         const char* file, int line);

template <typename T>
inline T global_load(const T* p, const char* file, int line) {
  check_global(p, sizeof(T), false, sizeof(T) == 16, file, line);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void global_store(T* p, T v, const char* file, int line) {
  check_global(p, sizeof(T), true, sizeof(T) == 16, file, line);
  std::memcpy(p, &v, sizeof(T));
}
inline int32_t relaxed_load(const int32_t* p) {
  return std::atomic_ref<int32_t>(*const_cast<int32_t*>(p)).load(std::memory_order_relaxed);
}
inline void relaxed_store(int32_t* p, int32_t v) {
  std::atomic_ref<int32_t>(*p).store(v, std::memory_order_relaxed);
}

// ------------------------------------------------------------------ the fence model --
// Per thread: whether a __threadfence() came before (then an atomic is a release), and the
// atomics since the last fence (the next fence acquires their locations).
struct FenceState {
  bool fenced = false;
  int n = 0;
  void* addr[4];
  int size[4];
};
inline thread_local FenceState tl_fence;

inline void reset_fence_state() { tl_fence = FenceState{}; }

template <typename T>
inline T atomic_add(T* a, T v) {
  const T old = std::atomic_ref<T>(*a).fetch_add(
      v, tl_fence.fenced ? std::memory_order_release : std::memory_order_relaxed);
  if (tl_fence.n < 4) {
    tl_fence.addr[tl_fence.n] = a;
    tl_fence.size[tl_fence.n] = static_cast<int>(sizeof(T));
    ++tl_fence.n;
  }
  return old;
}

inline void thread_fence() {
  for (int i = 0; i < tl_fence.n; ++i) {
    if (tl_fence.size[i] == 4) {
      (void)std::atomic_ref<uint32_t>(*static_cast<uint32_t*>(tl_fence.addr[i]))
          .load(std::memory_order_acquire);
    } else {
      (void)std::atomic_ref<uint64_t>(*static_cast<uint64_t*>(tl_fence.addr[i]))
          .load(std::memory_order_acquire);
    }
  }
  tl_fence.n = 0;
  tl_fence.fenced = true;
#if !defined(__SANITIZE_THREAD__)
  std::atomic_thread_fence(std::memory_order_seq_cst);  // (ThreadSanitizer does not model it)
#endif
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collective type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace gs_sim

// ------------------------------------------------------------------------- atomics, fences --
inline int atomicAdd(int* a, int v) { return gs_sim::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return gs_sim::atomic_add(a, v);
}
inline void __threadfence() { gs_sim::thread_fence(); }

// ---------------------------------------------------------------------- warp collectives --
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return gs_sim::from_bits<T>(gs_sim::warp_collective(
      gs_sim::Collective::kShflXor, mask, gs_sim::to_bits(v), lane_mask, width, file, line));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return gs_sim::from_bits<T>(gs_sim::warp_collective(
      gs_sim::Collective::kShflIdx, mask, gs_sim::to_bits(v), src_lane, width, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(gs_sim::warp_collective(gs_sim::Collective::kAny, mask, pred != 0, 0,
                                                  32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(gs_sim::warp_collective(gs_sim::Collective::kAll, mask, pred != 0, 0,
                                                  32, file, line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  (void)gs_sim::warp_collective(gs_sim::Collective::kSyncwarp, mask, 0, 0, 32, file, line);
}

// ---------------------------------------------------------------- CUDA qualifiers --
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
