// Contract: the simulator behind gs_sim::launch (include/gs_sim/runtime.h) and the lane-side
// hooks the device header calls (warp collectives, checked global accesses). See runtime.h for
// what a launch does and checks. Two executors:
//   * concurrent: one std::thread per CUDA thread, a warp's lanes meeting at a mutex/condition
//     variable barrier per collective (what ThreadSanitizer runs);
//   * one warp at a time: the warp's 32 lanes as fibers (ucontext) on the calling thread,
//     switched round-robin at each collective. Same semantics for these kernels (warps never
//     wait for each other; lanes of a warp interleave between collectives), about 20x cheaper
//     than waking 32 OS threads per shuffle on a two-core machine.
// Errors are recorded once per launch (the first one wins) and every lane then stops at its
// next collective or access by unwinding (LaneAbort).
#include "gs_sim/runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include <ucontext.h>

#include "gs_sim/device.h"

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#define GS_IGNORE_SYNC_BEGIN() AnnotateIgnoreSyncBegin(__FILE__, __LINE__)
#define GS_IGNORE_SYNC_END() AnnotateIgnoreSyncEnd(__FILE__, __LINE__)
#define GS_TSAN_ACQUIRE(p) __tsan_acquire(p)
#define GS_TSAN_RELEASE(p) __tsan_release(p)
#else
#define GS_IGNORE_SYNC_BEGIN() ((void)0)
#define GS_IGNORE_SYNC_END() ((void)0)
#define GS_TSAN_ACQUIRE(p) ((void)(p))
#define GS_TSAN_RELEASE(p) ((void)(p))
#endif

namespace gs_sim {
namespace {

struct LaneAbort {};  // thrown to unwind a lane after an error was recorded

const char* collective_name(Collective op) {
  switch (op) {
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kAny: return "__any_sync";
    case Collective::kAll: return "__all_sync";
    default: return "__syncwarp";
  }
}

std::string site_text(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::ostringstream os;
  os << (base != nullptr ? base + 1 : file) << ":" << line;
  return os.str();
}

struct Launch;

// One warp's meeting point. Every field a lane touches is atomic: for the collectives that do
// not order memory, ThreadSanitizer is told to ignore the mutex, so the fields must not race.
struct Warp {
  std::mutex m;
  std::condition_variable cv;
  std::atomic<int> arrived{0};
  std::atomic<int> exited{0};
  std::atomic<uint64_t> gen{0};
  std::atomic<uint64_t> value[2][32];  // by generation parity: no second barrier needed
  std::atomic<const char*> file[32];
  std::atomic<int> line[32];
  std::atomic<int> op[32];
  std::atomic<bool> gone[32];

  Warp() {
    for (int i = 0; i < 32; ++i) {
      value[0][i].store(0, std::memory_order_relaxed);
      value[1][i].store(0, std::memory_order_relaxed);
      file[i].store(nullptr, std::memory_order_relaxed);
      line[i].store(0, std::memory_order_relaxed);
      op[i].store(-1, std::memory_order_relaxed);
      gone[i].store(false, std::memory_order_relaxed);
    }
  }
};

// Counters a lane keeps for itself and adds to the launch's when it ends (relaxed: no
// synchronization between lanes that ThreadSanitizer could take for the kernels').
struct LaneCounters {
  int64_t collectives = 0, loads = 0, stores = 0, vec_loads = 0, vec_stores = 0;
};

struct Launch {
  const char* kernel = "";
  KernelBody body = nullptr;
  const void* args = nullptr;
  int grid = 0;
  int block = 0;
  std::vector<Region> regions;  // sorted by lo
  Options options;
  std::chrono::steady_clock::time_point start;

  std::atomic<bool> failed{false};
  std::mutex error_mu;
  std::string error;
  std::atomic<int64_t> collectives{0}, loads{0}, stores{0}, vec_loads{0}, vec_stores{0};

