// Contract: the pytest binding of the CPU execution harness: torch.ops.gradstab_sim.* run
// gradstab's CUDA kernels on the simulator over real CPU tensors, the way norm_ops.cpp and
// agc.cpp run them on a GPU (same torch-free plans: norm_plan.h, agc_plan.h).
//   norm(op, grads, bound, bound_on_device, norm_type, eps, schedule, seed, grid, resident,
//        max_blocks, reuse_scratch) -> (norms, max_abs, nonfinite, total)
//     op: 0 grad_stats, 1 clip_norm, 2 clip_norm_per_layer, 3 clip_value, 4 normalize_per_layer
//     (norm_ops.h's codes); writes the gradients in place like the real op.
//   agc(grads, params, clip_factor, eps, norm_type, schedule, seed, grid, resident, max_blocks,
//       reuse_scratch) -> (norms, clipped, nonfinite, total)
//   threshold_z(norm?, mean, var, count, spikes, warmup, alpha, z_thresh, eps, cap?,
//       warmup_steps, rule, skip_on_spike, judge, update, schedule, seed) -> bound (0 elements
//       when not judging), and threshold_p(norm?, history, count, percentile, cap?, warmup_steps,
//       include_current, judge, update, schedule, seed) -> bound: the threshold kernels, with
//       the arguments of gradstab._C.cuda_zscore_threshold / cuda_percentile_threshold, on CPU
//       tensors (checked by the same common/threshold_args.h).
//   last_stats() -> [launches, warps, collectives, loads, stores, vec_loads, vec_stores];
//   last_log() -> the launch sequence of the last call, one line per launch.
//   selftest(which, schedule) -> the simulator's report on a kernel with fault `which`
//     (selftest_kernels.cpp), "" for none.
//   convert(x, kind): the stand-in float16/bfloat16 conversions (kind 0: float32 -> float16 bits,
//     1: float32 -> bfloat16 bits, 2: float16 bits -> float32), as int16/float32 tensors.
// schedule: gs_sim::Schedule (0 in order, 1 reversed, 2 shuffled by seed, 3 concurrent); grid > 0
// launches exactly that many blocks, else the persistent grid of `resident` blocks, capped by
// max_blocks. Scratch and outputs start as garbage (0xa5 bytes; NaN, -777), as device memory
// from the caching allocator would; reuse_scratch keeps one scratch buffer from call to call
// (counters must be zeroed by the plan). A bound "on the device" is read by the kernels from
// memory. Simulator errors (bounds, alignment, divergence) raise RuntimeError.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/agc_plan.h"
#include "cuda/norm_plan.h"
#include "cuda/threshold_params.h"
#include "gs_sim/runtime.h"
#include "sim_device.h"
#include "sim_kernels.h"

