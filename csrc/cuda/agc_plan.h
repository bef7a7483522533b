// Contract: the torch-free plan of one call of adaptive_clip's CUDA kernels (agc_kernels.cu),
// shared by the ATen launcher (agc.cpp) and the CPU execution harness (csrc/testing/cuda_sim):
//   * build_agc_table: the pair table (AgcPair per (gradient, parameter), in work order) of a
//     key and its host facts (AgcMeta);
//   * agc_scratch / agc_params: the scratch layout and the kernels' AgcParams;
//   * agc_run: the launch sequence (reduce; the scale kernel when rows are long, or once per
//     pair in list order when memory is shared; write-backs), against AgcDevice.
// The key holds two items per pair i: key[2i] = (gradient working memory, numel, G dtype),
// key[2i + 1] = (parameter working memory, units (rows), W dtype). Rows must be contiguous
// blocks of both (the launcher gives a tensor whose rows are not a contiguous working copy).
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/agc_kernels.cuh"
#include "cuda/norm_kernels.cuh"
#include "cuda/plan_common.h"

namespace gradstab {
namespace cuda {

// Host facts of an AGC table (HostTable::meta): totals, whether a gradient's span overlaps
// another gradient's or a parameter's, then per pair (caller's order) its first work item
// (kPerPair + i) and item count (kPerPair + T + i).
enum AgcMeta : int {
  kItems = 0,
  kWork = 1,
  kRows = 2,
  kPieces = 3,
  kLongs = 4,
  kAgcKeyOverlap = 5,
  kPerPair = 6
};

HostTable build_agc_table(const std::vector<KeyItem>& key);

// Byte offsets in the scratch buffer: [0, zeroed) pair_done, long_done, all_done and the global
// record (zeroed by agc_run), then the pair, row and piece records; `bytes` in all.
struct AgcScratch {
  int64_t long_done;
  int64_t all_done;
  int64_t global;
  int64_t zeroed;
  int64_t pairs;
  int64_t rows;
  int64_t pieces;
  int64_t bytes;
};
AgcScratch agc_scratch(int64_t num_pairs, const std::vector<int64_t>& meta);

// The outputs the kernels write: norms and total as float64 when out_double, else float32.
struct AgcOutputs {
  void* norms;
  int64_t* clipped;
  int64_t* nonfinite;
  void* total;
  bool out_double;
};

// Params of the call over every item; `deferred` when memory is shared (see agc_kernels.cuh).
AgcParams agc_params(const void* table, const std::vector<int64_t>& meta, int64_t num_pairs,
                     char* scratch, const AgcScratch& layout, int32_t kind, bool deferred,
                     double p, double clip_factor, double eps, const AgcOutputs& out);

// What the launch sequence needs from the device. Calls are made in order, as on one stream.
class AgcDevice {
 public:
  virtual ~AgcDevice() = default;
  virtual void zero(void* dst, int64_t bytes) = 0;
  virtual void reduce(const AgcParams& P, int64_t items) = 0;
  virtual void scale(const AgcParams& P, int64_t items) = 0;
  // Gradient i has a contiguous working copy: re-read it, or write it back if *flag64 != 0.
  virtual void refresh_copy(int64_t i) = 0;
  virtual void write_back(int64_t i, const int64_t* flag64) = 0;
};

// The whole call: zero the counters, reduce (which scales clipped short rows unless deferred),
// then the scale kernel where needed and the write-backs (has_copy[i]: gradient i has one).
void agc_run(const AgcParams& P, const std::vector<int64_t>& meta, const AgcScratch& layout,
             const std::vector<char>& has_copy, AgcDevice& dev);

}  // namespace cuda
}  // namespace gradstab