  // Records the first error (later ones are consequences or duplicates).
  void fail(const std::string& what) {
    std::lock_guard<std::mutex> lock(error_mu);
    if (!failed.load(std::memory_order_relaxed)) {
      error = what;
      failed.store(true, std::memory_order_relaxed);
    }
  }
};

struct Fiber;

struct LaneContext {
  Launch* launch = nullptr;
  Warp* warp = nullptr;    // the thread executor's meeting point
  Fiber* fiber = nullptr;  // or the fiber executor's lane
  int lane = 0;
  LaneCounters counters;
  size_t last_region = 0;
};

thread_local LaneContext* tl_lane = nullptr;

// ------------------------------------------------------------------ the fiber executor --
// A warp's 32 lanes as fibers on the launching thread. The scheduler resumes each ready lane
// until it reaches a collective (or returns), then completes the collective for all 32.

constexpr size_t kFiberStackBytes = 512 * 1024;

struct Fiber {
  ucontext_t ctx;
  ucontext_t* main = nullptr;  // the scheduler's context
  LaneContext lane;
  FenceState fence;
  uint3 tid{0, 0, 0};
  bool done = false;
  bool waiting = false;  // at a collective
  bool abort = false;    // resumed only to unwind
  Collective op = Collective::kSyncwarp;
  unsigned mask = 0;
  int width = 32;
  int arg = 0;
  uint64_t value = 0;
  uint64_t result = 0;
  const char* file = "";
  int line = 0;
};

struct FiberWarp {
  ucontext_t main;
  Fiber fibers[32];
};

thread_local Fiber* tl_fiber = nullptr;  // the lane running now (fiber executor)

// Blocks until the scheduler completes the collective (or aborts the lane).
uint64_t fiber_collective(Fiber& f, Collective op, unsigned mask, uint64_t bits, int arg,
                          int width, const char* file, int line) {
  f.op = op;
  f.mask = mask;
  f.width = width;
  f.value = bits;
  f.arg = arg;
  f.file = file;
  f.line = line;
  f.waiting = true;
  swapcontext(&f.ctx, f.main);
  if (f.abort) throw LaneAbort{};
  return f.result;
}

std::string who(const LaneContext& c) {
  // (threadIdx and blockIdx are the lane's: both executors set them before running it)
  std::ostringstream os;
  os << c.launch->kernel << " block " << blockIdx.x << " warp " << (threadIdx.x / 32)
     << " lane " << c.lane;
  return os.str();
}

[[noreturn]] void lane_fail(const std::string& what) {
  LaneContext* c = tl_lane;
  if (c != nullptr) c->launch->fail(what + " [" + who(*c) + "]");
  throw LaneAbort{};
}

void check_failed(const LaneContext& c) {
  if (c.launch->failed.load(std::memory_order_relaxed)) throw LaneAbort{};
}

// Lane `lane` leaves the warp (its kernel body returned or unwound). If the others wait at a
// collective, that collective can never complete: report it with the site they wait at.
void lane_exit(Launch& L, Warp& w, int lane, bool aborted) {
  std::unique_lock<std::mutex> lock(w.m);
  w.gone[lane].store(true, std::memory_order_relaxed);
  const int exited = w.exited.fetch_add(1, std::memory_order_relaxed) + 1;
  const int arrived = w.arrived.load(std::memory_order_relaxed);
  if (!aborted && arrived > 0 && arrived + exited == 32) {
    std::ostringstream os;
    os << "warp divergence: lane " << lane << " returned from " << L.kernel << " while ";
    for (int i = 0; i < 32; ++i) {
      if (w.gone[i].load(std::memory_order_relaxed)) continue;
      os << "lane " << i << " waits at "
         << collective_name(static_cast<Collective>(w.op[i].load(std::memory_order_relaxed)))
         << " (" << site_text(w.file[i].load(std::memory_order_relaxed),
                             w.line[i].load(std::memory_order_relaxed))
         << ")";
      break;
    }
    os << "; all 32 lanes must reach every warp collective";
    L.fail(os.str());
  }
  lock.unlock();
  w.cv.notify_all();
}

}  // namespace

// ------------------------------------------------------------------------ collectives --

uint64_t warp_collective(Collective op, unsigned mask, uint64_t bits, int arg, int width,
                         const char* file, int line) {
  LaneContext* c = tl_lane;
  if (c == nullptr) {
    std::fprintf(stderr, "gs_sim: %s outside a simulated launch (%s)\n",
                 collective_name(op), site_text(file, line).c_str());
    std::abort();
  }
  check_failed(*c);
  if (mask != 0xffffffffu || width != 32) {
    lane_fail(std::string(collective_name(op)) + " at " + site_text(file, line) +
              " with a partial mask or a width other than 32: not simulated");
  }
  if (c->fiber != nullptr) {
    return fiber_collective(*c->fiber, op, mask, bits, arg, width, file, line);
  }
  Launch& L = *c->launch;
  Warp& w = *c->warp;
  const int lane = c->lane;
  [[maybe_unused]] const bool orders_memory = op == Collective::kSyncwarp;
#if defined(__SANITIZE_THREAD__)
  // A shuffle or vote carries values but orders no memory: the mutex below must not give
  // ThreadSanitizer a happens-before edge between the lanes.
  if (!orders_memory) AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
  uint64_t result = 0;
  bool abort = false;
  {
    std::unique_lock<std::mutex> lock(w.m);
    const uint64_t g = w.gen.load(std::memory_order_relaxed);
    const int parity = static_cast<int>(g & 1u);
    w.value[parity][lane].store(bits, std::memory_order_relaxed);
    w.file[lane].store(file, std::memory_order_relaxed);
    w.line[lane].store(line, std::memory_order_relaxed);
    w.op[lane].store(static_cast<int>(op), std::memory_order_relaxed);
    const int arrived = w.arrived.fetch_add(1, std::memory_order_relaxed) + 1;
    const int exited = w.exited.load(std::memory_order_relaxed);
    if (arrived + exited == 32) {
      // The last lane to arrive checks that everybody is at the same collective.
      std::string problem;
      if (exited > 0) {
        for (int i = 0; i < 32; ++i) {
          if (w.gone[i].load(std::memory_order_relaxed)) {
            problem = "warp divergence: lane " + std::to_string(i) + " returned from " +
                      L.kernel + " while lane " + std::to_string(lane) + " waits at " +
                      collective_name(op) + " (" + site_text(file, line) +
                      "); all 32 lanes must reach every warp collective";
            break;
          }
        }
      } else {
        for (int i = 0; i < 32 && problem.empty(); ++i) {
          const char* f = w.file[i].load(std::memory_order_relaxed);
          const int l = w.line[i].load(std::memory_order_relaxed);
          const int o = w.op[i].load(std::memory_order_relaxed);
          if (o != static_cast<int>(op) || l != line || std::strcmp(f, file) != 0) {
            problem = "warp divergence: lane " + std::to_string(lane) + " is at " +
                      collective_name(op) + " (" + site_text(file, line) + ") but lane " +
                      std::to_string(i) + " at " +
                      collective_name(static_cast<Collective>(o)) + " (" + site_text(f, l) +
                      ")";
          }
        }
      }
      if (!problem.empty()) {
        L.fail(problem + " [" + who(*c) + "]");
        abort = true;
      } else {
        w.arrived.store(0, std::memory_order_relaxed);
        w.gen.store(g + 1, std::memory_order_relaxed);
        ++c->counters.collectives;
      }
      lock.unlock();
      w.cv.notify_all();
    } else {
      const auto deadline = L.start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                          std::chrono::duration<double>(L.options.timeout_s));
      while (w.gen.load(std::memory_order_relaxed) == g) {
        if (L.failed.load(std::memory_order_relaxed)) {
          abort = true;
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          lock.unlock();
          L.fail(std::string(collective_name(op)) + " at " + site_text(file, line) +
                 " not reached by all 32 lanes within " + std::to_string(L.options.timeout_s) +
                 " s [" + who(*c) + "]");
          abort = true;
          lock.lock();
          break;
        }
        w.cv.wait_for(lock, std::chrono::milliseconds(20));
      }
    }
    if (!abort) {
      auto pick = [&](int src) { return w.value[parity][src & 31].load(std::memory_order_relaxed); };
      switch (op) {
        case Collective::kShflXor: result = pick(lane ^ arg); break;
        case Collective::kShflIdx: result = pick(arg); break;
        case Collective::kAny:
        case Collective::kAll: {
          bool any = false, all = true;
          for (int i = 0; i < 32; ++i) {
            const bool b = pick(i) != 0;
            any = any || b;
            all = all && b;
          }
          result = op == Collective::kAny ? any : all;
          break;
        }
        default: break;
      }
    }
  }
#if defined(__SANITIZE_THREAD__)
  if (!orders_memory) AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
#endif
  if (abort) throw LaneAbort{};
  return result;
}