namespace gradstab {
namespace cuda {
namespace sim {
namespace {

using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::mutex g_mu;
gs_sim::Stats g_last_stats;
std::string g_last_log;
std::vector<char> g_scratch;  // kept between calls for reuse_scratch

int32_t dtype_code(const at::Tensor& t, const char* what, size_t i) {
  switch (t.scalar_type()) {
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    case at::kDouble: return kDouble;
    default:
      TORCH_CHECK_TYPE(false, "gradstab_sim: ", what, " ", i, " has dtype ", t.scalar_type());
  }
}

ByteSpan span_of(const at::Tensor& t) {
  return strided_byte_span(reinterpret_cast<uint64_t>(t.const_data_ptr()), t.sizes().data(),
                           t.strides().data(), t.dim(), static_cast<int64_t>(t.element_size()));
}

gs_sim::Region region(const void* p, int64_t numel, int64_t elem_size, std::string name) {
  const uint64_t lo = reinterpret_cast<uint64_t>(p);
  return {lo, lo + static_cast<uint64_t>(numel * elem_size), false, std::move(name)};
}

gs_sim::Options options_of(int64_t schedule, int64_t seed) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 3, "gradstab_sim: schedule must be 0-3");
  gs_sim::Options o;
  o.schedule = static_cast<gs_sim::Schedule>(schedule);
  o.seed = static_cast<uint64_t>(seed);
  return o;
}

Grid grid_of(int64_t grid, int64_t resident, int64_t max_blocks) {
  Grid g;
  g.exact = static_cast<int>(grid);
  g.resident = static_cast<int>(resident);
  g.max_blocks = static_cast<int>(max_blocks);
  return g;
}

// Scratch of `bytes` bytes: fresh garbage, or the kept buffer with whatever the last call left.
char* scratch_of(std::vector<char>& fresh, int64_t bytes, bool reuse) {
  std::vector<char>& buf = reuse ? g_scratch : fresh;
  const size_t n = static_cast<size_t>(bytes) + 16;
  if (!reuse || buf.size() < n) {
    buf.assign(n, static_cast<char>(0xa5));
  }
  return buf.data();
}

WorkCopy work_copy(const at::Tensor& g, const at::Tensor& work) {
  WorkCopy c;
  c.work = work.data_ptr();
  c.grad = g.data_ptr();
  c.numel = g.numel();
  c.elem_size = static_cast<int64_t>(g.element_size());
  c.sizes.assign(g.sizes().begin(), g.sizes().end());
  c.strides.assign(g.strides().begin(), g.strides().end());
  return c;
}

void keep_info(const SimDevice& dev) {
  g_last_stats = dev.stats();
  g_last_log.clear();
  for (const std::string& line : dev.log()) g_last_log += line + "\n";
}

Stats4 sim_norm(int64_t op, at::TensorList grads, double bound, bool bound_on_device,
                double norm_type, double eps, int64_t schedule, int64_t seed, int64_t grid,
                int64_t resident, int64_t max_blocks, bool reuse_scratch) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK_VALUE(op >= 0 && op < kNumOps, "gradstab_sim: op must be an op code of "
                    "common/codes.h, got ", op);
  TORCH_CHECK_VALUE(norm_type > 0.0, "gradstab_sim: norm_type must be positive");
  const Op code = static_cast<Op>(op);
  const int64_t T = static_cast<int64_t>(grads.size());
  // The memory the kernels work on: the gradient, or a contiguous copy (norm_ops.cpp's rule).
  std::vector<at::Tensor> work(T);
  std::vector<WorkCopy> copies(T);
  std::vector<char> has_copy(T, 0);
  std::vector<KeyItem> key(T);
  std::vector<gs_sim::Region> regions;
  bool any_double = false, any_copy = false;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.device().is_cpu(), "gradstab_sim: gradient ", i, " is not on the CPU");
    const int32_t dt = dtype_code(g, "gradient", static_cast<size_t>(i));
    work[i] = g;
    if (g.numel() > 0 && !g.is_non_overlapping_and_dense()) {
      work[i] = g.contiguous();
      copies[i] = work_copy(g, work[i]);
      has_copy[i] = 1;
      any_copy = true;
    }
    key[i] = KeyItem{reinterpret_cast<uint64_t>(work[i].data_ptr()), g.numel(), dt};
    if (g.numel() > 0) {
      regions.push_back(region(work[i].data_ptr(), g.numel(), dtype_size(dt),
                               "gradient " + std::to_string(i)));
    }
    any_double = any_double || dt == kDouble;
  }
  const HostTable table = build_norm_table(key);
  bool shared = false;
  if (code != Op::kStats) {
    shared = table.meta[kKeyOverlap] != 0;
    if (!shared && any_copy) {
      std::vector<ByteSpan> spans;
      for (const at::Tensor& g : grads) spans.push_back(span_of(g));
      shared = spans_overlap(std::move(spans), {});
    }
  }
  const int32_t kind = norm_kind(norm_type);
  const int32_t mode = norm_mode(code, kind, any_double, shared);

  const auto fopt = at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat);
  at::Tensor norms = at::full({T}, NAN, fopt);
  at::Tensor max_abs = at::full({T}, NAN, fopt);
  at::Tensor nonfinite = at::full({T}, -777, fopt.dtype(at::kLong));
  at::Tensor total = at::full({}, NAN, fopt);
  const NormScratch layout = norm_scratch(T, table.meta[kTotalUnits]);
  std::vector<char> fresh;
  char* scratch = scratch_of(fresh, layout.bytes, reuse_scratch);
  const double bound_memory = bound;  // what a bound "on the device" points at
  const NormOutputs out{norms.data_ptr(), max_abs.data_ptr(), nonfinite.data_ptr<int64_t>(),
                        total.data_ptr(), any_double};
  const Params P = norm_params(table.bytes.data(), table.meta, T, scratch, layout, kind, mode,
                               norm_type, eps, bound_on_device ? &bound_memory : nullptr,
                               bound_on_device ? -1.0 : bound, out);
  SimDevice dev(options_of(schedule, seed), grid_of(grid, resident, max_blocks),
                std::move(regions), {}, std::move(copies));
  try {
    norm_reduce(P, layout, dev);
    norm_write(P, table.meta, shared, has_copy, dev);
  } catch (...) {
    keep_info(dev);
    throw;
  }
  keep_info(dev);
  return {norms, max_abs, nonfinite, total};
}

