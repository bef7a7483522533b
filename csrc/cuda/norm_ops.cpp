// Contract: the CUDA kernels of the gradstab ops grad_stats, clip_norm, clip_norm_per_layer,
// clip_value, normalize_per_layer and clip_with_norm (schemas in gradstab/_library.py), registered
// for the CUDA dispatch key: the ATen side of norm_kernels.cu (argument checks, working copies,
// outputs and scratch; the table, mode, Params and launch sequence are norm_plan.h's, shared with
// the CPU execution harness csrc/testing/cuda_sim; the table cache and write-back are
// table_cache.h's). Semantics as its CPU mirror, csrc/cpu/norm_ops.cpp; see norm_ops.h and
// norm_kernels.cuh.
//
// Per call, with no host-device synchronisation (except error_if_nonfinite=True, which must read
// the norm, as returned: inf also where a float32 result overflows): check every argument; make
// a contiguous copy of any gradient that is not dense and non-overlapping (rare: a strided view
// assigned as .grad; a dense permuted or channels-last gradient is used in place); look up the
// descriptor table of this exact list of (data pointer, numel, dtype) in a per-process cache,
// building and uploading it on a miss; allocate the outputs and one scratch buffer from
// PyTorch's caching allocator; zero the completion counters (cudaMemsetAsync); launch the
// reduce kernel and, for clipping, the scale kernel, all on the current stream under a device
// guard. After a clipping op, the copy of a strided gradient is written back by a small kernel
// that first reads the device flag saying whether the call changed that tensor (nothing is
// written on a healthy step, as on the CPU); a gradient whose dimensions cannot be merged into
// 12 is copied back with copy_ unconditionally (refused up front if it is an expanded view).
//
// Gradients that share memory (the same tensor twice, overlapping views; known from the cached
// table for dense gradients, checked per call when a strided one is present) would race in the
// scale kernel (and in value clipping's fused clamp): the statistics are then taken first (value
// clipping deferred to the scale kernel), and the scale kernel runs once per gradient, over just
// its units, in list order, each gradient scaled by its coefficient from the statistics on entry
// (a gradient passed twice is scaled twice, as by PyTorch's loops); a strided gradient is re-read
// into its copy just before its turn. An expanded gradient on its own is written back with
// aliased elements receiving equal values (one coefficient per tensor), so it is accepted.
#include "cuda/norm_ops.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <memory>
#include <sstream>
#include <vector>

#include "common/args.h"
#include "common/messages.h"
#include "cuda/norm_kernels.cuh"
#include "cuda/norm_plan.h"
#include "cuda/table_cache.h"

namespace gradstab {
namespace cuda {
namespace {

constexpr int32_t kNormTableTag = 0;  // the table cache's tag of build_norm_table's tables

// ------------------------------------------------------------------------- arguments --

// The bound as the kernel reads it: a device pointer (never read here) or a host value.
struct BoundArg {
  const double* ptr = nullptr;
  double value = 0.0;
  at::Tensor keep;  // the float64 device copy `ptr` points into
};

BoundArg resolve_bound(const Bound& bound, const char* name, const at::Device& device) {
  BoundArg out;
  if (bound.tensor == nullptr) {
    out.value = bound.value;
  } else {
    const at::Tensor& b = *bound.tensor;
    TORCH_CHECK_VALUE(b.numel() == 1, "gradstab: ", name,
                      " must be a tensor with one element, got shape ", b.sizes());
    TORCH_CHECK_VALUE(!b.is_complex(), "gradstab: ", name, " must be a real number, got dtype ",
                      b.scalar_type());
    if (b.device().is_cpu()) {
      out.value = b.item<double>();  // a CPU tensor: no device sync
    } else {
      TORCH_CHECK_VALUE(b.device() == device, "gradstab: ", name, " is on ", b.device(),
                        " but the gradients are on ", device);
      out.keep = b.reshape({}).to(at::kDouble);  // on the device, asynchronous; not checked
      out.ptr = out.keep.const_data_ptr<double>();
      return out;
    }
  }
  TORCH_CHECK_VALUE(out.value >= 0.0, "gradstab: ", name,
                    " must be a non-negative number, got ", out.value);
  return out;
}

std::string nonfinite_message(double p, double total, at::TensorList grads,
                              const at::Tensor& nonfinite_cpu) {
  const int64_t* nf = nonfinite_cpu.const_data_ptr<int64_t>();
  return gradstab::nonfinite_message(p, total, grads, std::vector<int64_t>(nf, nf + grads.size()));
}

// The norm plan's device: kernels on the CUDA stream, strided gradients' copies with ATen.
class CudaNormDevice final : public NormDevice {
 public:
  CudaNormDevice(int device, cudaStream_t stream, at::TensorList grads,
                 std::vector<at::Tensor>& copies)
      : device_(device), stream_(stream), grads_(grads), copies_(copies) {}
  void zero(void* dst, int64_t bytes) override {
    C10_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(bytes), stream_));
  }
  void reduce(const Params& P, int64_t units) override {
    C10_CUDA_CHECK(launch_reduce(P, reduce_grid(device_, units, max_blocks()), stream_));
  }
  void scale(const Params& P, int64_t units) override {
    C10_CUDA_CHECK(launch_scale(P, scale_grid(device_, units, max_blocks()), stream_));
  }
  void refresh_copy(int64_t i) override { copies_[i].copy_(grads_[i]); }
  void write_back(int64_t i, const int32_t* flag32, const int64_t* flag64) override {
    cuda::write_back(grads_[i], copies_[i], flag32, flag64, stream_);
  }

