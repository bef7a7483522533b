// Contract: the host side of the CPU execution harness of gradstab's CUDA kernels: launch a
// kernel body on a simulated grid and check it as it runs.
//   * a launch runs `body(args)` as grid x block CUDA threads (block a multiple of 32; no
//     shared memory, no __syncthreads: the kernels use neither). The concurrent schedule runs
//     the whole grid at once, every CUDA thread a std::thread (what ThreadSanitizer needs to
//     see the hand-offs between warps). The kernels' warps never wait for one another, so the
//     in-order, reversed and shuffled schedules may run one warp at a time: its 32 lanes as
//     fibers on the calling thread, switched at every collective (fast on two cores).
//   * checks (Options::check): every gradient/parameter access the kernels make through
//     device_common.cuh's gload/gstore helpers must lie inside one registered Region, be
//     naturally aligned (16 bytes for a vector) and, for a store, hit a writable region; every
//     warp collective must be reached by all 32 lanes from the same call site (a lane that exits
//     or waits elsewhere is reported with both sites, instead of a hang).
//   * launch() throws SimError with the first problem found (after every thread has stopped).
// One launch at a time per process (launches serialize on a mutex).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace gs_sim {

// Bytes [lo, hi) the kernels may access; stores only where `writable`.
struct Region {
  uint64_t lo;
  uint64_t hi;
  bool writable;
  std::string name;  // for messages, e.g. "gradient 3 (working memory)"
};

enum class Schedule : int {
  kInOrder = 0,     // warps 0, 1, 2, ... one at a time
  kReversed = 1,    // the last warp first
  kShuffled = 2,    // a random order (Options::seed)
  kConcurrent = 3,  // every thread of the grid at once
};

struct Options {
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
  bool check = true;
  double timeout_s = 120.0;  // a collective not met by all lanes in this time: an error
};

// Counters over launches (accumulated by launch()).
struct Stats {
  int64_t launches = 0;
  int64_t warps = 0;
  int64_t collectives = 0;  // warp collectives completed (one per warp and call)
  int64_t loads = 0;        // checked scalar loads of gradient/parameter data
  int64_t stores = 0;
  int64_t vec_loads = 0;    // checked 16-byte loads
  int64_t vec_stores = 0;
};

struct SimError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using KernelBody = void (*)(const void* args);

void launch(const char* kernel, KernelBody body, const void* args, int grid, int block,
            const std::vector<Region>& regions, const Options& options, Stats* stats);

}  // namespace gs_sim
