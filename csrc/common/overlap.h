// Contract: which tensors share memory, decided on byte spans. Every op that writes gradients
// asks this before its parallel write pass (CPU and CUDA kernels, the CPU harness of the CUDA
// kernels): gradients that overlap each other, or a parameter, are written one at a time in list
// order instead. Plain C++17, no torch: a tensor is described by its data pointer, sizes and
// strides (in elements, >= 0 as PyTorch's) and element size; nothing is dereferenced.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace gradstab {

// Bytes [lo, hi) a tensor's elements address ({0, 0} for no elements).
using ByteSpan = std::pair<uint64_t, uint64_t>;

ByteSpan strided_byte_span(uint64_t ptr, const int64_t* sizes, const int64_t* strides,
                           int64_t ndim, int64_t elem_size);
// The span of `numel` contiguous elements from `ptr`.
ByteSpan dense_byte_span(uint64_t ptr, int64_t numel, int64_t elem_size);

// Whether a span of `written` overlaps another span of `written` or one of `read` (two read
// spans may overlap); empty spans are ignored. Conservative for interleaved views such as x[::2]
// and x[1::2] (they take the one-at-a-time path). O(n) when each list lies in increasing or
// decreasing address order (the usual case: parameters are allocated in order), else
// O(n log n).
bool spans_overlap(std::vector<ByteSpan> written, std::vector<ByteSpan> read);

}  // namespace gradstab