Stats4 sim_agc(at::TensorList grads, at::TensorList params, double clip_factor, double eps,
               double norm_type, int64_t schedule, int64_t seed, int64_t grid, int64_t resident,
               int64_t max_blocks, bool reuse_scratch) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK_VALUE(grads.size() == params.size(), "gradstab_sim: one parameter per gradient");
  TORCH_CHECK_VALUE(norm_type > 0.0, "gradstab_sim: norm_type must be positive");
  const int64_t T = static_cast<int64_t>(grads.size());
  auto units_of = [](const at::Tensor& t) { return t.dim() <= 1 ? int64_t{1} : t.size(0); };
  // agc.cpp's rule: a tensor whose rows are not contiguous blocks gets a working copy.
  auto rows_are_blocks = [&](const at::Tensor& t) {
    if (t.numel() == 0) return true;
    if (!t.is_non_overlapping_and_dense()) return false;
    const int64_t u = units_of(t);
    return u == 1 || t.stride(0) == t.numel() / u;
  };
  std::vector<at::Tensor> gwork(T), wwork(T);
  std::vector<WorkCopy> copies(T);
  std::vector<char> has_copy(T, 0);
  std::vector<KeyItem> key(2 * T);
  std::vector<gs_sim::Region> gregions, wregions;
  bool any_double = false, any_copy = false;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& w = params[i];
    TORCH_CHECK_VALUE(g.device().is_cpu() && w.device().is_cpu(), "gradstab_sim: CPU tensors");
    TORCH_CHECK_VALUE(g.sizes() == w.sizes(), "gradstab_sim: pair ", i, " shapes differ");
    const int32_t gdt = dtype_code(g, "gradient", static_cast<size_t>(i));
    const int32_t wdt = dtype_code(w, "parameter", static_cast<size_t>(i));
    gwork[i] = g;
    wwork[i] = w;
    if (!rows_are_blocks(g)) {
      gwork[i] = g.contiguous();
      copies[i] = work_copy(g, gwork[i]);
      has_copy[i] = 1;
      any_copy = true;
    }
    if (!rows_are_blocks(w)) {
      wwork[i] = w.contiguous();
      any_copy = true;
    }
    key[2 * i] = KeyItem{reinterpret_cast<uint64_t>(gwork[i].data_ptr()), g.numel(), gdt};
    key[2 * i + 1] = KeyItem{reinterpret_cast<uint64_t>(wwork[i].data_ptr()), units_of(g), wdt};
    if (g.numel() > 0) {
      gregions.push_back(region(gwork[i].data_ptr(), g.numel(), dtype_size(gdt),
                                "gradient " + std::to_string(i)));
      wregions.push_back(region(wwork[i].data_ptr(), w.numel(), dtype_size(wdt),
                                "parameter " + std::to_string(i)));
    }
    any_double = any_double || gdt == kDouble;
  }
  const HostTable table = build_agc_table(key);
  const std::vector<int64_t>& meta = table.meta;
  bool shared = meta[kAgcKeyOverlap] != 0;
  if (!shared && any_copy) {
    std::vector<ByteSpan> written, read;
    for (int64_t i = 0; i < T; ++i) {
      written.push_back(span_of(grads[i]));
      if (wwork[i].is_same(params[i])) read.push_back(span_of(params[i]));
    }
    shared = spans_overlap(std::move(written), std::move(read));
  }
  const auto fopt = at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat);
  at::Tensor norms = at::full({T}, NAN, fopt);
  at::Tensor clipped = at::full({T}, -777, fopt.dtype(at::kLong));
  at::Tensor nonfinite = at::full({T}, -777, fopt.dtype(at::kLong));
  at::Tensor total = at::full({}, NAN, fopt);
  const AgcScratch layout = agc_scratch(T, meta);
  std::vector<char> fresh;
  char* scratch = scratch_of(fresh, layout.bytes, reuse_scratch);
  const AgcOutputs out{norms.data_ptr(), clipped.data_ptr<int64_t>(),
                       nonfinite.data_ptr<int64_t>(), total.data_ptr(), any_double};
  const AgcParams P = agc_params(table.bytes.data(), meta, T, scratch, layout,
                                 norm_kind(norm_type), shared, norm_type, clip_factor, eps, out);
  SimDevice dev(options_of(schedule, seed), grid_of(grid, resident, max_blocks),
                std::move(gregions), std::move(wregions), std::move(copies));
  try {
    agc_run(P, meta, layout, has_copy, dev);
  } catch (...) {
    keep_info(dev);
    throw;
  }
  keep_info(dev);
  return {norms, clipped, nonfinite, total};
}

