// Contract: the CUDA kernels of the gradstab ops grad_stats, clip_norm, clip_norm_per_layer,
// clip_value and normalize_per_layer (schemas in gradstab/_library.py), registered for the CUDA
// dispatch key; the ATen side of kernels.cu (argument checks, working copies, the table cache,
// outputs and scratch; the table, mode, Params and launch sequence are norm_plan.h's, shared with
// the CPU execution harness csrc/testing/cuda_sim), and the table cache and write-back helpers
// declared in table_cache.h (also used by agc_ops_cuda.cpp). Semantics as ops_cpu.cpp; see
// ops_cuda.h and kernels.cuh.
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
//
// The descriptor-table cache (why and how it stays correct):
//   * an entry is immutable: the table of one list of (pointer, numel, dtype) on one device. A
//     call whose gradients were reallocated (another pointer, shape or dtype) misses and gets a
//     new entry; the least recently used of 32 entries is dropped.
//   * eager miss: the table is written to pinned memory and copied with one non_blocking H2D
//     copy (the pinned block is recycled by PyTorch's host allocator only after the copy ran);
//     an event marks the copy's completion.
//   * entries are shared across streams: the first use on another stream makes that stream wait
//     for the copy's event (on the device) and records the table with the caching allocator
//     (recordStream), so its memory is not reused while that stream may still read it.
//   * CUDA graph capture: an entry used during a capture is referenced by the graph, so it is
//     never freed or changed again (kept for the life of the process; about 48 bytes per tensor).
//     A miss during capture cannot use the host allocator (not capture-safe) nor a pageable
//     copy: the table is written to pinned memory from cudaHostAlloc (under a relaxed capture
//     mode, as PyTorch's own allocator does for cudaMalloc) that is never freed, and the H2D
//     copy becomes a node of the graph (re-run by each replay: a few microseconds). Such a table
//     holds its data only once a replay ran, so a later eager call writes it first (from the
//     kept pinned copy), and a later capture reading a table never written eagerly carries its
//     own copy node. Calling the op once eagerly on the same gradients before capturing keeps
//     the copy out of the graph (torch.cuda.graph synchronizes the device before capturing,
//     so the eager copy has completed).
//   * the scratch buffer and outputs are allocated per call (under capture, from the graph's
//     private pool), so concurrent calls on different streams never share counters.
#include "cuda/ops_cuda.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "common/messages.h"
#include "cuda/kernels.cuh"
#include "cuda/norm_plan.h"
#include "cuda/table_cache.h"

namespace gradstab {
namespace cuda {
namespace {

std::atomic<int> g_max_blocks{0};

// ------------------------------------------------------------------ descriptor tables --

std::shared_ptr<Entry> build_entry(int device, int32_t tag, std::vector<KeyItem>&& key,
                                   HostTable&& host, const c10::cuda::CUDAStream& stream,
                                   bool capturing) {
  auto e = std::make_shared<Entry>();
  e->device = device;
  e->tag = tag;
  e->key = std::move(key);
  e->meta = std::move(host.meta);
  e->home = stream.stream();
  const int64_t bytes = std::max<int64_t>(static_cast<int64_t>(host.bytes.size()), 16);
  e->bytes = bytes;
  const auto dev_opts = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device);
  if (!capturing) {
    // One asynchronous H2D copy from pinned memory; PyTorch's host allocator recycles the
    // pinned block only after the copy has run.
    at::Tensor pinned =
        at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memset(pinned.data_ptr(), 0, bytes);
    if (!host.bytes.empty()) std::memcpy(pinned.data_ptr(), host.bytes.data(), host.bytes.size());
    e->table = at::empty({bytes}, dev_opts);
    e->table.copy_(pinned, /*non_blocking=*/true);
    e->mark_filled(stream.stream());
  } else {
    // Kept for the life of the process: the graph's copy node reads it at every replay.
    void* h = nullptr;
    {
      c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      C10_CUDA_CHECK(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
    }
    std::memset(h, 0, bytes);
    if (!host.bytes.empty()) std::memcpy(h, host.bytes.data(), host.bytes.size());
    e->host_copy = h;
    e->table = at::empty({bytes}, dev_opts);  // from the graph's private pool; never freed
    e->retained = true;  // the copy node itself is added by TableCache::get
  }
  return e;
}

constexpr int32_t kNormTableTag = 0;  // the table cache's tag of build_norm_table's tables

class TableCache {
 public:
  std::shared_ptr<Entry> get(int device, int32_t tag, std::vector<KeyItem>&& key,
                             const c10::cuda::CUDAStream& stream, bool capturing,
                             const TableBuilder& build) {
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<Entry> e;
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if ((*it)->device == device && (*it)->tag == tag && (*it)->key == key) {
        e = *it;
        lru_.splice(lru_.begin(), lru_, it);
        ++stats_.hits;
        break;
      }
    }
    if (!e) {
      ++stats_.misses;
      if (capturing) ++stats_.built_in_capture;
      HostTable host = build(key);
      e = build_entry(device, tag, std::move(key), std::move(host), stream, capturing);
      lru_.push_front(e);
      while (lru_.size() > kCapacity) {
        if (lru_.back()->retained) kept_.push_back(lru_.back());
        lru_.pop_back();
      }
    }
    if (capturing) {
      e->retained = true;
      if (!e->filled) {
        // Built during a capture and never written eagerly: each graph that reads the table
        // carries its own copy node (a graph may be replayed before any other fills it).
        C10_CUDA_CHECK(cudaMemcpyAsync(e->table.data_ptr(), e->host_copy, e->bytes,
                                       cudaMemcpyHostToDevice, stream.stream()));
      }
    } else if (!e->filled) {
      // Built during a capture: the device table holds the data only once a replay ran; write
      // it now, eagerly, from the kept pinned copy.
      C10_CUDA_CHECK(cudaMemcpyAsync(e->table.data_ptr(), e->host_copy, e->bytes,
                                     cudaMemcpyHostToDevice, stream.stream()));
      e->mark_filled(stream.stream());
    } else if (stream.stream() != e->home &&
               std::find(e->recorded.begin(), e->recorded.end(), stream.stream()) ==
                   e->recorded.end()) {
      // First use on another stream: wait (on the device) for the table's copy, and tell the
      // caching allocator the table is in use there.
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), e->ready, 0));
      if (!e->retained) {
        c10::cuda::CUDACachingAllocator::recordStream(e->table.storage().data_ptr(), stream);
      }
      e->recorded.push_back(stream.stream());
    }
    return e;
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    CacheStats s = stats_;
    s.entries = static_cast<int64_t>(lru_.size());
    s.retained = static_cast<int64_t>(kept_.size());
    for (const auto& e : lru_) s.retained += e->retained ? 1 : 0;
    return s;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& e : lru_) {
      if (e->retained) kept_.push_back(e);
    }
    lru_.clear();
  }

 private:
  static constexpr size_t kCapacity = 32;
  std::mutex mu_;
  std::list<std::shared_ptr<Entry>> lru_;
  std::vector<std::shared_ptr<Entry>> kept_;  // dropped from the LRU but used by a capture
  CacheStats stats_;
};