 private:
  int device_;
  cudaStream_t stream_;
  at::TensorList grads_;
  std::vector<at::Tensor>& copies_;
};

// The memory the kernels of one call work on, prepared before anything is launched.
struct Working {
  std::vector<at::Tensor> copy_of;  // a contiguous copy of a strided gradient; else undefined
  std::shared_ptr<Entry> entry;     // the cached descriptor table of this list
  bool any_double = false;
  bool shared = false;  // writing gradients share memory: written one at a time (norm_write)
  std::vector<char> has_copy() const {
    std::vector<char> out(copy_of.size());
    for (size_t i = 0; i < copy_of.size(); ++i) out[i] = copy_of[i].defined() ? 1 : 0;
    return out;
  }
};

Working prepare(at::TensorList grads, bool writing, const at::Device& device,
                const c10::cuda::CUDAStream& stream, bool capturing) {
  const int64_t T = static_cast<int64_t>(grads.size());
  Working w;
  w.copy_of.resize(T);
  // The memory the kernels work on: the gradient, or a contiguous copy of a strided one.
  std::vector<KeyItem> key(T);
  bool any_copy = false;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    if (writing) check_writeback(g, i, T);  // before anything is written
    const void* ptr = g.data_ptr();
    if (g.numel() > 0 && !g.is_non_overlapping_and_dense()) {
      w.copy_of[i] = g.contiguous();
      ptr = w.copy_of[i].data_ptr();
      any_copy = true;
    }
    key[i] = KeyItem{reinterpret_cast<uint64_t>(ptr), g.numel(), to_dtype(g.scalar_type())};
    w.any_double = w.any_double || g.scalar_type() == at::kDouble;
  }
  w.entry = get_table(static_cast<int>(device.index()), kNormTableTag, std::move(key), stream,
                      capturing, build_norm_table);
  // Gradients that share memory (the same tensor twice, overlapping views) would race in the
  // write passes: they are then written one at a time, in list order, after the statistics.
  if (writing) {
    w.shared = w.entry->meta[kKeyOverlap] != 0;  // dense gradients, known from the cached key
    if (!w.shared && any_copy) {  // a strided one may lie across any other
      std::vector<ByteSpan> spans;
      spans.reserve(T);
      for (const at::Tensor& g : grads) spans.push_back(byte_span(g));
      w.shared = spans_overlap(std::move(spans), {});
    }
  }
  return w;
}

}  // namespace

// ------------------------------------------------------------------------------- ops --

