// Contract: a torch-free driver that runs gradstab's CUDA kernels on the simulator with every CUDA
// thread a std::thread (the concurrent schedule), for a ThreadSanitizer build (tests/
// test_cuda_sim.py compiles it with -fsanitize=thread and runs it). It goes through the same
// plans as the launchers (norm_plan.h, agc_plan.h, on sim_device.h) over a small mixed list:
// every norm op and mode, shared gradients, AGC with short and long rows (both last-arriver
// hand-offs) and its deferred path; each result is checked against a float64 reference computed
// here, so the run is not vacuous. Exit status 0 when every result is right (ThreadSanitizer
// itself exits 66 when it reports a race), 1 otherwise.
//   tsan_driver               the kernels
//   tsan_driver --unfenced    a control: a two-warp hand-off without the release fence, which
//                             ThreadSanitizer must report (the fence model is not vacuous)
//   tsan_driver --fenced      the same hand-off with its fences: no report
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/agc_plan.h"
#include "cuda/norm_plan.h"
#include "gs_sim/device.h"
#include "gs_sim/runtime.h"
#include "sim_device.h"

using namespace gradstab;        // NOLINT: a test driver (the shared codes: common/codes.h)
using namespace gradstab::cuda;  // NOLINT

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

bool close(double got, double want, double rtol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rtol * std::fabs(want);
}

// A gradient in its own 16-byte aligned buffer, `offset` elements in (0: aligned).
struct Grad {
  int32_t dtype;
  int64_t numel;
  int64_t offset;
  std::vector<uint64_t> storage;  // 8-byte words: 16-byte aligned by operator new on x86-64
  void* ptr() { return reinterpret_cast<char*>(storage.data()) + offset * dtype_size(dtype); }
  double get(int64_t i) {
    const char* p = static_cast<const char*>(ptr()) + i * dtype_size(dtype);
    if (dtype == kDouble) {
      double d;
      std::memcpy(&d, p, 8);
      return d;
    }
    if (dtype == kFloat) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    return dtype == kHalf ? gs_sim::half_to_float(h) : gs_sim::bits_float(uint32_t{h} << 16);
  }
  void set(int64_t i, double v) {
    char* p = static_cast<char*>(ptr()) + i * dtype_size(dtype);
    if (dtype == kDouble) {
      std::memcpy(p, &v, 8);
    } else if (dtype == kFloat) {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
    } else {
      const uint16_t h = dtype == kHalf ? gs_sim::half_bits_rn(static_cast<float>(v))
                                        : gs_sim::bfloat16_bits_rn(static_cast<float>(v));
      std::memcpy(p, &h, 2);
    }
  }
  double norm2() {
    double s = 0;
    for (int64_t i = 0; i < numel; ++i) s += get(i) * get(i);
    return std::sqrt(s);
  }
};

Grad make_grad(int32_t dtype, int64_t numel, int64_t offset, double scale, uint64_t seed) {
  Grad g{dtype, numel, offset, {}};
  g.storage.assign(static_cast<size_t>((numel + offset) * dtype_size(dtype) / 8 + 4), 0);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  for (int64_t i = 0; i < numel; ++i) g.set(i, nd(rng));
  return g;
}

gs_sim::Options concurrent() {
  gs_sim::Options o;
  o.schedule = gs_sim::Schedule::kConcurrent;
  return o;
}

// One norm op over `grads` (one entry per list position; the same Grad twice = shared memory).
// Returns (norms, total) as float64 (a float64 gradient in the list makes the outputs float64).
std::pair<std::vector<double>, double> run_norm(Op op, std::vector<Grad*> grads,
                                                double bound, double p, int grid) {
  const int64_t T = static_cast<int64_t>(grads.size());
  std::vector<KeyItem> key;
  std::vector<gs_sim::Region> regions;
  bool any_double = false;
  for (Grad* g : grads) {
    key.push_back({reinterpret_cast<uint64_t>(g->ptr()), g->numel, g->dtype});
    const uint64_t lo = reinterpret_cast<uint64_t>(g->ptr());
    regions.push_back({lo, lo + static_cast<uint64_t>(g->numel * dtype_size(g->dtype)), false,
                       "gradient"});
    any_double = any_double || g->dtype == kDouble;
  }
  const HostTable table = build_norm_table(key);
  const bool shared = op != Op::kStats && table.meta[kKeyOverlap] != 0;
  const int32_t kind = norm_kind(p);
  const int32_t mode = norm_mode(op, kind, any_double, shared);
  const NormScratch layout = norm_scratch(T, table.meta[kTotalUnits]);
  std::vector<uint64_t> scratch(static_cast<size_t>(layout.bytes / 8 + 2), 0xa5a5a5a5a5a5a5a5ull);
  std::vector<double> norms_d(T), max_d(T), total_d(1);
  std::vector<float> norms_f(T), max_f(T), total_f(1);
  std::vector<int64_t> nonfinite(T);
  const NormOutputs out{any_double ? static_cast<void*>(norms_d.data()) : norms_f.data(),
                        any_double ? static_cast<void*>(max_d.data()) : max_f.data(),
                        nonfinite.data(),
                        any_double ? static_cast<void*>(total_d.data()) : total_f.data(),
                        any_double};
  const Params P = norm_params(table.bytes.data(), table.meta, T,
                               reinterpret_cast<char*>(scratch.data()), layout, kind, mode, p,
                               1e-6, &bound, 0.0, out);
  sim::Grid g;
  g.exact = grid;
  sim::SimDevice dev(concurrent(), g, regions, {}, std::vector<sim::WorkCopy>(T));
  norm_reduce(P, layout, dev);
  norm_write(P, table.meta, shared, std::vector<char>(T, 0), dev);
  std::vector<double> norms(T);
  for (int64_t i = 0; i < T; ++i) norms[i] = any_double ? norms_d[i] : norms_f[i];
  return {norms, any_double ? total_d[0] : total_f[0]};
}

