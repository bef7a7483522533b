// Contract: the interface between the CUDA kernels of adaptive_clip (agc_kernels.cu, plain CUDA, no
// torch headers) and their host side (the torch-free plan agc_plan.cpp, the ATen launcher
// agc.cpp, the launches in agc_launch.cu, the CPU execution harness csrc/testing/
// cuda_sim): POD structs both sides share bit for bit, the kernels, and the launch functions.
//
// AGC (Brock et al. 2021) per row r (a slice along dim 0 of a >= 2-D gradient G and its
// parameter W; a 0-/1-D tensor is one row): max_r = clip_factor * max(||W_r||_p, eps) (NaN
// stays NaN); if ||G_r||_p > max_r, G_r *= max_r / ||G_r||_p. The launcher hands the kernels
// rows that are contiguous blocks (row r at element r * row_len; a tensor whose rows are not is
// given a contiguous working copy).
//
// Work layout (built on the host from the cache key, cached on the device like the norm ops'
// tables): the pair table lists the (G, W) pairs in work order (most work items first, ties in
// input order, zero-size pairs last); each pair's work items are numbered consecutively from
// its first_item. A work item is the work of one warp:
//   * short rows (row_len <= kAgcItemElems): `per` whole rows. For each row the warp reads W_r,
//     then G_r, decides, and scales G_r at once while it is in cache (unless `deferred`).
//   * long rows (row_len > kAgcItemElems): piece c of row r (elements [c, c + 1) *
//     kAgcItemElems of the row, the last one shorter), `per` pieces per row. The warp writes the
//     piece's partial sums of W and G to the piece's slot; the warp that completes a row's last
//     piece (atomic counter, after a __threadfence) combines the row's pieces in piece order and
//     decides; the scale kernel then scales the pieces of clipped rows.
// The warp that completes a pair's last row (atomic counter of rows) combines the row results
// in a fixed order into the pair's statistics; the warp that completes the last pair computes
// the total norm. Every combination has a fixed order: results are bit-identical run to run
// and for any grid size. No floating-point atomics.
//
// deferred (the launcher's choice when gradients share memory with each other or with a
// parameter): the reduce kernel writes no gradient; the scale kernel, launched once per pair in
// list order over that pair's items, scales every clipped row with its coefficient from the
// data on entry.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace gradstab {
namespace cuda {

// Elements of G per work item, and the length of a piece of a longer row.
constexpr int64_t kAgcItemElems = 4096;

// One (gradient, parameter) pair, 96 bytes.
struct AgcPair {
  uint64_t g;           // gradient data: row r starts at element r * row_len
  uint64_t w;           // parameter data, likewise
  int64_t rows;         // units: size(0) of a >= 2-D tensor, 1 otherwise
  int64_t row_len;      // elements per row
  int64_t first_row;    // index of row 0 in the per-row records
  int64_t first_item;   // index of the pair's first work item
  int64_t num_items;    // 0 for a zero-size pair
  int64_t per;          // short rows: rows per item; long rows: pieces per row
  int64_t first_piece;  // long rows: slot of row 0's piece 0 (row r, piece c: + r * per + c)
  int64_t first_long;   // long rows: index of row 0's piece counter (row r: + r)
  int32_t gdtype;       // DType of G (norm_kernels.cuh)
  int32_t wdtype;       // DType of W
  int32_t orig;         // position in the caller's list: indexes every per-pair result
  int32_t is_long;      // row_len > kAgcItemElems
};
static_assert(sizeof(AgcPair) == 96, "AgcPair layout");

// Per row, written by the warp that decided it.
struct AgcRow {
  double sum;         // sum of |g|^p over the row (+inf: rescued, only the norm is valid)
  double norm;        // ||G_r||_p
  double coef;        // the row's coefficient; < 1 exactly when the row is clipped
  int64_t nonfinite;  // NaN/Inf elements of G_r
};
static_assert(sizeof(AgcRow) == 32, "AgcRow layout");

// Per piece of a long row: partial sums of |x|^p and max |x| (NaN if the piece holds a NaN).
struct AgcPiece {
  double wsum;
  double wmax;
  double gsum;
  double gmax;
  int64_t wnonfinite;
  int64_t gnonfinite;
};
static_assert(sizeof(AgcPiece) == 48, "AgcPiece layout");

// Per pair, indexed by the caller's position.
struct AgcPairRecord {
  double sum;         // sum of |g|^p (+inf: only the norm is valid)
  double norm;        // pre-clip ||G||_p
  int64_t clipped;    // clipped rows (also the write-back flag of a strided gradient)
  int64_t nonfinite;  // NaN/Inf elements of G
};
static_assert(sizeof(AgcPairRecord) == 32, "AgcPairRecord layout");

struct AgcGlobal {
  int32_t scale;  // nonzero when the scale kernel has anything to write
  int32_t pad;
  double total;   // pre-clip total norm
};
static_assert(sizeof(AgcGlobal) == 16, "AgcGlobal layout");

struct AgcParams {
  const AgcPair* pairs;  // num_pairs pairs, work order
  int32_t num_pairs;
  int32_t num_work;      // pairs with work items (the first num_work of the table)
  int64_t total_items;
  int64_t item_begin;    // the scale kernel's items [item_begin, item_end)
  int64_t item_end;
  int32_t kind;          // NormKind (norm_kernels.cuh)
  int32_t deferred;      // see above
  double p;              // norm order
  double clip_factor;
  double eps;
  // scratch; zeroed by the launcher: pair_done, long_done, all_done, global
  AgcRow* rows;
  AgcPiece* pieces;
  AgcPairRecord* pair_rec;
  AgcGlobal* global;
  unsigned long long* pair_done;  // rows completed, per table entry
  int32_t* long_done;             // pieces completed, per long row
  int32_t* all_done;              // pairs completed
  // outputs (norms and total float64 when out_double, else float32)
  void* out_norms;
  int64_t* out_clipped;
  int64_t* out_nonfinite;
  void* out_total;
  int32_t out_double;
  int32_t pad;
};

// The kernels (agc_kernels.cu). Launched by agc_launch.cu on the GPU; the CPU execution harness
// (csrc/testing/cuda_sim) compiles agc_kernels.cu as host C++ and runs them on a simulated grid.
#if defined(__CUDACC__)
__global__ void agc_reduce_kernel(const __grid_constant__ AgcParams P);
__global__ void agc_scale_kernel(const __grid_constant__ AgcParams P);
#endif

// Blocks of kThreads threads for `items` work items on `device`: the resident maximum of the
// kernel, fewer when there is less work; max_blocks > 0 caps it (a test hook). (agc_launch.cu)
int agc_reduce_grid(int device, int64_t items, int max_blocks);
int agc_scale_grid(int device, int64_t items, int max_blocks);

// Launch on `stream`; return the launch error (cudaSuccess when queued). (agc_launch.cu)
cudaError_t launch_agc_reduce(const AgcParams& params, int grid, cudaStream_t stream);
cudaError_t launch_agc_scale(const AgcParams& params, int grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradstab
