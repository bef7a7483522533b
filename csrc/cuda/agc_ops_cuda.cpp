// Contract: the CUDA kernel of gradstab::adaptive_clip (schema in gradstab/_library.py; unit-wise
// adaptive gradient clipping, AGC), registered for the CUDA dispatch key: the ATen side of
// agc_cuda.cu (argument checks, work table, scratch, launches). Same semantics and results as
// the CPU kernel (csrc/cpu/agc_cpu.cpp, up to the order of floating-point additions):
// returns (norms [T], clipped [T] int64, nonfinite [T] int64, total_norm []), the pre-clip
// p-norm of each gradient, its number of clipped units, its NaN/Inf count and the pre-clip
// total norm, float64 if any gradient is float64 (float32 otherwise), on the gradients' device.
// (The file is not called agc_cuda.cpp: its object file would collide with agc_cuda.cu's.)
//
// Per call, with no host-device synchronisation: check every argument (before anything is
// written); make a contiguous working copy of a gradient or parameter whose units (slices along
// dim 0) are not contiguous blocks of its memory; look up the work table of this exact list of
// (gradient, parameter) addresses, sizes, unit counts and dtypes in the cache shared with the
// norm ops (table_cache.h; built and uploaded on a miss, capturable); allocate the outputs and
// one scratch buffer from PyTorch's caching allocator; zero the counters; launch the reduce
// kernel (which also scales the clipped units of up to 4,096 elements) and, when the table has
// longer units, the scale kernel (which returns at once unless one was clipped); write strided
// gradients back from their copies only if a unit was clipped (a device flag). Everything runs
// on the current stream under a device guard, so the call is capturable in a CUDA graph.
//
// Memory shared between arguments (a gradient twice, overlapping views, a parameter aliasing a
// gradient; known from the cached table's key, checked per call when a working copy exists):
// every unit is decided from the data on entry first (the reduce kernel writes nothing), then
// the scale kernel runs once per gradient, over its work items, in list order; a strided
// gradient is re-read into its copy before its turn. As on the CPU, a gradient passed twice is
// scaled twice by its entry coefficients. A gradient whose own elements share memory (an
// expanded view) is refused with a ValueError before anything is written: whether one of its
// units must be clipped is known only on the device (the CPU kernel refuses it only then).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/agc_cuda.cuh"
#include "cuda/kernels.cuh"
#include "cuda/table_cache.h"
#include "adaptive_clip_args.h"