gs_sim::Region whole(const at::Tensor& t, bool writable, const char* name) {
  gs_sim::Region r = region(t.const_data_ptr(), t.numel(), t.element_size(), name);
  r.writable = writable;
  return r;
}

at::Tensor threshold_z(const c10::optional<at::Tensor>& norm, at::Tensor mean, at::Tensor var,
                       at::Tensor count, at::Tensor spikes, at::Tensor warmup, double alpha,
                       double z_thresh, double eps, c10::optional<double> cap,
                       int64_t warmup_steps, int64_t rule, bool skip_on_spike, bool judge,
                       bool update, int64_t schedule, int64_t seed) {
  std::lock_guard<std::mutex> lock(g_mu);
  const char* fn = "gradstab_sim.threshold_z";
  const ZCall call = check_zscore_call(norm, mean, var, count, spikes, warmup, alpha, z_thresh,
                                      eps, cap, warmup_steps, rule, skip_on_spike, update,
                                      at::Device(at::kCPU), fn);
  const at::Tensor& g = call.g;
  at::Tensor bound = at::full(mean.sizes(), NAN, mean.options());  // garbage until written
  at::Tensor out = judge ? bound : at::Tensor();
  const ZParams P = zscore_params(call, mean, var, count, spikes, warmup, out, update);
  Regions regions{whole(mean, update, "mean"), whole(var, update, "var"),
                  whole(count, update, "count"), whole(spikes, update, "spikes"),
                  whole(warmup, update, "warmup"), whole(bound, judge, "bound")};
  if (g.defined()) regions.push_back(whole(g, false, "norm"));
  const int grid = static_cast<int>((P.n + kThresholdThreads - 1) / kThresholdThreads);
  g_last_stats = {};
  if (P.n > 0) {
    run_zscore_threshold_kernel(P, grid, regions, options_of(schedule, seed), &g_last_stats);
  }
  return judge ? bound : at::empty({0}, mean.options());
}

