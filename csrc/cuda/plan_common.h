// Contract: the torch-free host helpers that the CUDA launchers (ops_cuda.cpp, agc_ops_cuda.cpp)
// and the CPU execution harness of the kernels (csrc/testing/cuda_sim) share, so that what the
// harness runs is what the GPU gets: the cache key of a work table and what a builder makes of
// it, the byte span of a strided tensor and the overlap test on such spans, the norm code of a
// norm type, and the write-back parameters of a strided gradient. Plain C++17: no ATen, no CUDA
// runtime calls (kernels.cuh only for its POD structs).
//
// A caller describes a tensor by its data pointer, sizes and strides in elements (strides >= 0,
// as PyTorch's) and its element size; nothing here dereferences a pointer.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "cuda/kernels.cuh"

namespace gradstab {
namespace cuda {

// The kernels' code (NormKind, kernels.cuh) of a norm type p > 0.
int32_t norm_kind(double p);

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

// Bytes [lo, hi) a tensor's elements address ({0, 0} for no elements).
using ByteSpan = std::pair<uint64_t, uint64_t>;
ByteSpan strided_byte_span(uint64_t ptr, const int64_t* sizes, const int64_t* strides,
                           int64_t ndim, int64_t elem_size);
// The span of `numel` contiguous elements from `ptr`.
ByteSpan dense_byte_span(uint64_t ptr, int64_t numel, int64_t elem_size);
// Whether a span of `written` overlaps another span of `written` or one of `read` (two read
// spans may overlap); empty spans are ignored. Conservative for interleaved views such as x[::2]
// and x[1::2]. Sorted spans: O(n log n), O(n) when each list lies in address order.
bool spans_overlap(std::vector<ByteSpan> written, std::vector<ByteSpan> read);

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
