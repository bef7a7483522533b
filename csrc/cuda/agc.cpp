// Contract: the CUDA kernel of gradstab::adaptive_clip (schema in gradstab/_library.py; unit-wise
// adaptive gradient clipping, AGC), registered for the CUDA dispatch key: the ATen side of
// agc_kernels.cu (argument checks, working copies, the table cache, outputs and scratch; the
// table, Params and launch sequence are agc_plan.h's, shared with the CPU execution harness
// csrc/testing/cuda_sim). Same semantics and results as the CPU kernel (csrc/cpu/agc.cpp, its
// mirror, up to the order of floating-point additions): returns (norms [T], clipped [T] int64,
// nonfinite [T] int64, total_norm []), the pre-clip p-norm of each gradient, its number of
// clipped units, its NaN/Inf count and the pre-clip total norm, float64 if any gradient is
// float64 (float32 otherwise), on the gradients' device.
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

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/args.h"
#include "cuda/agc_kernels.cuh"
#include "cuda/agc_plan.h"
#include "cuda/norm_kernels.cuh"
#include "cuda/table_cache.h"

namespace gradstab {
namespace cuda {
namespace {

using AgcStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int32_t kAgcTableTag = 1;  // distinct from the norm ops' tables

int64_t units_of(const at::Tensor& t) { return t.dim() <= 1 ? 1 : t.size(0); }

// Whether the units of `t` are the blocks [u * unit_len, (u + 1) * unit_len) of its memory from
// data_ptr() (dense, non-overlapping, dim 0 outermost): the kernels then read it in place.
bool units_are_blocks(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t units = units_of(t);
  return units == 1 || t.stride(0) == t.numel() / units;
}

// The AGC plan's device: kernels on the CUDA stream, strided gradients' copies with ATen.
class CudaAgcDevice final : public AgcDevice {
 public:
  CudaAgcDevice(int device, cudaStream_t stream, at::TensorList grads,
                std::vector<at::Tensor>& copies)
      : device_(device), stream_(stream), grads_(grads), copies_(copies) {}
  void zero(void* dst, int64_t bytes) override {
    C10_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(bytes), stream_));
  }
  void reduce(const AgcParams& P, int64_t items) override {
    C10_CUDA_CHECK(launch_agc_reduce(P, agc_reduce_grid(device_, items, max_blocks()), stream_));
  }
  void scale(const AgcParams& P, int64_t items) override {
    C10_CUDA_CHECK(launch_agc_scale(P, agc_scale_grid(device_, items, max_blocks()), stream_));
  }
  void refresh_copy(int64_t i) override { copies_[i].copy_(grads_[i]); }
  void write_back(int64_t i, const int64_t* flag64) override {
    cuda::write_back(grads_[i], copies_[i], nullptr, flag64, stream_);
  }

 private:
  int device_;
  cudaStream_t stream_;
  at::TensorList grads_;
  std::vector<at::Tensor>& copies_;
};

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
  bool shared = meta[kAgcKeyOverlap] != 0;
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

  const AgcScratch layout = agc_scratch(T, meta);
  at::Tensor scratch =
      at::empty({layout.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  const AgcOutputs out{norms.data_ptr(), clipped.data_ptr<int64_t>(),
                       nonfinite.data_ptr<int64_t>(), total.data_ptr(), any_double};
  const AgcParams P = agc_params(entry->table.const_data_ptr(), meta, T,
                                 static_cast<char*>(scratch.data_ptr()), layout,
                                 norm_kind(norm_type), shared, norm_type, clip_factor, eps, out);
  std::vector<char> has_copy(T);
  for (int64_t i = 0; i < T; ++i) has_copy[i] = gcopy[i].defined() ? 1 : 0;
  CudaAgcDevice cuda_dev(static_cast<int>(device.index()), stream.stream(), grads, gcopy);
  agc_run(P, meta, layout, has_copy, cuda_dev);
  return {norms, clipped, nonfinite, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CUDA, m) { m.impl("adaptive_clip", &adaptive_clip_cuda); }

}  // namespace cuda
}  // namespace gradstab
