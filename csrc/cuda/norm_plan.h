// Contract: the torch-free plan of one call of the norm ops' CUDA kernels (norm_kernels.cu), shared
// by the ATen launcher (norm_ops.cpp) and the CPU execution harness (csrc/testing/cuda_sim):
//   * build_norm_table: the descriptor table (TensorDesc per gradient, in work order) of a list
//     of (data pointer, numel, dtype) and its host facts (NormMeta);
//   * norm_mode: the kernels' mode for a requested op (value clipping deferred where needed);
//   * norm_scratch / norm_params: the scratch layout and the kernels' Params;
//   * norm_reduce / norm_write: the launch sequence, against NormDevice, which the launcher
//     implements with the CUDA runtime and the harness with the simulator.
// The caller owns every buffer: the table (where the kernels can read it), the scratch of
// norm_scratch(...).bytes bytes (any contents: norm_reduce zeroes what must be zero), the
// outputs, and the contiguous working copy of each gradient that is not dense.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/norm_kernels.cuh"
#include "cuda/plan_common.h"

namespace gradstab {
namespace cuda {

// Host facts of a norm table (HostTable::meta): total units, tensors with units, whether two of
// the key's spans overlap, then per gradient (caller's order) its first unit (kPerTensor + i)
// and unit count (kPerTensor + T + i).
enum NormMeta : int { kTotalUnits = 0, kNumWork = 1, kKeyOverlap = 2, kPerTensor = 3 };

// Leading elements of a tensor at `ptr` before its first 16-byte aligned one, or -1 when `ptr`
// is not even element-aligned (TensorDesc::align_offset).
int32_t align_offset(uint64_t ptr, int32_t dtype);

// The table of `key` (one item per gradient: working-memory pointer, numel, dtype code).
HostTable build_norm_table(const std::vector<KeyItem>& key);

// The kernels' Mode for an op (common/codes.h): value clipping clamps after the statistics (kClipValueDeferred) where a norm may
// be recomputed from the data (float64 gradients, p not in {1, 2, inf}) or gradients share
// memory.
int32_t norm_mode(Op op, int32_t kind, bool any_double, bool shared);

// Byte offsets in the scratch buffer: counters [0, zeroed) (zeroed by norm_reduce), then the
// global record, the tensor records and the unit records; `bytes` in all.
struct NormScratch {
  int64_t zeroed;
  int64_t global;
  int64_t tensors;
  int64_t units;
  int64_t bytes;
};
NormScratch norm_scratch(int64_t num_tensors, int64_t total_units);

// The outputs the kernels write: norms, max_abs and total as float64 when out_double, else
// float32; nonfinite as int64.
struct NormOutputs {
  void* norms;
  void* max_abs;
  int64_t* nonfinite;
  void* total;
  bool out_double;
};

// Params of the call over the whole table (scale range: every unit). `table` is where the
// kernels read the table's bytes; bound_ptr (where the kernels read the bound) or bound_value.
Params norm_params(const void* table, const std::vector<int64_t>& meta, int64_t num_tensors,
                   char* scratch, const NormScratch& layout, int32_t kind, int32_t mode, double p,
                   double eps, const double* bound_ptr, double bound_value,
                   const NormOutputs& out);

// What the launch sequence needs from the device. Calls are made in order, as on one stream.
class NormDevice {
 public:
  virtual ~NormDevice() = default;
  virtual void zero(void* dst, int64_t bytes) = 0;
  // Launch the kernel for `units` units (the grid is the device's choice; results must not
  // depend on it).
  virtual void reduce(const Params& P, int64_t units) = 0;
  virtual void scale(const Params& P, int64_t units) = 0;
  // Gradient i (caller's order) has a contiguous working copy: re-read it from the gradient,
  // or write it back if the device flag (*flag32, or *flag64 when flag32 is null) is set.
  virtual void refresh_copy(int64_t i) = 0;
  virtual void write_back(int64_t i, const int32_t* flag32, const int64_t* flag64) = 0;
};

// Zeroes the counters and launches the reduce kernel: statistics (and an in-pass clamp).
void norm_reduce(const Params& P, const NormScratch& layout, NormDevice& dev);

// After norm_reduce, for the writing modes: the scale kernel over every unit, or -- when
// `shared` (gradients share memory) -- once per gradient in list order over its units, each
// working copy re-read before its turn; then the copies written back (has_copy[i]: gradient i
// has one). Only write-backs for kClipValue (clamped in the reduce pass); nothing for kStats.
void norm_write(const Params& P, const std::vector<int64_t>& meta, bool shared,
                const std::vector<char>& has_copy, NormDevice& dev);

}  // namespace cuda
}  // namespace gradstab
