// The byte ranges of a host buffer written since they were last copied to a device mirror
// (the addon's KV pool mirror, ADR 0010): kvEncode notes each write, the next device attention
// over the pool copies them all at once (em_cuda_copy_ranges). Consecutive writes that
// continue a run are one range (a prefill's rows of a block; a sequence's decode rows). Pure
// bookkeeping, tested on the CPU (test/test_device_plan.cpp).
#pragma once

#include <cstddef>
#include <vector>

namespace em {

class DirtyRanges {
 public:
  explicit DirtyRanges(size_t max_ranges) : max_(max_ranges) {}
  // Notes bytes [at, at + len). False when that would make more than max_ranges ranges:
  // nothing is noted then, and the caller copies the whole buffer instead.
  bool note(size_t at, size_t len) {
    if (len == 0) return true;
    if (!at_.empty() && at_.back() + len_.back() == at) {
      len_.back() += len;
      return true;
    }
    if (at_.size() >= max_) return false;
    at_.push_back(at);
    len_.push_back(len);
    return true;
  }
  bool empty() const { return at_.empty(); }
  size_t size() const { return at_.size(); }
  const size_t* offsets() const { return at_.data(); }
  const size_t* lengths() const { return len_.data(); }
  void clear() {
    at_.clear();
    len_.clear();
  }

 private:
  size_t max_;
  std::vector<size_t> at_, len_;
};

}  // namespace em