at::Tensor threshold_p(const c10::optional<at::Tensor>& norm, at::Tensor history,
                       at::Tensor count, double percentile, c10::optional<double> cap,
                       int64_t warmup_steps, bool include_current, bool judge, bool update,
                       int64_t schedule, int64_t seed) {
  std::lock_guard<std::mutex> lock(g_mu);
  const char* fn = "gradstab_sim.threshold_p";
  const PCall call = check_percentile_call(norm, history, count, percentile, cap, warmup_steps,
                                          include_current, update, at::Device(at::kCPU), fn);
  const at::Tensor& g = call.g;
  at::Tensor bound = at::full(count.sizes(), NAN, history.options());
  at::Tensor out = judge ? bound : at::Tensor();
  const PParams P = percentile_params(call, history, count, out, update);
  Regions regions{whole(history, update, "history"), whole(count, update, "count"),
                  whole(bound, judge, "bound")};
  if (g.defined()) regions.push_back(whole(g, false, "norm"));
  constexpr int kWarps = kThresholdThreads / 32;
  const int grid = static_cast<int>((P.n + kWarps - 1) / kWarps);
  g_last_stats = {};
  if (P.n > 0) {
    run_percentile_threshold_kernel(P, grid, regions, options_of(schedule, seed),
                                    &g_last_stats);
  }
  return judge ? bound : at::empty({0}, history.options());
}

std::vector<int64_t> last_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  const gs_sim::Stats& s = g_last_stats;
  return {s.launches, s.warps, s.collectives, s.loads, s.stores, s.vec_loads, s.vec_stores};
}

std::string last_log() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_last_log;
}

at::Tensor convert(const at::Tensor& x, int64_t kind) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "gradstab_sim: convert kind must be 0-2");
  if (kind == 2) {
    const at::Tensor h = x.to(at::kShort).contiguous();
    at::Tensor out = at::empty(h.sizes(), at::kFloat);
    const int16_t* in = h.const_data_ptr<int16_t>();
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < h.numel(); ++i) o[i] = half_bits_to_float(static_cast<uint16_t>(in[i]));
    return out;
  }
  const at::Tensor f = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(f.sizes(), at::kShort);
  const float* in = f.const_data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < f.numel(); ++i) {
    const uint16_t b = kind == 0 ? float_to_half_bits(in[i]) : float_to_bfloat16_bits(in[i]);
    o[i] = static_cast<int16_t>(b);
  }
  return out;
}

std::string selftest(int64_t which, int64_t schedule) {
  std::lock_guard<std::mutex> lock(g_mu);
  return run_selftest(static_cast<int>(which), options_of(schedule, 0));
}

}  // namespace
}  // namespace sim
}  // namespace cuda
}  // namespace gradstab

TORCH_LIBRARY(gradstab_sim, m) {
  m.def(
      "norm(int op, Tensor(a!)[] grads, float bound, bool bound_on_device, float norm_type, "
      "float eps, int schedule, int seed, int grid, int resident, int max_blocks, "
      "bool reuse_scratch) -> (Tensor, Tensor, Tensor, Tensor)",
      &gradstab::cuda::sim::sim_norm);
  m.def(
      "agc(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps, float norm_type, "
      "int schedule, int seed, int grid, int resident, int max_blocks, bool reuse_scratch) -> "
      "(Tensor, Tensor, Tensor, Tensor)",
      &gradstab::cuda::sim::sim_agc);
  m.def(
      "threshold_z(Tensor? norm, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, "
      "Tensor(d!) spikes, Tensor(e!) warmup, float alpha, float z_thresh, float eps, "
      "float? cap, int warmup_steps, int rule, bool skip_on_spike, bool judge, bool update, "
      "int schedule, int seed) -> Tensor",
      &gradstab::cuda::sim::threshold_z);
  m.def(
      "threshold_p(Tensor? norm, Tensor(a!) history, Tensor(b!) count, float percentile, "
      "float? cap, int warmup_steps, bool include_current, bool judge, bool update, "
      "int schedule, int seed) -> Tensor",
      &gradstab::cuda::sim::threshold_p);
  m.def("last_stats() -> int[]", &gradstab::cuda::sim::last_stats);
  m.def("last_log() -> str", &gradstab::cuda::sim::last_log);
  m.def("convert(Tensor x, int kind) -> Tensor", &gradstab::cuda::sim::convert);
  m.def("selftest(int which, int schedule) -> str", &gradstab::cuda::sim::selftest);
}
