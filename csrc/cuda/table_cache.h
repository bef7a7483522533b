// Contract: the launcher-side helpers the CUDA ops share (norm_ops.cpp for the norm ops, agc.cpp
// for adaptive_clip): the per-process cache of device-resident work tables (table_cache.cpp,
// whose comment explains why and how it stays correct), the grid cap of the test hook, and the
// strided write-back of a gradient's working copy. Host code only (ATen and the CUDA runtime
// API); the torch-free parts are in plan_common.h and common/.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "cuda/norm_kernels.cuh"
#include "cuda/plan_common.h"

namespace gradstab {
namespace cuda {

// Builds a table on a cache miss (build_norm_table, build_agc_table).
using TableBuilder = std::function<HostTable(const std::vector<KeyItem>&)>;

// A cached table: `table` (on the device) holds HostTable::bytes, `meta` its host facts.
struct Entry {
  int device = -1;
  int32_t tag = 0;  // which launcher's tables (keys of different launchers never match)
  std::vector<KeyItem> key;
  std::vector<int64_t> meta;
  at::Tensor table;           // the bytes, on the device
  int64_t bytes = 0;          // of the table
  void* host_copy = nullptr;  // pinned copy of a table built during a capture (never freed)
  bool retained = false;      // used by a CUDA graph capture: never freed or changed
  bool filled = false;        // an eager copy has written the device table (see get_table)
  cudaEvent_t ready = nullptr;         // recorded on `home` after that copy
  cudaStream_t home = nullptr;         // the stream of that copy
  std::vector<cudaStream_t> recorded;  // other streams made to wait for it (and recorded)

  Entry() = default;
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  ~Entry();

  // After an eager copy into the table on `stream`: remember where and when it completes.
  void mark_filled(cudaStream_t stream);
};

// The table of (`tag`, `key`) on `device`, built by `build` on a miss, readable by kernels
// launched on `stream` after this call (also during a CUDA graph capture: `capturing`).
std::shared_ptr<Entry> get_table(int device, int32_t tag, std::vector<KeyItem>&& key,
                                 const c10::cuda::CUDAStream& stream, bool capturing,
                                 const TableBuilder& build);

// Whether `stream` is being captured into a CUDA graph. cudaStreamIsCapturing on the stream
// itself: the same on every torch this builds against (c10's stream-taking helper exists only
// from torch 2.12 on). An error (e.g. the legacy stream queried while another stream captures
// in global mode) is raised, as c10's own helper does.
bool stream_is_capturing(cudaStream_t stream);

// The grid cap set by the test hook _cuda_set_max_blocks (0: none).
int max_blocks();

// Copies the contiguous working copy `copy` of the strided gradient `g` back into `g`, on
// `stream`, only if the device flag (*flag32, or *flag64 when flag32 is null) is nonzero when
// the copy kernel runs: nothing is written on a step that did not change `g`. `g` may be
// expanded (stride 0: its aliased elements then receive equal values, or the caller must have
// refused it). Dimensions are coalesced first; a gradient still over the kernel's 12
// dimensions is copied with copy_, unconditionally (check_writeback refuses it up front if
// its elements share memory).
void write_back(const at::Tensor& g, const at::Tensor& copy, const int32_t* flag32,
                const int64_t* flag64, cudaStream_t stream);
// Refuses (ValueError, before anything is launched) a gradient write_back could only copy with
// copy_ although its elements share memory (copy_ would throw after other gradients changed).
void check_writeback(const at::Tensor& g, int64_t index, int64_t count);

}  // namespace cuda
}  // namespace gradstab