TableCache& cache() {
  static TableCache* c = new TableCache();  // never destroyed: graphs may outlive static dtors
  return *c;
}

std::vector<std::pair<int64_t, int64_t>> coalesced_dims(const at::Tensor& g) {
  return cuda::coalesced_dims(g.sizes().data(), g.strides().data(), g.dim());
}

}  // namespace

Entry::~Entry() {
  if (ready != nullptr) (void)cudaEventDestroy(ready);  // deferred by the driver if pending
}

void Entry::mark_filled(cudaStream_t stream) {
  if (ready == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ready, stream));
  home = stream;
  filled = true;
}

std::shared_ptr<Entry> get_table(int device, int32_t tag, std::vector<KeyItem>&& key,
                                 const c10::cuda::CUDAStream& stream, bool capturing,
                                 const TableBuilder& build) {
  return cache().get(device, tag, std::move(key), stream, capturing, build);
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

int max_blocks() { return g_max_blocks.load(std::memory_order_relaxed); }

ByteSpan byte_span(const at::Tensor& t) {
  return strided_byte_span(reinterpret_cast<uint64_t>(t.const_data_ptr()), t.sizes().data(),
                           t.strides().data(), t.dim(), static_cast<int64_t>(t.element_size()));
}

void check_writeback(const at::Tensor& g, int64_t index, int64_t count) {
  if (g.numel() == 0 || g.is_non_overlapping_and_dense()) return;
  if (static_cast<int64_t>(coalesced_dims(g).size()) <= kMaxWritebackDims) return;
  TORCH_CHECK_VALUE(at::has_internal_overlap(g) != at::MemOverlap::Yes, "gradstab: gradient ",
                    index, " of ", count, " (shape ", g.sizes(), ") has more than ",
                    kMaxWritebackDims, " dimensions that cannot be merged and several of its "
                    "elements share one memory location (an expanded view?), so it cannot be "
                    "written back in place. Give it its own memory first, e.g. "
                    "`p.grad = p.grad.clone()`. No gradient was changed.");
}

void write_back(const at::Tensor& g, const at::Tensor& copy, const int32_t* flag32,
                const int64_t* flag64, cudaStream_t stream) {
  WritebackParams W{};
  if (!writeback_params(copy.const_data_ptr(), g.data_ptr(), g.numel(),
                        static_cast<int64_t>(g.element_size()), coalesced_dims(g), flag32, flag64,
                        &W)) {
    g.copy_(copy);  // more dimensions than the write-back kernel takes: always copied
    return;
  }
  C10_CUDA_CHECK(launch_writeback(W, stream));
}

namespace {

// ------------------------------------------------------------------------- arguments --

void check_grads(at::TensorList grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), "gradstab: gradient ", i, " of ", grads.size(),
                      " is undefined");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "gradstab: gradient ", i, " of ",
                      grads.size(), " has layout ", g.layout(),
                      "; only dense (strided) gradients are supported. Convert it with "
                      "`p.grad = p.grad.to_dense()`");
    TORCH_CHECK_VALUE(g.device() == grads[0].device(),
                      "gradstab: all gradients of one call must be on one device, gradient 0 "
                      "is on ", grads[0].device(), " and gradient ", i, " on ", g.device(),
                      "; call once per device");
    const auto st = g.scalar_type();
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat ||
                         st == at::kDouble,
                     "gradstab: gradient ", i, " of ", grads.size(), " has dtype ", st,
                     "; only float16, bfloat16, float32 and float64 gradients are supported");
    TORCH_CHECK(g.device().is_cuda(), "gradstab: the CUDA kernel got a gradient on ",
                g.device());
  }
}

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

}  // namespace

