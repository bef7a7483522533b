// Contract: the torch-free host helpers that the CUDA launchers (norm_ops.cpp, agc.cpp) and the
// CPU execution harness of the kernels (csrc/testing/cuda_sim) share, so that what the harness
// runs is what the GPU gets: the cache key of a work table and what a builder makes of it, and
// the write-back parameters of a strided gradient (byte spans and the overlap test are in
// common/overlap.h, norm codes in common/codes.h). Plain C++17: no ATen, no CUDA runtime calls
// (norm_kernels.cuh only for its POD structs).
//
// A caller describes a tensor by its data pointer, sizes and strides in elements (strides >= 0,
// as PyTorch's) and its element size; nothing here dereferences a pointer.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/codes.h"
#include "common/overlap.h"
#include "cuda/norm_kernels.cuh"

namespace gradstab {
namespace cuda {

using ::gradstab::ByteSpan;

// One item of a table's cache key: an address, an element count (or any other integer the
// table depends on) and a dtype code.
struct KeyItem {
  uint64_t ptr;
  int64_t numel;
  int32_t dtype;
  bool operator==(const KeyItem& o) const {
    return ptr == o.ptr && numel == o.numel && dtype == o.dtype;
  }
};

// What a builder makes of a key: the bytes of the device table and the host facts the launcher
// needs on every call (sizes, offsets, flags), both immutable afterwards.
struct HostTable {
  std::vector<uint8_t> bytes;
  std::vector<int64_t> meta;
};

// (size, stride) of a tensor's dimensions, outermost first, with size-1 dimensions dropped and
// neighbours merged where the outer stride is the inner one times the inner size: the same
// row-major element order, as few dimensions as possible.
std::vector<std::pair<int64_t, int64_t>> coalesced_dims(const int64_t* sizes,
                                                        const int64_t* strides, int64_t ndim);

// The write-back kernel's parameters for copying the contiguous `src` into the strided `dst`
// (whose coalesced dimensions are `dims`) if the device flag (*flag32, or *flag64 when flag32 is
// null) is nonzero. False, with *out untouched, when `dims` has more dimensions than the kernel
// takes (kMaxWritebackDims): the caller must copy some other way.
bool writeback_params(const void* src, void* dst, int64_t numel, int64_t elem_size,
                      const std::vector<std::pair<int64_t, int64_t>>& dims, const int32_t* flag32,
                      const int64_t* flag64, WritebackParams* out);

inline int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

}  // namespace cuda
}  // namespace gradstab