// ---------------------------------------------------------------------- global accesses --

void check_global(const void* p, unsigned bytes, bool store, bool vec, const char* file,
                  int line) {
  LaneContext* c = tl_lane;
  if (c == nullptr || !c->launch->options.check) return;
  check_failed(*c);
  LaneCounters& n = c->counters;
  if (vec) {
    ++(store ? n.vec_stores : n.vec_loads);
  } else {
    ++(store ? n.stores : n.loads);
  }
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  const char* what = store ? "store" : "load";
  if (a % bytes != 0) {
    std::ostringstream os;
    os << "misaligned " << bytes << "-byte " << what << " at " << site_text(file, line)
       << ": address 0x" << std::hex << a << " is not a multiple of " << std::dec << bytes
       << " (the GPU faults)";
    lane_fail(os.str());
  }
  const std::vector<Region>& R = c->launch->regions;
  const uint64_t b = a + bytes;
  auto inside = [&](size_t k) { return R[k].lo <= a && b <= R[k].hi; };
  auto writable_ok = [&](size_t k) { return !store || R[k].writable; };
  if (c->last_region < R.size() && inside(c->last_region) && writable_ok(c->last_region)) return;
  bool found = false;
  // Regions sorted by lo; several may contain the access (views sharing memory).
  size_t k = static_cast<size_t>(
      std::upper_bound(R.begin(), R.end(), a, [](uint64_t v, const Region& r) { return v < r.lo; }) -
      R.begin());
  while (k > 0) {
    --k;
    if (inside(k)) {
      found = true;
      if (writable_ok(k)) {
        c->last_region = k;
        return;
      }
    }
  }
  std::ostringstream os;
  if (found) {
    os << bytes << "-byte store at " << site_text(file, line) << " to read-only memory 0x"
       << std::hex << a << std::dec << " (";
    for (const Region& r : R) {
      if (r.lo <= a && b <= r.hi) os << r.name << ", ";
    }
    os << "not writable in this launch)";
  } else {
    os << "out-of-bounds " << bytes << "-byte " << what << " at " << site_text(file, line)
       << ": bytes [0x" << std::hex << a << ", 0x" << b << ")" << std::dec;
    // the nearest region, to say by how much
    const Region* near = nullptr;
    uint64_t dist = UINT64_MAX;
    for (const Region& r : R) {
      const uint64_t d = a >= r.hi ? a - r.hi + 1 : (b <= r.lo ? r.lo - b + 1 : 0);
      const uint64_t dd = d == 0 ? (a < r.lo ? r.lo - a : b - r.hi) : d;
      if (dd < dist) {
        dist = dd;
        near = &r;
      }
    }
    if (near != nullptr) {
      os << " outside every tensor; nearest: " << near->name << " [0x" << std::hex << near->lo
         << ", 0x" << near->hi << ")" << std::dec;
      if (a >= near->hi) os << ", " << (a - near->hi) << " bytes past its end";
      if (a < near->lo) os << ", " << (near->lo - a) << " bytes before its start";
      if (a < near->hi && b > near->hi) os << ", " << (b - near->hi) << " bytes past its end";
    }
  }
  lane_fail(os.str());
}