Stats run_op(Op op, at::TensorList grads, const Bound& bound, double norm_type, double eps,
             bool error_if_nonfinite) {
  check_norm_type(norm_type);
  check_grads(grads, at::kCUDA, "CUDA");
  const char* bound_name = op == Op::kClipValue           ? "clip_value"
                           : op == Op::kNormalizePerLayer ? "target_norm"
                                                          : "max_norm";
  const int64_t T = static_cast<int64_t>(grads.size());
  if (T == 0) {  // reached only through a bound on the device; nothing to do
    at::Device dev = bound.tensor != nullptr ? bound.tensor->device() : at::Device(at::kCPU);
    auto f = at::TensorOptions().dtype(at::kFloat).device(dev);
    return {at::empty({0}, f), at::empty({0}, f), at::empty({0}, f.dtype(at::kLong)),
            at::zeros({}, f)};
  }
  const at::Device device = grads[0].device();
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = stream_is_capturing(stream.stream());
  TORCH_CHECK(!(error_if_nonfinite && capturing),
              "gradstab: error_if_nonfinite=True reads the total norm on the host, which is not "
              "possible while a CUDA graph is being captured; capture with "
              "error_if_nonfinite=False");
  BoundArg b;
  if (op != Op::kStats) b = resolve_bound(bound, bound_name, device);

  Working w = prepare(grads, op != Op::kStats, device, stream, capturing);
  const int32_t kind = norm_kind(norm_type);
  const int32_t mode = norm_mode(op, kind, w.any_double, w.shared);

  const auto rd = w.any_double ? at::kDouble : at::kFloat;
  const auto fopt = at::TensorOptions().dtype(rd).device(device);
  at::Tensor norms = at::empty({T}, fopt);
  at::Tensor max_abs = at::empty({T}, fopt);
  at::Tensor nonfinite = at::empty({T}, fopt.dtype(at::kLong));
  at::Tensor total = at::empty({}, fopt);

  const NormScratch layout = norm_scratch(T, w.entry->meta[kTotalUnits]);
  at::Tensor scratch =
      at::empty({layout.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  NormOutputs out{norms.data_ptr(), max_abs.data_ptr(), nonfinite.data_ptr<int64_t>(),
                  total.data_ptr(), w.any_double};
  const Params P = norm_params(w.entry->table.const_data_ptr(), w.entry->meta, T,
                               static_cast<char*>(scratch.data_ptr()), layout, kind, mode,
                               norm_type, eps, b.ptr, b.value, out);
  CudaNormDevice cuda_dev(static_cast<int>(device.index()), stream.stream(), grads, w.copy_of);
  norm_reduce(P, layout, cuda_dev);

  if (error_if_nonfinite) {  // the documented host sync: the caller asked for it
    // The norm as returned: inf also where a float32 result overflows (beyond FLT_MAX).
    const double t = total.item<double>();
    if (!std::isfinite(t)) {
      TORCH_CHECK(false, nonfinite_message(norm_type, t, grads, nonfinite.cpu()));
    }
  }
  norm_write(P, w.entry->meta, w.shared, w.has_copy(), cuda_dev);
  return {norms, max_abs, nonfinite, total};
}

namespace {

// Scale by min(1, max_norm / (total_norm + eps)) with the total given: the scale kernel alone
// (kClipNorm), after the global record is set on the device.
void clip_with_norm_cuda(at::TensorList grads, const at::Tensor& max_norm,
                         const at::Tensor& total_norm, double eps) {
  check_grads(grads, at::kCUDA, "CUDA");
  TORCH_CHECK_VALUE(total_norm.numel() == 1, "gradstab: total_norm must be a tensor with one "
                    "element, got shape ", total_norm.sizes());
  TORCH_CHECK_VALUE(!total_norm.is_complex(), "gradstab: total_norm must be a real number, got "
                    "dtype ", total_norm.scalar_type());
  if (grads.empty()) return;  // reached only through a tensor on the device: nothing to scale
  const at::Device device = grads[0].device();
  TORCH_CHECK_VALUE(total_norm.device().is_cpu() || total_norm.device() == device,
                    "gradstab: total_norm is on ", total_norm.device(),
                    " but the gradients are on ", device);
  Bound bound;
  bound.tensor = &max_norm;
  c10::cuda::CUDAGuard guard(device);
  const BoundArg b = resolve_bound(bound, "max_norm", device);
  if (b.ptr == nullptr && total_norm.device().is_cpu()) {
    // Both on the host: the coefficient is known here, and 1 writes nothing at all.
    const double t = total_norm.item<double>();
    const double c = b.value / (t + eps);
    if (!(c < 1.0 || std::isnan(c))) return;
  }
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = stream_is_capturing(stream.stream());
  Working w = prepare(grads, true, device, stream, capturing);
  const int64_t T = static_cast<int64_t>(grads.size());
  const NormScratch layout = norm_scratch(T, w.entry->meta[kTotalUnits]);
  at::Tensor scratch =
      at::empty({layout.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  // The global record the scale kernel reads, set on the device (no host sync): coef =
  // min(1, max_norm / (total + eps)) in float64 (NaN stays NaN, as in clip_coef on the CPU), and
  // the scale flag, nonzero unless the coefficient is exactly 1 (then nothing is written).
  const auto dopt = at::TensorOptions().dtype(at::kDouble).device(device);
  const at::Tensor bound_t = b.ptr != nullptr ? b.keep : at::scalar_tensor(b.value, dopt);
  at::Tensor coef = bound_t / (total_norm.to(dopt).reshape({}) + eps);
  coef = at::where(coef < 1.0, coef, at::where(at::isnan(coef), coef, at::ones_like(coef)));
  at::Tensor record = scratch.narrow(0, layout.global, sizeof(GlobalRecord));
  record.zero_();
  record.narrow(0, offsetof(GlobalRecord, coef), sizeof(double)).view(at::kDouble).copy_(
      coef.reshape({1}));
  record.narrow(0, offsetof(GlobalRecord, scale), sizeof(int32_t)).view(at::kInt).copy_(
      coef.ne(1.0).to(at::kInt).reshape({1}));
  NormOutputs none{nullptr, nullptr, nullptr, nullptr, w.any_double};
  const Params P = norm_params(w.entry->table.const_data_ptr(), w.entry->meta, T,
                               static_cast<char*>(scratch.data_ptr()), layout, kL2, kClipNorm,
                               2.0, eps, nullptr, 0.0, none);
  CudaNormDevice cuda_dev(static_cast<int>(device.index()), stream.stream(), grads, w.copy_of);
  norm_write(P, w.entry->meta, w.shared, w.has_copy(), cuda_dev);
}

}  // namespace

std::string build_description() {
  std::ostringstream os;
  os << "CUDA runtime " << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10
     << " at build time; one persistent-grid launch over " << kUnitBytes / 1024
     << " KB units of every gradient, last-block-done finish, scale pass only when clipping";
  return os.str();
}

namespace {

Stats grad_stats_cuda(at::TensorList grads, double norm_type) {
  return run_op(Op::kStats, grads, Bound{}, norm_type, 0.0, false);
}

Stats clip_norm_cuda(at::TensorList grads, const at::Tensor& max_norm, double norm_type,
                     double eps, bool error_if_nonfinite) {
  Bound b;
  b.tensor = &max_norm;
  return run_op(Op::kClipNorm, grads, b, norm_type, eps, error_if_nonfinite);
}

Stats clip_norm_per_layer_cuda(at::TensorList grads, const at::Tensor& max_norm,
                               double norm_type, double eps) {
  Bound b;
  b.tensor = &max_norm;
  return run_op(Op::kClipNormPerLayer, grads, b, norm_type, eps, false);
}

Stats normalize_per_layer_cuda(at::TensorList grads, const at::Tensor& target_norm,
                               double norm_type, double eps) {
  Bound b;
  b.tensor = &target_norm;
  return run_op(Op::kNormalizePerLayer, grads, b, norm_type, eps, false);
}

Stats clip_value_cuda(at::TensorList grads, const at::Tensor& clip_value, double norm_type) {
  Bound b;
  b.tensor = &clip_value;
  return run_op(Op::kClipValue, grads, b, norm_type, 0.0, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CUDA, m) {
  m.impl("grad_stats", &grad_stats_cuda);
  m.impl("clip_norm", &clip_norm_cuda);
  m.impl("clip_norm_per_layer", &clip_norm_per_layer_cuda);
  m.impl("clip_value", &clip_value_cuda);
  m.impl("normalize_per_layer", &normalize_per_layer_cuda);
  m.impl("clip_with_norm", &clip_with_norm_cuda);
}

}  // namespace cuda
}  // namespace gradstab