namespace gradstab {
namespace cuda {
namespace {

using AgcStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int32_t kAgcTableTag = 1;  // distinct from the norm ops' tables
// Host facts of an AGC table (HostTable::meta): totals, then per pair (caller's order) its
// first work item and item count.
enum AgcMeta : int {
  kItems = 0,
  kWork = 1,
  kRows = 2,
  kPieces = 3,
  kLongs = 4,
  kKeyOverlap = 5,
  kPerPair = 6
};

int64_t units_of(const at::Tensor& t) { return t.dim() <= 1 ? 1 : t.size(0); }

// Whether the units of `t` are the blocks [u * unit_len, (u + 1) * unit_len) of its memory from
// data_ptr() (dense, non-overlapping, dim 0 outermost): the kernels then read it in place.
bool units_are_blocks(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t units = units_of(t);
  return units == 1 || t.stride(0) == t.numel() / units;
}

// The work table of a key: per pair, (G address, numel, G dtype), (W address, units, W dtype).
HostTable build_agc_table(const std::vector<KeyItem>& key) {
  const int64_t T = static_cast<int64_t>(key.size() / 2);
  std::vector<AgcPair> pairs(T);
  std::vector<int64_t> items(T, 0);
  for (int64_t i = 0; i < T; ++i) {
    const KeyItem& g = key[2 * i];
    const KeyItem& w = key[2 * i + 1];
    AgcPair& d = pairs[i];
    std::memset(&d, 0, sizeof d);
    d.g = g.ptr;
    d.w = w.ptr;
    d.rows = w.numel;
    d.row_len = (g.numel == 0 || d.rows == 0) ? 0 : g.numel / d.rows;
    d.gdtype = g.dtype;
    d.wdtype = w.dtype;
    d.orig = static_cast<int32_t>(i);
    if (g.numel == 0) continue;
    d.is_long = d.row_len > kAgcItemElems ? 1 : 0;
    if (d.is_long) {
      d.per = (d.row_len + kAgcItemElems - 1) / kAgcItemElems;
      items[i] = d.rows * d.per;
    } else {
      d.per = std::max<int64_t>(1, kAgcItemElems / d.row_len);
      items[i] = (d.rows + d.per - 1) / d.per;
    }
  }
  // Work order: most items first (the pairs finishing last are small and quick to combine),
  // ties in input order; zero-size pairs last.
  std::vector<int32_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return items[a] > items[b]; });
  HostTable host;
  host.meta.assign(kPerPair + 2 * T, 0);
  std::vector<AgcPair> table(T);
  int64_t item = 0, row = 0, piece = 0, longs = 0, work = 0;
  for (int64_t k = 0; k < T; ++k) {
    const int32_t i = order[k];
    AgcPair d = pairs[i];
    d.first_item = item;
    d.num_items = items[i];
    d.first_row = row;
    if (d.is_long) {
      d.first_piece = piece;
      d.first_long = longs;
      piece += d.rows * d.per;
      longs += d.rows;
    }
    if (items[i] > 0) {
      row += d.rows;
      ++work;
    }
    host.meta[kPerPair + i] = item;
    host.meta[kPerPair + T + i] = items[i];
    item += items[i];
    table[k] = d;
  }
  std::vector<ByteSpan> written, read;
  for (int64_t i = 0; i < T; ++i) {
    const KeyItem& g = key[2 * i];
    const KeyItem& w = key[2 * i + 1];
    written.emplace_back(g.ptr, g.ptr + static_cast<uint64_t>(g.numel * dtype_size(g.dtype)));
    read.emplace_back(w.ptr, w.ptr + static_cast<uint64_t>(g.numel * dtype_size(w.dtype)));
  }
  host.meta[kItems] = item;
  host.meta[kWork] = work;
  host.meta[kRows] = row;
  host.meta[kPieces] = piece;
  host.meta[kLongs] = longs;
  host.meta[kKeyOverlap] = spans_overlap(std::move(written), std::move(read)) ? 1 : 0;
  host.bytes.resize(T * sizeof(AgcPair));
  if (T > 0) std::memcpy(host.bytes.data(), table.data(), T * sizeof(AgcPair));
  return host;
}

int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

AgcStats adaptive_clip_cuda(at::TensorList grads, at::TensorList params, double clip_factor,
                            double eps, double norm_type) {
  check_adaptive_clip_args(grads, params, clip_factor, eps, norm_type, at::kCUDA, "CUDA");
  const int64_t T = static_cast<int64_t>(grads.size());
  if (T == 0) {  // (an empty list does not dispatch here; kept for direct callers)
    auto f = at::TensorOptions().dtype(at::kFloat);
    return {at::empty({0}, f), at::empty({0}, f.dtype(at::kLong)),
            at::empty({0}, f.dtype(at::kLong)), at::zeros({}, f)};
  }
  const at::Device device = grads[0].device();
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = stream_is_capturing(stream.stream());

  // The memory the kernels work on: the tensor, or a contiguous copy whose units are blocks.
  std::vector<at::Tensor> gcopy(T), wcopy(T);
  std::vector<KeyItem> key(2 * T);
  bool any_double = false, any_copy = false;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& w = params[i];
    const void* gp = g.data_ptr();
    const void* wp = w.const_data_ptr();
    if (!units_are_blocks(g)) {
      gcopy[i] = g.contiguous();
      gp = gcopy[i].data_ptr();
      any_copy = true;
    }
    if (!units_are_blocks(w)) {
      wcopy[i] = w.contiguous();
      wp = wcopy[i].const_data_ptr();
      any_copy = true;
    }
    key[2 * i] = KeyItem{reinterpret_cast<uint64_t>(gp), g.numel(), to_dtype(g.scalar_type())};
    key[2 * i + 1] = KeyItem{reinterpret_cast<uint64_t>(wp), units_of(g),
                             to_dtype(w.scalar_type())};
    any_double = any_double || g.scalar_type() == at::kDouble;
  }
  const std::shared_ptr<Entry> entry = get_table(static_cast<int>(device.index()), kAgcTableTag,
                                                 std::move(key), stream, capturing,
                                                 build_agc_table);
  const std::vector<int64_t>& meta = entry->meta;
  // Shared memory: decide everything first, then write one gradient at a time, in list order.
  bool shared = meta[kKeyOverlap] != 0;
  if (!shared && any_copy) {  // the originals of copies may lie across other arguments
    std::vector<ByteSpan> written, read;
    for (int64_t i = 0; i < T; ++i) {
      written.push_back(byte_span(grads[i]));
      if (!wcopy[i].defined()) read.push_back(byte_span(params[i]));  // a copy is private
    }
    shared = spans_overlap(std::move(written), std::move(read));
  }