// --------------------------------------------------------------------------- launches --

namespace {

void add_counters(Launch& L, const LaneCounters& n) {
  L.collectives.fetch_add(n.collectives, std::memory_order_relaxed);
  L.loads.fetch_add(n.loads, std::memory_order_relaxed);
  L.stores.fetch_add(n.stores, std::memory_order_relaxed);
  L.vec_loads.fetch_add(n.vec_loads, std::memory_order_relaxed);
  L.vec_stores.fetch_add(n.vec_stores, std::memory_order_relaxed);
}

void set_indices(const Launch& L, int block, int thread) {
  threadIdx = uint3{static_cast<unsigned>(thread), 0u, 0u};
  blockIdx = uint3{static_cast<unsigned>(block), 0u, 0u};
  blockDim = dim3{static_cast<unsigned>(L.block), 1u, 1u};
  gridDim = dim3{static_cast<unsigned>(L.grid), 1u, 1u};
}

// The thread executor: thread `thread` of block `block`, to the end of the kernel.
void run_thread_lane(Launch& L, Warp& w, int block, int thread) {
  set_indices(L, block, thread);
  LaneContext ctx;
  ctx.launch = &L;
  ctx.warp = &w;
  ctx.lane = thread & 31;
  tl_lane = &ctx;
  reset_fence_state();
  bool aborted = false;
  try {
    L.body(L.args);
  } catch (const LaneAbort&) {
    aborted = true;
  } catch (const std::exception& e) {
    L.fail(std::string("exception in ") + L.kernel + ": " + e.what());
    aborted = true;
  }
  lane_exit(L, w, ctx.lane, aborted);
  add_counters(L, ctx.counters);
  tl_lane = nullptr;
}

void fiber_main() {
  Fiber& f = *tl_fiber;
  Launch& L = *f.lane.launch;
  try {
    L.body(L.args);
  } catch (const LaneAbort&) {
  } catch (const std::exception& e) {
    L.fail(std::string("exception in ") + L.kernel + ": " + e.what());
  }
  f.done = true;  // returns to the scheduler through uc_link
}

// Resumes lane `k` until it waits at a collective or returns.
void resume(FiberWarp& fw, int k) {
  Fiber& f = fw.fibers[k];
  threadIdx = f.tid;
  tl_lane = &f.lane;
  tl_fiber = &f;
  tl_fence = f.fence;
  swapcontext(&fw.main, &f.ctx);
  f.fence = tl_fence;
  tl_fiber = nullptr;
  tl_lane = nullptr;
}

// The problem with the collective all live lanes of `fw` wait at, or "" if there is none.
std::string collective_problem(const Launch& L, const FiberWarp& fw) {
  const Fiber* first = nullptr;
  for (const Fiber& f : fw.fibers) {
    if (f.waiting) {
      first = &f;
      break;
    }
  }
  for (const Fiber& f : fw.fibers) {
    if (f.done) {
      return "warp divergence: lane " + std::to_string(f.lane.lane) + " returned from " +
             L.kernel + " while lane " + std::to_string(first->lane.lane) + " waits at " +
             collective_name(first->op) + " (" + site_text(first->file, first->line) +
             "); all 32 lanes must reach every warp collective";
    }
  }
  for (const Fiber& f : fw.fibers) {
    if (f.op != first->op || f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      return "warp divergence: lane " + std::to_string(first->lane.lane) + " is at " +
             collective_name(first->op) + " (" + site_text(first->file, first->line) +
             ") but lane " + std::to_string(f.lane.lane) + " at " + collective_name(f.op) +
             " (" + site_text(f.file, f.line) + ")";
    }
  }
  return "";
}

std::vector<std::unique_ptr<char[]>>& fiber_stacks() {
  thread_local std::vector<std::unique_ptr<char[]>> stacks;
  if (stacks.empty()) {
    for (int i = 0; i < 32; ++i) stacks.emplace_back(new char[kFiberStackBytes]);
  }
  return stacks;
}

// The fiber executor: warp `warp_in_block` of block `block`, to the end of the kernel.
void run_fiber_warp(Launch& L, int block, int warp_in_block) {
  auto fw = std::make_unique<FiberWarp>();
  auto& stacks = fiber_stacks();
  set_indices(L, block, warp_in_block * 32);
  for (int k = 0; k < 32; ++k) {
    Fiber& f = fw->fibers[k];
    f.main = &fw->main;
    f.lane.launch = &L;
    f.lane.fiber = &f;
    f.lane.lane = k;
    f.tid = uint3{static_cast<unsigned>(warp_in_block * 32 + k), 0u, 0u};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[k].get();
    f.ctx.uc_stack.ss_size = kFiberStackBytes;
    f.ctx.uc_link = &fw->main;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    for (int k = 0; k < 32; ++k) {
      Fiber& f = fw->fibers[k];
      if (!f.done && !f.waiting) resume(*fw, k);
    }
    int waiting = 0;
    for (const Fiber& f : fw->fibers) waiting += f.waiting ? 1 : 0;
    if (waiting == 0) break;
    bool abort = L.failed.load(std::memory_order_relaxed);
    if (!abort) {
      const std::string problem = collective_problem(L, *fw);
      if (!problem.empty()) {
        for (const Fiber& f : fw->fibers) {
          if (f.waiting) {
            threadIdx = f.tid;
            L.fail(problem + " [" + who(f.lane) + "]");
            break;
          }
        }
        abort = true;
      }
    }
    for (Fiber& f : fw->fibers) {
      if (!f.waiting) continue;
      f.waiting = false;
      if (abort) {
        f.abort = true;
        continue;
      }
      const auto& v = fw->fibers;
      switch (f.op) {
        case Collective::kShflXor: f.result = v[(f.lane.lane ^ f.arg) & 31].value; break;
        case Collective::kShflIdx: f.result = v[f.arg & 31].value; break;
        case Collective::kAny:
        case Collective::kAll: {
          bool any = false, all = true;
          for (const Fiber& g : v) {
            any = any || g.value != 0;
            all = all && g.value != 0;
          }
          f.result = f.op == Collective::kAny ? any : all;
          break;
        }
        default: f.result = 0; break;
      }
    }
    if (!abort) ++fw->fibers[0].lane.counters.collectives;
  }
  for (const Fiber& f : fw->fibers) add_counters(L, f.lane.counters);
}

// The concurrent executor's threads, one per CUDA thread of the largest grid so far, kept from
// launch to launch (creating a thread costs milliseconds under ThreadSanitizer). The pool's own
// mutex would give ThreadSanitizer happens-before edges between lanes of one launch (a lane
// that finished and a lane that is still starting both pass it), so the workers' pool
// operations are sync-ignored and the only edges are the ones thread creation and joining
// would give: launch -> every lane (start_token_) and every lane -> end of launch (done_token_).
class ThreadPool {
 public:
  void run(Launch& L, std::vector<std::unique_ptr<Warp>>& warps) {
    const int total = L.grid * L.block;
    std::unique_lock<std::mutex> lock(m_);
    while (static_cast<int>(threads_.size()) < total) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { loop(index); });
      threads_.back().detach();
    }
    launch_.store(&L, std::memory_order_relaxed);
    warps_.store(&warps, std::memory_order_relaxed);
    want_.store(total, std::memory_order_relaxed);
    started_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    GS_TSAN_RELEASE(&start_token_);
    gen_.fetch_add(1, std::memory_order_relaxed);
    cv_.notify_all();
    done_cv_.wait(lock, [&] {
      return done_.load(std::memory_order_relaxed) == want_.load(std::memory_order_relaxed);
    });
    GS_TSAN_ACQUIRE(&done_token_);
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      GS_IGNORE_SYNC_BEGIN();
      std::unique_lock<std::mutex> lock(m_);
      cv_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
      seen = gen_.load(std::memory_order_relaxed);
      const int want = want_.load(std::memory_order_relaxed);
      if (index >= want) {
        lock.unlock();
        GS_IGNORE_SYNC_END();
        continue;
      }
      if (started_.fetch_add(1, std::memory_order_relaxed) + 1 == want) cv_.notify_all();
      cv_.wait(lock, [&] { return started_.load(std::memory_order_relaxed) == want; });
      lock.unlock();
      GS_IGNORE_SYNC_END();
      GS_TSAN_ACQUIRE(&start_token_);  // then read what the launch set up
      Launch& L = *launch_.load(std::memory_order_relaxed);
      Warp& w = *(*warps_.load(std::memory_order_relaxed))[index / 32];
      run_thread_lane(L, w, index / L.block, index % L.block);
      GS_TSAN_RELEASE(&done_token_);
      GS_IGNORE_SYNC_BEGIN();
      lock.lock();
      if (done_.fetch_add(1, std::memory_order_relaxed) + 1 == want) done_cv_.notify_one();
      lock.unlock();
      GS_IGNORE_SYNC_END();
    }
  }

  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;  // (the launching thread's only)
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> want_{0}, started_{0}, done_{0};
  std::atomic<Launch*> launch_{nullptr};
  std::atomic<std::vector<std::unique_ptr<Warp>>*> warps_{nullptr};
  char start_token_ = 0, done_token_ = 0;  // addresses for the ThreadSanitizer annotations
};