// ------------------------------------------------------------------------------- ops --

Stats run_op(Op op, at::TensorList grads, const Bound& bound, double norm_type, double eps,
             bool error_if_nonfinite) {
  TORCH_CHECK_VALUE(norm_type > 0.0 && !std::isnan(norm_type),
                    "gradstab: norm_type must be a positive number or inf, got ", norm_type);
  check_grads(grads);
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

  // The memory the kernels work on: the gradient, or a contiguous copy of a strided one.
  std::vector<at::Tensor> copy_of(T);  // undefined where the gradient itself is used
  std::vector<KeyItem> key(T);
  bool any_double = false, any_copy = false;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    if (op != Op::kStats) check_writeback(g, i, T);  // before anything is written
    const void* ptr = g.data_ptr();
    if (g.numel() > 0 && !g.is_non_overlapping_and_dense()) {
      copy_of[i] = g.contiguous();
      ptr = copy_of[i].data_ptr();
      any_copy = true;
    }
    key[i] = KeyItem{reinterpret_cast<uint64_t>(ptr), g.numel(), to_dtype(g.scalar_type())};
    any_double = any_double || g.scalar_type() == at::kDouble;
  }
  const std::shared_ptr<Entry> entry = get_table(static_cast<int>(device.index()),
                                                 kNormTableTag, std::move(key), stream,
                                                 capturing, build_norm_table);
  // Gradients that share memory (the same tensor twice, overlapping views) would race in the
  // write passes: they are then written one at a time, in list order, after the statistics.
  bool shared = false;
  if (op != Op::kStats) {
    shared = entry->meta[kKeyOverlap] != 0;  // dense gradients, known from the cached key
    if (!shared && any_copy) {                // a strided one may lie across any other
      std::vector<ByteSpan> spans;
      spans.reserve(T);
      for (const at::Tensor& g : grads) spans.push_back(byte_span(g));
      shared = spans_overlap(std::move(spans), {});
    }
  }
  const int32_t kind = norm_kind(norm_type);
  int32_t requested = kStats;
  switch (op) {
    case Op::kStats: requested = kStats; break;
    case Op::kClipNorm: requested = kClipNorm; break;
    case Op::kClipNormPerLayer: requested = kClipPerLayer; break;
    case Op::kNormalizePerLayer: requested = kNormalize; break;
    case Op::kClipValue: requested = kClipValue; break;
  }
  const int32_t mode = norm_mode(requested, kind, any_double, shared);

  const auto rd = any_double ? at::kDouble : at::kFloat;
  const auto fopt = at::TensorOptions().dtype(rd).device(device);
  at::Tensor norms = at::empty({T}, fopt);
  at::Tensor max_abs = at::empty({T}, fopt);
  at::Tensor nonfinite = at::empty({T}, fopt.dtype(at::kLong));
  at::Tensor total = at::empty({}, fopt);

  const NormScratch layout = norm_scratch(T, entry->meta[kTotalUnits]);
  at::Tensor scratch =
      at::empty({layout.bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  NormOutputs out{norms.data_ptr(), max_abs.data_ptr(), nonfinite.data_ptr<int64_t>(),
                  total.data_ptr(), any_double};
  const Params P = norm_params(entry->table.const_data_ptr(), entry->meta, T,
                               static_cast<char*>(scratch.data_ptr()), layout, kind, mode,
                               norm_type, eps, b.ptr, b.value, out);
  CudaNormDevice cuda_dev(static_cast<int>(device.index()), stream.stream(), grads, copy_of);
  norm_reduce(P, layout, cuda_dev);

  if (error_if_nonfinite) {  // the documented host sync: the caller asked for it
    // The norm as returned: inf also where a float32 result overflows (beyond FLT_MAX).
    const double t = total.item<double>();
    if (!std::isfinite(t)) {
      TORCH_CHECK(false, nonfinite_message(norm_type, t, grads, nonfinite.cpu()));
    }
  }
  std::vector<char> has_copy(T);
  for (int64_t i = 0; i < T; ++i) has_copy[i] = copy_of[i].defined() ? 1 : 0;
  norm_write(P, entry->meta, shared, has_copy, cuda_dev);
  return {norms, max_abs, nonfinite, total};
}

void set_max_blocks(int blocks) { g_max_blocks.store(blocks < 0 ? 0 : blocks); }

CacheStats cache_stats() { return cache().stats(); }

void clear_cache() { cache().clear(); }

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
}

}  // namespace cuda
}  // namespace gradstab
