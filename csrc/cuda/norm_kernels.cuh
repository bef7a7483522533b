// Contract: the interface between the CUDA kernels (norm_kernels.cu, plain CUDA, no torch headers)
// and their host side (the torch-free plan norm_plan.cpp, the ATen launcher norm_ops.cpp, the
// launches in norm_launch.cu, and the CPU execution harness csrc/testing/cuda_sim). Mostly
// plain data: POD structs and enums that both sides share bit for bit, the kernels, and the
// launch functions norm_launch.cu defines.
//
// Work layout (built on the host by the launcher, cached on the device, see norm_ops.cpp):
//   * every gradient is cut into *units* of kUnitBytes (16 KB: 4096 float32, 8192 float16 or
//     bfloat16, 2048 float64 elements; the last unit of a tensor may be shorter). A unit is the
//     work of one warp: 32 lanes x 16-byte vectors x 32 steps.
//   * the descriptor table lists the tensors in *work order* (most units first, ties in input
//     order; zero-size tensors last) with the index of their first unit; unit u belongs to the
//     last tensor whose first_unit <= u (binary search). `orig` is the tensor's position in the
//     caller's list, which indexes every per-tensor result.
//   * the reduce kernel runs a persistent grid; warp w takes units w, w + W, w + 2W, ... (W =
//     warps in the grid). Each unit's partial (sum of |x|^p in double, max |x|, non-finite
//     count) is reduced in a fixed order and written to its own slot: results do not depend on
//     the grid size or on which warp ran which unit.
//   * the warp that completes a tensor's last unit (atomic counter per tensor) combines that
//     tensor's unit partials in a fixed order; the warp that completes the last tensor (one more
//     counter) computes the total norm and the global clip coefficient. The hand-off is
//     arrive_last (device_common.cuh): release fence before each count, acquire fence and a warp
//     barrier after the completing one. The counters are zeroed by the launcher
//     (cudaMemsetAsync) before each launch.
//   * the scale kernel (clipping only) walks the units in reverse order, so the units the reduce
//     kernel read last, still in L2, are written first, and skips every unit whose coefficient
//     is 1.
//
// Why last-block-done rather than a cooperative launch with grid-wide syncs: an ordinary launch
// has no co-residency requirement (a cooperative grid must fit on the GPU at once, which fails
// or waits beside other kernels, under MPS or green contexts), it is capturable in a CUDA graph
// on every CUDA version PyTorch supports, and the hand-off costs one integer atomic per 16 KB
// unit while the finishing work (combining a tensor's partials) overlaps with other warps still
// reading. The price is a second launch for clipping; on a healthy step its blocks read one flag
// and exit. Why 16 KB warp units rather than one block per 64K-element chunk: the persistent
// grid stays balanced to within one unit per warp (a chunk-per-block grid loses up to a wave at
// the end), and the order of the work is free, so the largest tensors go first and the tensors
// finishing last are small and quick to combine. To be measured on the GPU (see
// benchmarks/gpu/run_gpu_checks.sh).
#pragma once

#include <atomic>
#include <cstdint>

#include "common/codes.h"

#include <cuda_runtime_api.h>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__
#else
#define GS_HD
#endif