void check_norm_ops() {
  Grad a = make_grad(kFloat, 3 * 4096 + 1000, 1, 1.0, 1);    // 4 units, unaligned
  Grad b = make_grad(kBFloat16, 2 * 8192 + 7, 0, 0.5, 2);    // 3 units
  Grad c = make_grad(kHalf, 9000, 3, 0.25, 3);               // 2 units, unaligned
  Grad d = make_grad(kDouble, 2 * 2048 + 5, 1, 2.0, 4);      // 3 units
  Grad e = make_grad(kFloat, 0, 0, 1.0, 5);                  // no units
  std::vector<Grad*> list{&a, &b, &c, &d, &e};
  std::vector<double> want;
  for (Grad* g : list) want.push_back(g->norm2());
  double total = 0;
  for (double w : want) total += w * w;
  total = std::sqrt(total);
  for (int grid : {1, 2}) {
    auto [norms, t] = run_norm(Op::kStats, list, 0.0, 2.0, grid);
    for (size_t i = 0; i < want.size(); ++i) {
      expect(close(norms[i], want[i], 1e-6), "grad_stats norm " + std::to_string(i));
    }
    expect(close(t, total, 1e-6), "grad_stats total");
  }
  // clip_norm: every gradient scaled by bound / total
  {
    std::vector<double> before;
    for (int64_t i = 0; i < a.numel; ++i) before.push_back(a.get(i));
    auto [norms, t] = run_norm(Op::kClipNorm, list, 1.0, 2.0, 1);
    expect(close(t, total, 1e-6), "clip_norm total");
    const double coef = 1.0 / (t + 1e-6);
    for (int64_t i = 0; i < a.numel; i += 97) {
      expect(close(a.get(i), before[i] * coef, 1e-6), "clip_norm element " + std::to_string(i));
    }
  }
  // per-layer, normalize, value (deferred: a float64 gradient), value in-pass (no float64),
  // and a gradient passed twice (shared memory: per-gradient scale launches)
  for (Op op : {Op::kClipNormPerLayer, Op::kNormalizePerLayer, Op::kClipValue}) {
    auto [norms, t] = run_norm(op, list, 0.5, op == Op::kClipValue ? 2.0 : 3.0, 1);
    expect(std::isfinite(t), std::string("op ") + op_name(op) + " total");
  }
  run_norm(Op::kClipValue, {&a, &b, &c}, 0.25, 2.0, 1);
  for (int64_t i = 0; i < a.numel; i += 101) expect(std::fabs(a.get(i)) <= 0.25, "clamped");
  {
    const double n = a.norm2();
    run_norm(Op::kClipNormPerLayer, {&a, &c, &a}, 0.01, 2.0, 1);
    const double c = 0.01 / (n + 1e-6);  // both entries scaled by the entry coefficient
    expect(close(a.norm2(), n * c * c, 1e-4), "a gradient twice is scaled twice");
  }
  {
    Grad big = make_grad(kFloat, 500, 0, 1.0, 9);
    for (int64_t i = 0; i < 500; ++i) big.set(i, 3e30);  // float32 lanes overflow: redone
    auto [norms, t] = run_norm(Op::kStats, {&big, &c}, 0.0, 2.0, 1);
    expect(close(norms[0], 3e30 * std::sqrt(500.0), 1e-6), "float32 overflow redo");
  }
}

