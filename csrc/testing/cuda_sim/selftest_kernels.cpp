// Contract: small kernels with one deliberate fault each, run on the simulator so the tests can
// show that every checker of the harness fires (and names the fault) instead of passing or
// hanging: an out-of-bounds load, a misaligned 16-byte load, a store to read-only memory, a
// lane that returns before a shuffle the others wait at, lanes at different collectives, a
// partial-mask shuffle. Case 0 is the control (no fault). Written like the real kernels, with
// device_common.cuh's helpers.
#include <string>
#include <vector>

#include "cuda/device_common.cuh"
#include "gs_sim/runtime.h"

namespace gradstab {
namespace cuda {
namespace sim {
namespace {

struct SelfTestArgs {
  float* data;  // 64 floats, 16-byte aligned
  int64_t n;
  int which;
};

__global__ void selftest_kernel(const __grid_constant__ SelfTestArgs a) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float x = gload(a.data + lane);
  switch (a.which) {
    case 1:  // the last lane reads one element past the end
      x += gload(a.data + (lane == 31 ? a.n : lane));
      break;
    case 2:  // a 16-byte load one float off its alignment
      x += __uint_as_float(gload_vec(reinterpret_cast<const uint4*>(a.data + 1)).x);
      break;
    case 3:  // a store to memory registered read-only
      gstore(a.data + lane, x);
      break;
    case 4:  // a lane-dependent early return before a shuffle
      if (lane == 7) return;
      break;
    case 5:  // half the warp at one __syncwarp, half at another
      if (lane < 16) {
        __syncwarp();
      } else {
        __syncwarp();
      }
      break;
    case 6:  // a partial mask
      x = __shfl_xor_sync(0x0000ffffu, x, 1);
      break;
    default: break;
  }
  x = __shfl_xor_sync(kFull, x, 16);
  if (x != x) gstore(a.data, x);  // (never: keeps x alive)
}

}  // namespace

// Runs case `which` with the given schedule; "" when the simulator reports nothing, else its
// message.
std::string run_selftest(int which, const gs_sim::Options& options) {
  alignas(16) float data[64];
  for (int i = 0; i < 64; ++i) data[i] = static_cast<float>(i);
  SelfTestArgs args{data, 32, which};
  const uint64_t lo = reinterpret_cast<uint64_t>(data);
  std::vector<gs_sim::Region> regions{{lo, lo + 32 * sizeof(float), which != 3, "data"}};
  try {
    gs_sim::launch(
        "selftest_kernel",
        [](const void* p) { selftest_kernel(*static_cast<const SelfTestArgs*>(p)); }, &args, 1,
        64, regions, options, nullptr);
  } catch (const gs_sim::SimError& e) {
    return e.what();
  }
  return "";
}

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