  const auto rd = any_double ? at::kDouble : at::kFloat;
  const auto fopt = at::TensorOptions().dtype(rd).device(device);
  at::Tensor norms = at::empty({T}, fopt);
  at::Tensor clipped = at::empty({T}, fopt.dtype(at::kLong));
  at::Tensor nonfinite = at::empty({T}, fopt.dtype(at::kLong));
  at::Tensor total = at::empty({}, fopt);

  // scratch: [pair_done | long_done | all_done | global] (zeroed), pair records, rows, pieces
  const int64_t off_long = T * static_cast<int64_t>(sizeof(unsigned long long));
  const int64_t off_all = off_long + meta[kLongs] * static_cast<int64_t>(sizeof(int32_t));
  const int64_t off_global = align16(off_all + static_cast<int64_t>(sizeof(int32_t)));
  const int64_t zeroed = off_global + static_cast<int64_t>(sizeof(AgcGlobal));
  const int64_t off_pairs = align16(zeroed);
  const int64_t off_rows = off_pairs + T * static_cast<int64_t>(sizeof(AgcPairRecord));
  const int64_t off_pieces = off_rows + meta[kRows] * static_cast<int64_t>(sizeof(AgcRow));
  const int64_t bytes = off_pieces + meta[kPieces] * static_cast<int64_t>(sizeof(AgcPiece));
  at::Tensor scratch = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  char* base = static_cast<char*>(scratch.data_ptr());
  C10_CUDA_CHECK(cudaMemsetAsync(base, 0, zeroed, stream.stream()));

  AgcParams P{};
  P.pairs = static_cast<const AgcPair*>(entry->table.const_data_ptr());
  P.num_pairs = static_cast<int32_t>(T);
  P.num_work = static_cast<int32_t>(meta[kWork]);
  P.total_items = meta[kItems];
  P.item_begin = 0;
  P.item_end = meta[kItems];
  P.kind = norm_kind(norm_type);
  P.deferred = shared ? 1 : 0;
  P.p = norm_type;
  P.clip_factor = clip_factor;
  P.eps = eps;
  P.rows = reinterpret_cast<AgcRow*>(base + off_rows);
  P.pieces = reinterpret_cast<AgcPiece*>(base + off_pieces);
  P.pair_rec = reinterpret_cast<AgcPairRecord*>(base + off_pairs);
  P.global = reinterpret_cast<AgcGlobal*>(base + off_global);
  P.pair_done = reinterpret_cast<unsigned long long*>(base);
  P.long_done = reinterpret_cast<int32_t*>(base + off_long);
  P.all_done = reinterpret_cast<int32_t*>(base + off_all);
  P.out_norms = norms.data_ptr();
  P.out_clipped = clipped.data_ptr<int64_t>();
  P.out_nonfinite = nonfinite.data_ptr<int64_t>();
  P.out_total = total.data_ptr();
  P.out_double = any_double ? 1 : 0;

  const int dev = static_cast<int>(device.index());
  const int cap = max_blocks();
  C10_CUDA_CHECK(launch_agc_reduce(P, agc_reduce_grid(dev, meta[kItems], cap), stream.stream()));
  // A strided gradient: written back from its copy only if one of its units was clipped.
  auto write_back_copy = [&](int64_t i) {
    write_back(grads[i], gcopy[i], nullptr, &P.pair_rec[i].clipped, stream.stream());
  };
  if (!shared) {
    if (meta[kPieces] > 0) {  // long units are scaled by the scale kernel
      C10_CUDA_CHECK(
          launch_agc_scale(P, agc_scale_grid(dev, meta[kItems], cap), stream.stream()));
    }
    for (int64_t i = 0; i < T; ++i) {
      if (gcopy[i].defined()) write_back_copy(i);
    }
    return {norms, clipped, nonfinite, total};
  }
  for (int64_t i = 0; i < T; ++i) {
    const int64_t items = meta[kPerPair + T + i];
    if (items == 0) continue;
    if (gcopy[i].defined()) gcopy[i].copy_(grads[i]);  // an earlier gradient may have written it
    AgcParams Q = P;
    Q.item_begin = meta[kPerPair + i];
    Q.item_end = Q.item_begin + items;
    C10_CUDA_CHECK(launch_agc_scale(Q, agc_scale_grid(dev, items, cap), stream.stream()));
    if (gcopy[i].defined()) write_back_copy(i);
  }
  return {norms, clipped, nonfinite, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CUDA, m) { m.impl("adaptive_clip", &adaptive_clip_cuda); }

}  // namespace cuda
}  // namespace gradstab