void check_agc() {
  // short rows (several per item), long rows (pieces, the per-row hand-off), a 1-D long unit
  const int64_t shapes[][2] = {{64, 100}, {3, 9000}, {1, 13000}};
  std::vector<Grad> gs, ws;
  for (int k = 0; k < 3; ++k) {
    const int64_t n = shapes[k][0] * shapes[k][1];
    gs.push_back(make_grad(k == 1 ? kBFloat16 : kFloat, n, k, 0.05, 20 + k));
    ws.push_back(make_grad(k == 2 ? kDouble : kFloat, n, 0, 1.0, 30 + k));
  }
  for (bool deferred : {false, true}) {
    std::vector<Grad> g = gs;
    const int64_t T = 3;
    std::vector<KeyItem> key;
    std::vector<gs_sim::Region> gr, wr;
    for (int k = 0; k < T; ++k) {
      key.push_back({reinterpret_cast<uint64_t>(g[k].ptr()), g[k].numel, g[k].dtype});
      key.push_back({reinterpret_cast<uint64_t>(ws[k].ptr()), shapes[k][0], ws[k].dtype});
      const uint64_t glo = reinterpret_cast<uint64_t>(g[k].ptr());
      const uint64_t wlo = reinterpret_cast<uint64_t>(ws[k].ptr());
      gr.push_back({glo, glo + static_cast<uint64_t>(g[k].numel * dtype_size(g[k].dtype)), true,
                    "gradient"});
      wr.push_back({wlo, wlo + static_cast<uint64_t>(ws[k].numel * dtype_size(ws[k].dtype)),
                    false, "parameter"});
    }
    const HostTable table = build_agc_table(key);
    const AgcScratch layout = agc_scratch(T, table.meta);
    std::vector<uint64_t> scratch(static_cast<size_t>(layout.bytes / 8 + 2), 0xa5a5a5a5a5a5a5a5ull);
    std::vector<float> norms(T), total(1);
    std::vector<int64_t> clipped(T), nonfinite(T);
    const AgcOutputs out{norms.data(), clipped.data(), nonfinite.data(), total.data(), false};
    const AgcParams P = agc_params(table.bytes.data(), table.meta, T,
                                   reinterpret_cast<char*>(scratch.data()), layout, kL2,
                                   deferred, 2.0, 0.01, 1e-3, out);
    sim::Grid grid;
    grid.exact = deferred ? 1 : 2;
    sim::SimDevice dev(concurrent(), grid, gr, wr, std::vector<sim::WorkCopy>(T));
    agc_run(P, table.meta, layout, std::vector<char>(T, 0), dev);
    for (int k = 0; k < T; ++k) {
      expect(close(norms[k], gs[k].norm2(), 1e-5), "agc norm " + std::to_string(k));
      // the oracle: rows clipped to 0.01 * ||W_r||
      int64_t want_clipped = 0;
      const int64_t rows = shapes[k][0], len = shapes[k][1];
      for (int64_t r = 0; r < rows; ++r) {
        double gn = 0, wn = 0;
        for (int64_t i = r * len; i < (r + 1) * len; ++i) {
          gn += gs[k].get(i) * gs[k].get(i);
          wn += ws[k].get(i) * ws[k].get(i);
        }
        const double max_norm = 0.01 * std::max(std::sqrt(wn), 1e-3);
        if (std::sqrt(gn) > max_norm) {
          ++want_clipped;
          double after = 0;
          for (int64_t i = r * len; i < (r + 1) * len; ++i) after += g[k].get(i) * g[k].get(i);
          expect(close(std::sqrt(after), max_norm, 1e-2), "agc clipped row");
        }
      }
      expect(clipped[k] == want_clipped, "agc clipped count " + std::to_string(k));
    }
  }
}

// The control: warp 1 publishes a value to warp 0 through a counter, arrive_last's pattern
// (record; fence; atomic add -- atomic add; fence; read), with or without the release fence.
struct HandOff {
  double* record;
  int* counter;
  double* seen;
  bool fenced;
};

__global__ void handoff_kernel(const __grid_constant__ HandOff h) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (lane != 0) return;
  if (warp == 1) {
    h.record[0] = 42.0;
    if (h.fenced) __threadfence();
    atomicAdd(h.counter, 1);
  } else {
    while (std::atomic_ref<int>(*h.counter).load(std::memory_order_relaxed) == 0) {
      std::this_thread::yield();  // (a device kernel never waits for another warp)
    }
    atomicAdd(h.counter, 1);  // the last arriver's add, then its acquire fence
    __threadfence();
    *h.seen = h.record[0];
  }
}

int run_handoff(bool fenced) {
  double record = 0, seen = 0;
  int counter = 0;
  HandOff h{&record, &counter, &seen, fenced};
  gs_sim::launch(
      "handoff_kernel", [](const void* a) { handoff_kernel(*static_cast<const HandOff*>(a)); },
      &h, 1, 64, {}, concurrent(), nullptr);
  return seen == 42.0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--unfenced") return run_handoff(false);
  if (mode == "--fenced") return run_handoff(true);
  try {
    check_norm_ops();
    check_agc();
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
  std::printf("%d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
