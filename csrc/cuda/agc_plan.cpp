// Contract: see agc_plan.h (the torch-free plan of one call of adaptive_clip's CUDA kernels).
#include "cuda/agc_plan.h"

#include <algorithm>
#include <cstring>
#include <numeric>

namespace gradstab {
namespace cuda {

HostTable build_agc_table(const std::vector<KeyItem>& key) {
  const int64_t T = static_cast<int64_t>(key.size() / 2);
  std::vector<AgcPair> pairs(T);
  std::vector<int64_t> items(T, 0);
  for (int64_t i = 0; i < T; ++i) {
    const KeyItem& g = key[2 * i];
    const KeyItem& w = key[2 * i + 1];
    AgcPair& d = pairs[i];
    std::memset(&d, 0, sizeof d);
    d.g = g.ptr;
    d.w = w.ptr;
    d.rows = w.numel;
    d.row_len = (g.numel == 0 || d.rows == 0) ? 0 : g.numel / d.rows;
    d.gdtype = g.dtype;
    d.wdtype = w.dtype;
    d.orig = static_cast<int32_t>(i);
    if (g.numel == 0) continue;
    d.is_long = d.row_len > kAgcItemElems ? 1 : 0;
    if (d.is_long) {
      d.per = (d.row_len + kAgcItemElems - 1) / kAgcItemElems;
      items[i] = d.rows * d.per;
    } else {
      d.per = std::max<int64_t>(1, kAgcItemElems / d.row_len);
      items[i] = (d.rows + d.per - 1) / d.per;
    }
  }
  // Work order: most items first (the pairs finishing last are small and quick to combine),
  // ties in input order; zero-size pairs last.
  std::vector<int32_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return items[a] > items[b]; });
  HostTable host;
  host.meta.assign(kPerPair + 2 * T, 0);
  std::vector<AgcPair> table(T);
  int64_t item = 0, row = 0, piece = 0, longs = 0, work = 0;
  for (int64_t k = 0; k < T; ++k) {
    const int32_t i = order[k];
    AgcPair d = pairs[i];
    d.first_item = item;
    d.num_items = items[i];
    d.first_row = row;
    if (d.is_long) {
      d.first_piece = piece;
      d.first_long = longs;
      piece += d.rows * d.per;
      longs += d.rows;
    }
    if (items[i] > 0) {
      row += d.rows;
      ++work;
    }
    host.meta[kPerPair + i] = item;
    host.meta[kPerPair + T + i] = items[i];
    item += items[i];
    table[k] = d;
  }
  std::vector<ByteSpan> written, read;
  for (int64_t i = 0; i < T; ++i) {
    const KeyItem& g = key[2 * i];
    const KeyItem& w = key[2 * i + 1];
    written.push_back(dense_byte_span(g.ptr, g.numel, dtype_size(g.dtype)));
    read.push_back(dense_byte_span(w.ptr, g.numel, dtype_size(w.dtype)));
  }
  host.meta[kItems] = item;
  host.meta[kWork] = work;
  host.meta[kRows] = row;
  host.meta[kPieces] = piece;
  host.meta[kLongs] = longs;
  host.meta[kAgcKeyOverlap] = spans_overlap(std::move(written), std::move(read)) ? 1 : 0;
  host.bytes.resize(T * sizeof(AgcPair));
  if (T > 0) std::memcpy(host.bytes.data(), table.data(), T * sizeof(AgcPair));
  return host;
}

AgcScratch agc_scratch(int64_t num_pairs, const std::vector<int64_t>& meta) {
  AgcScratch s;
  s.long_done = num_pairs * static_cast<int64_t>(sizeof(unsigned long long));
  s.all_done = s.long_done + meta[kLongs] * static_cast<int64_t>(sizeof(int32_t));
  s.global = align16(s.all_done + static_cast<int64_t>(sizeof(int32_t)));
  s.zeroed = s.global + static_cast<int64_t>(sizeof(AgcGlobal));
  s.pairs = align16(s.zeroed);
  s.rows = s.pairs + num_pairs * static_cast<int64_t>(sizeof(AgcPairRecord));
  s.pieces = s.rows + meta[kRows] * static_cast<int64_t>(sizeof(AgcRow));
  s.bytes = s.pieces + meta[kPieces] * static_cast<int64_t>(sizeof(AgcPiece));
  return s;
}

AgcParams agc_params(const void* table, const std::vector<int64_t>& meta, int64_t num_pairs,
                     char* scratch, const AgcScratch& layout, int32_t kind, bool deferred,
                     double p, double clip_factor, double eps, const AgcOutputs& out) {
  AgcParams P{};
  P.pairs = static_cast<const AgcPair*>(table);
  P.num_pairs = static_cast<int32_t>(num_pairs);
  P.num_work = static_cast<int32_t>(meta[kWork]);
  P.total_items = meta[kItems];
  P.item_begin = 0;
  P.item_end = meta[kItems];
  P.kind = kind;
  P.deferred = deferred ? 1 : 0;
  P.p = p;
  P.clip_factor = clip_factor;
  P.eps = eps;
  P.rows = reinterpret_cast<AgcRow*>(scratch + layout.rows);
  P.pieces = reinterpret_cast<AgcPiece*>(scratch + layout.pieces);
  P.pair_rec = reinterpret_cast<AgcPairRecord*>(scratch + layout.pairs);
  P.global = reinterpret_cast<AgcGlobal*>(scratch + layout.global);
  P.pair_done = reinterpret_cast<unsigned long long*>(scratch);
  P.long_done = reinterpret_cast<int32_t*>(scratch + layout.long_done);
  P.all_done = reinterpret_cast<int32_t*>(scratch + layout.all_done);
  P.out_norms = out.norms;
  P.out_clipped = out.clipped;
  P.out_nonfinite = out.nonfinite;
  P.out_total = out.total;
  P.out_double = out.out_double ? 1 : 0;
  return P;
}

void agc_run(const AgcParams& P, const std::vector<int64_t>& meta, const AgcScratch& layout,
             const std::vector<char>& has_copy, AgcDevice& dev) {
  const int64_t T = P.num_pairs;
  dev.zero(P.pair_done, layout.zeroed);
  dev.reduce(P, meta[kItems]);
  // A copy is written back only if one of its gradient's rows was clipped (a device flag).
  auto write_back = [&](int64_t i) { dev.write_back(i, &P.pair_rec[i].clipped); };
  if (!P.deferred) {
    if (meta[kPieces] > 0) dev.scale(P, meta[kItems]);  // long rows are scaled by this kernel
    for (int64_t i = 0; i < T; ++i) {
      if (has_copy[i]) write_back(i);
    }
    return;
  }
  // Everything was decided from the data on entry; now one gradient at a time, in list order
  // (a gradient passed twice is scaled twice), its copy re-read first (an earlier gradient may
  // have written its memory).
  for (int64_t i = 0; i < T; ++i) {
    const int64_t items = meta[kPerPair + T + i];
    if (items == 0) continue;
    if (has_copy[i]) dev.refresh_copy(i);
    AgcParams Q = P;
    Q.item_begin = meta[kPerPair + i];
    Q.item_end = Q.item_begin + items;
    dev.scale(Q, items);
    if (has_copy[i]) write_back(i);
  }
}

}  // namespace cuda
}  // namespace gradstab