namespace gradstab {
namespace cuda {

// DType and NormKind (the dtype and norm codes) are common/codes.h's, shared with the CPU code.
// kClipValue: clamp in the reduce pass. kClipValueDeferred: clamp in the scale kernel, after the
// statistics are final (needed where a tensor's norm may be recomputed from its data: float64
// gradients and p not in {1, 2, inf}; the recomputation must see the values as they were).
// kNormalize: per-layer scaling to a target norm, coef = bound / (norm + eps), up or down.
enum Mode : int32_t {
  kStats = 0,
  kClipNorm = 1,
  kClipPerLayer = 2,
  kClipValue = 3,
  kClipValueDeferred = 4,
  kNormalize = 5
};

constexpr int64_t kUnitBytes = 16384;  // bytes per unit (one warp's work item)
constexpr int kThreads = 256;          // threads per block (8 warps)
constexpr int kWarpsPerBlock = kThreads / 32;

GS_HD inline int64_t dtype_size(int32_t dtype) {
  return dtype == kDouble ? 8 : (dtype == kFloat ? 4 : 2);
}
GS_HD inline int64_t unit_elems(int32_t dtype) { return kUnitBytes / dtype_size(dtype); }

// One gradient, 48 bytes. align_offset: number of leading elements before the first 16-byte
// aligned one (the data pointer is element-aligned), or -1 when the pointer is not even
// element-aligned (then every load is a scalar load).
struct TensorDesc {
  uint64_t ptr;
  int64_t numel;
  int64_t first_unit;
  int64_t num_units;
  int32_t dtype;
  int32_t orig;
  int32_t align_offset;
  int32_t pad;
};
static_assert(sizeof(TensorDesc) == 48, "TensorDesc layout");

// Per-unit partial (written by the warp that reduced the unit).
struct UnitRecord {
  double sum;         // sum of |x|^p over the unit (double; see norm_kernels.cu for the order)
  double max_abs;     // max |x|, NaN if the unit holds a NaN
  int32_t nonfinite;  // NaN/Inf elements in the unit
  int32_t clamp;      // value clipping: the unit holds an element beyond the bound
};
static_assert(sizeof(UnitRecord) == 24, "UnitRecord layout");

// Per-tensor result, indexed by the tensor's position in the caller's list.
struct TensorRecord {
  double sum;   // sum of |x|^p; +inf when the norm had to be computed rescaled (norm_kernels.cu)
  double norm;
  double max_abs;
  double coef;  // per-layer coefficient (kClipPerLayer, kNormalize)
  int64_t nonfinite;
  int64_t write;  // the call writes this tensor (per-layer: coef != 1; value: a clamp)
};
static_assert(sizeof(TensorRecord) == 48, "TensorRecord layout");

// Global results of one call.
struct GlobalRecord {
  double total;     // total norm
  double coef;      // global clip coefficient (kClipNorm)
  int32_t scale;    // nonzero when the scale kernel has anything to write
  int32_t pad;
  int64_t pad2;
};
static_assert(sizeof(GlobalRecord) == 32, "GlobalRecord layout");

struct Params {
  const TensorDesc* table;  // num_tensors descriptors, work order
  int32_t num_tensors;
  int32_t num_work;         // tensors with at least one unit (the first num_work of the table)
  int64_t total_units;
  // The scale kernel's units [scale_begin, scale_end) (the whole table: 0, total_units; one
  // tensor's units when gradients that share memory are written one at a time, in list order)
  int64_t scale_begin;
  int64_t scale_end;
  int32_t kind;             // NormKind
  int32_t mode;             // Mode
  double p;                 // norm order (kLp)
  double eps;               // clip: coef = bound / (norm + eps)
  const double* bound_ptr;  // max_norm / clip_value on the device, or null: use bound_value
  double bound_value;
  // scratch (zeroed by the launcher: tensor_done[num_tensors] and all_done)
  UnitRecord* units;
  TensorRecord* tensors;
  GlobalRecord* global;
  int32_t* tensor_done;
  int32_t* all_done;
  // outputs (float64 when out_double, else float32)
  void* out_norms;
  void* out_max_abs;
  int64_t* out_nonfinite;
  void* out_total;
  int32_t out_double;
  int32_t pad;
};

// Write-back of a strided gradient from the contiguous copy the kernels worked on, done only if
// the call changed that tensor (a device flag: never read on the host). dst is addressed by
// sizes/strides (elements; a stride may be 0), src is contiguous; bits are copied as they are.
constexpr int kMaxWritebackDims = 12;
struct WritebackParams {
  const void* src;
  void* dst;
  int64_t numel;
  int32_t ndim;
  int32_t elem_size;  // 2, 4 or 8
  int64_t sizes[kMaxWritebackDims];
  int64_t strides[kMaxWritebackDims];
  const int32_t* flag32;  // GlobalRecord::scale, or null
  const int64_t* flag64;  // TensorRecord::write, used when flag32 is null
};

// The persistent grid for `work` warp work items (units, AGC items): `resident` blocks (what the
// GPU holds at once), fewer when there is less work, capped by max_blocks > 0; at least one.
inline int persistent_grid(int64_t work, int64_t resident, int max_blocks) {
  const int64_t needed = (work + kWarpsPerBlock - 1) / kWarpsPerBlock;
  int64_t grid = needed < resident ? needed : resident;
  if (max_blocks > 0 && grid > max_blocks) grid = max_blocks;
  return static_cast<int>(grid < 1 ? 1 : grid);
}

// The persistent grid of `kernel` on `device` (norm_launch.cu; the AGC launches use it too):
// the device's SM count (cached per device) times the kernel's resident blocks per SM from the
// occupancy API (cached in `per_sm_cache`, kGridDevices entries, one array per kernel), then
// persistent_grid. Devices beyond kGridDevices are asked every time.
constexpr int kGridDevices = 64;
int resident_grid(int device, int64_t work, int max_blocks, const void* kernel,
                  std::atomic<int>* per_sm_cache);

// Blocks of kThreads threads for the write-back of `numel` elements (a grid-stride loop).
inline int writeback_grid(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1024 ? (blocks < 1 ? 1 : blocks) : 1024);
}

// The kernels (norm_kernels.cu). Launched by norm_launch.cu on the GPU; the CPU execution harness
// (csrc/testing/cuda_sim) compiles norm_kernels.cu as host C++ and runs them on a simulated grid.
#if defined(__CUDACC__)
__global__ void reduce_kernel(const __grid_constant__ Params P);
__global__ void scale_kernel(const __grid_constant__ Params P);
__global__ void writeback_kernel(const __grid_constant__ WritebackParams W);
#endif

// Blocks of kThreads threads to launch for `total_units` units on `device`: the resident
// maximum of the kernel (persistent grid), fewer when there is less work. max_blocks > 0 caps it
// (a test hook: results must not depend on it). (norm_launch.cu)
int reduce_grid(int device, int64_t total_units, int max_blocks);
int scale_grid(int device, int64_t total_units, int max_blocks);

// Launch on `stream`; return the launch error (cudaSuccess when queued). (norm_launch.cu)
cudaError_t launch_reduce(const Params& params, int grid, cudaStream_t stream);
cudaError_t launch_scale(const Params& params, int grid, cudaStream_t stream);
cudaError_t launch_writeback(const WritebackParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradstab
