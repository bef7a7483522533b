// Contract: see overlap.h.
#include "common/overlap.h"

#include <algorithm>

namespace gradstab {

ByteSpan strided_byte_span(uint64_t ptr, const int64_t* sizes, const int64_t* strides,
                           int64_t ndim, int64_t elem_size) {
  int64_t extent = 1;  // elements from the first addressed to the last one
  for (int64_t d = 0; d < ndim; ++d) {
    if (sizes[d] == 0) return {0, 0};
    extent += (sizes[d] - 1) * strides[d];
  }
  return {ptr, ptr + static_cast<uint64_t>(extent * elem_size)};
}

ByteSpan dense_byte_span(uint64_t ptr, int64_t numel, int64_t elem_size) {
  if (numel == 0) return {0, 0};
  return {ptr, ptr + static_cast<uint64_t>(numel * elem_size)};
}

namespace {

void sort_spans(std::vector<ByteSpan>& v) {
  v.erase(std::remove_if(v.begin(), v.end(), [](const ByteSpan& s) { return s.first >= s.second; }),
          v.end());
  if (std::is_sorted(v.begin(), v.end())) return;
  std::reverse(v.begin(), v.end());
  if (!std::is_sorted(v.begin(), v.end())) std::sort(v.begin(), v.end());
}

}  // namespace

bool spans_overlap(std::vector<ByteSpan> written, std::vector<ByteSpan> read) {
  sort_spans(written);
  sort_spans(read);
  for (size_t k = 1; k < written.size(); ++k) {
    if (written[k].first < written[k - 1].second) return true;
  }
  // written against read: merge the sorted lists; a span overlaps an earlier one of the other
  // kind iff it starts before the largest end seen among those
  uint64_t w_end = 0, r_end = 0;
  size_t a = 0, b = 0;
  while (a < written.size() || b < read.size()) {
    if (b == read.size() || (a < written.size() && written[a] < read[b])) {
      if (written[a].first < r_end) return true;
      w_end = std::max(w_end, written[a].second);
      ++a;
    } else {
      if (read[b].first < w_end) return true;
      r_end = std::max(r_end, read[b].second);
      ++b;
    }
  }
  return false;
}

}  // namespace gradstab
