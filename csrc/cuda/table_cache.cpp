// Contract: see table_cache.h. The implementation of the descriptor-table cache, the grid cap of
// the test hook and the strided write-back, shared by the CUDA launchers (norm_ops.cpp, agc.cpp).
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
#include "cuda/table_cache.h"

#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <mutex>

#include "cuda/norm_ops.h"

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

void set_max_blocks(int blocks) { g_max_blocks.store(blocks < 0 ? 0 : blocks); }

CacheStats cache_stats() { return cache().stats(); }

void clear_cache() { cache().clear(); }

}  // namespace cuda
}  // namespace gradstab
