// Contract: see sim_device.h (the plans' device on the simulator).
#include "sim_device.h"

#include <cstring>
#include <utility>

#include "sim_kernels.h"

namespace gradstab {
namespace cuda {
namespace sim {

namespace {

// Byte offset of element `i` (row-major) of a tensor with these sizes and strides.
int64_t offset_of(int64_t i, int64_t elem_size, const std::vector<int64_t>& sizes,
                  const std::vector<int64_t>& strides) {
  int64_t off = 0;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    off += i % sizes[d] * strides[d];
    i /= sizes[d];
  }
  return off * elem_size;
}

int64_t numel_of(const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

}  // namespace

void gather_strided(void* contiguous, const void* strided, int64_t elem_size,
                    const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  const int64_t n = numel_of(sizes);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(static_cast<char*>(contiguous) + i * elem_size,
                static_cast<const char*>(strided) + offset_of(i, elem_size, sizes, strides),
                static_cast<size_t>(elem_size));
  }
}

void scatter_strided(void* strided, const void* contiguous, int64_t elem_size,
                     const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  const int64_t n = numel_of(sizes);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(static_cast<char*>(strided) + offset_of(i, elem_size, sizes, strides),
                static_cast<const char*>(contiguous) + i * elem_size,
                static_cast<size_t>(elem_size));
  }
}

SimDevice::SimDevice(const gs_sim::Options& options, const Grid& grid,
                     std::vector<gs_sim::Region> grads, std::vector<gs_sim::Region> params,
                     std::vector<WorkCopy> copies)
    : options_(options),
      grid_(grid),
      grads_(std::move(grads)),
      params_(std::move(params)),
      copies_(std::move(copies)) {}

int SimDevice::grid_for(int64_t work) const {
  if (grid_.exact > 0) return grid_.exact;
  return persistent_grid(work, grid_.resident, grid_.max_blocks);
}

std::vector<gs_sim::Region> SimDevice::regions(bool grads_writable) const {
  std::vector<gs_sim::Region> r;
  for (gs_sim::Region g : grads_) {
    g.writable = grads_writable;
    r.push_back(std::move(g));
  }
  for (gs_sim::Region p : params_) {
    p.writable = false;
    r.push_back(std::move(p));
  }
  return r;
}

void SimDevice::zero(void* dst, int64_t bytes) {
  std::memset(dst, 0, static_cast<size_t>(bytes));
  log_.push_back("zero " + std::to_string(bytes));
}

void SimDevice::reduce(const Params& P, int64_t units) {
  const int grid = grid_for(units);
  log_.push_back("reduce grid " + std::to_string(grid));
  run_reduce_kernel(P, grid, regions(P.mode == kClipValue), options_, &stats_);
}

void SimDevice::scale(const Params& P, int64_t units) {
  const int grid = grid_for(units);
  log_.push_back("scale [" + std::to_string(P.scale_begin) + ", " + std::to_string(P.scale_end) +
                 ") grid " + std::to_string(grid));
  run_scale_kernel(P, grid, regions(true), options_, &stats_);
}

void SimDevice::reduce(const AgcParams& P, int64_t items) {
  const int grid = grid_for(items);
  log_.push_back("agc_reduce grid " + std::to_string(grid));
  run_agc_reduce_kernel(P, grid, regions(P.deferred == 0), options_, &stats_);
}

void SimDevice::scale(const AgcParams& P, int64_t items) {
  const int grid = grid_for(items);
  log_.push_back("agc_scale [" + std::to_string(P.item_begin) + ", " +
                 std::to_string(P.item_end) + ") grid " + std::to_string(grid));
  run_agc_scale_kernel(P, grid, regions(true), options_, &stats_);
}

void SimDevice::refresh_copy(int64_t i) {
  const WorkCopy& c = copies_.at(static_cast<size_t>(i));
  log_.push_back("refresh " + std::to_string(i));
  gather_strided(c.work, c.grad, c.elem_size, c.sizes, c.strides);
}

void SimDevice::write_back(int64_t i, const int32_t* flag32, const int64_t* flag64) {
  const WorkCopy& c = copies_.at(static_cast<size_t>(i));
  const auto dims = coalesced_dims(c.sizes.data(), c.strides.data(),
                                   static_cast<int64_t>(c.sizes.size()));
  WritebackParams W{};
  if (!writeback_params(c.work, c.grad, c.numel, c.elem_size, dims, flag32, flag64, &W)) {
    log_.push_back("copy back " + std::to_string(i));
    scatter_strided(c.grad, c.work, c.elem_size, c.sizes, c.strides);
    return;
  }
  const uint64_t work = reinterpret_cast<uint64_t>(c.work);
  const ByteSpan dst = strided_byte_span(reinterpret_cast<uint64_t>(c.grad), c.sizes.data(),
                                         c.strides.data(), static_cast<int64_t>(c.sizes.size()),
                                         c.elem_size);
  std::vector<gs_sim::Region> r;
  r.push_back({work, work + static_cast<uint64_t>(c.numel * c.elem_size), false,
               "working copy of gradient " + std::to_string(i)});
  r.push_back({dst.first, dst.second, true, "strided gradient " + std::to_string(i)});
  const int grid = writeback_grid(c.numel);
  log_.push_back("writeback " + std::to_string(i) + " grid " + std::to_string(grid));
  run_writeback_kernel(W, grid, r, options_, &stats_);
}

void SimDevice::write_back(int64_t i, const int64_t* flag64) { write_back(i, nullptr, flag64); }

}  // namespace sim
}  // namespace cuda
}  // namespace gradstab