std::mutex g_launch_mu;

}  // namespace

void launch(const char* kernel, KernelBody body, const void* args, int grid, int block,
            const std::vector<Region>& regions, const Options& options, Stats* stats) {
  if (grid < 1 || block < 32 || block % 32 != 0) {
    throw SimError(std::string("gs_sim: bad launch of ") + kernel + ": grid " +
                   std::to_string(grid) + ", block " + std::to_string(block));
  }
  std::lock_guard<std::mutex> serial(g_launch_mu);
  Launch L;
  L.kernel = kernel;
  L.body = body;
  L.args = args;
  L.grid = grid;
  L.block = block;
  L.regions = regions;
  std::sort(L.regions.begin(), L.regions.end(),
            [](const Region& a, const Region& b) { return a.lo < b.lo; });
  L.options = options;
  L.start = std::chrono::steady_clock::now();
  const int warps_per_block = block / 32;
  const int warps = grid * warps_per_block;
  if (options.schedule == Schedule::kConcurrent) {
    std::vector<std::unique_ptr<Warp>> ws;
    ws.reserve(warps);
    for (int i = 0; i < warps; ++i) ws.push_back(std::make_unique<Warp>());
    static ThreadPool* pool = new ThreadPool();  // lives as long as the process
    pool->run(L, ws);
  } else {
    std::vector<int> order(warps);
    std::iota(order.begin(), order.end(), 0);
    if (options.schedule == Schedule::kReversed) std::reverse(order.begin(), order.end());
    if (options.schedule == Schedule::kShuffled) {
      std::mt19937_64 rng(options.seed);
      std::shuffle(order.begin(), order.end(), rng);
    }
    for (int wid : order) {
      run_fiber_warp(L, wid / warps_per_block, wid % warps_per_block);
      if (L.failed.load(std::memory_order_relaxed)) break;
    }
  }
  if (stats != nullptr) {
    stats->launches += 1;
    stats->warps += warps;
    stats->collectives += L.collectives.load();
    stats->loads += L.loads.load();
    stats->stores += L.stores.load();
    stats->vec_loads += L.vec_loads.load();
    stats->vec_stores += L.vec_stores.load();
  }
  if (L.failed.load()) throw SimError("gs_sim: " + L.error);
}

}  // namespace gs_sim
