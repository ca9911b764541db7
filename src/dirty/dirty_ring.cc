// gfnmap dirty: one vCPU's dirty ring (kvm_dirty_ring push / soft-full / harvest) and the
// bitmap-to-ranges view.
#include <algorithm>
#include <bit>

#include "gfnmap/dirty.h"

namespace gfnmap {

void DirtyWriteProtector::flush_remote_tlbs(const Memslot& /*slot*/) {}
void DirtyWriteProtector::begin_batch() {}
void DirtyWriteProtector::end_batch() {}

DirtyRing::DirtyRing(uint32_t vcpu_id, uint32_t nr_entries, uint32_t reserved_entries)
    : vcpu_id_(vcpu_id),
      size_(std::bit_floor(nr_entries)),
      soft_limit_(size_ > reserved_entries ? size_ - reserved_entries : 0),
      entries_(size_ ? std::make_unique<DirtyGfn[]>(size_) : nullptr) {}

uint32_t DirtyRing::used() const {
  // Unsigned wraparound keeps the difference right across 2^32 pushes.
  return dirty_index_.load(std::memory_order_relaxed) -
         reset_index_.load(std::memory_order_acquire);
}

bool DirtyRing::push(uint32_t slot, uint64_t offset) {
  if (size_ == 0 || used() >= size_) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const uint32_t index = dirty_index_.load(std::memory_order_relaxed);
  DirtyGfn& entry = entries_[index & (size_ - 1)];
  // The entry is free: reset_dirty_rings cleared it before publishing reset_index, which
  // used() acquired above.
  entry.slot = slot;
  entry.offset = offset;
  entry.flags.store(kDirtyGfnDirty, std::memory_order_release);
  dirty_index_.store(index + 1, std::memory_order_release);
  pushed_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

size_t DirtyRing::harvest(FunctionRef<void(uint32_t slot, uint64_t offset)> fn) {
  size_t count = 0;
  while (size_ != 0) {
    DirtyGfn& entry = entries_[harvest_index_ & (size_ - 1)];
    const uint32_t flags = entry.flags.load(std::memory_order_acquire);
    if ((flags & kDirtyGfnDirty) == 0 || (flags & kDirtyGfnReset) != 0) break;
    fn(entry.slot, entry.offset);
    entry.flags.store(kDirtyGfnReset, std::memory_order_release);
    ++harvest_index_;
    ++count;
  }
  return count;
}

std::vector<DirtyRange> dirty_bitmap_to_ranges(Gfn base_gfn, std::span<const uint64_t> bitmap,
                                               uint64_t npages) {
  std::vector<DirtyRange> ranges;
  const uint64_t nbits = std::min<uint64_t>(npages, uint64_t{bitmap.size()} * 64);
  uint64_t i = 0;
  while (i < nbits) {
    // Find the next set bit.
    uint64_t word = bitmap[i / 64] >> (i % 64);
    if (word == 0) {
      i = (i / 64 + 1) * 64;
      continue;
    }
    i += static_cast<uint64_t>(std::countr_zero(word));
    if (i >= nbits) break;
    const uint64_t start = i;
    // Find the end of the run of ones.
    while (i < nbits) {
      const uint64_t inverted = ~bitmap[i / 64] >> (i % 64);
      if (inverted == 0) {
        i = (i / 64 + 1) * 64;
        continue;
      }
      i += static_cast<uint64_t>(std::countr_zero(inverted));
      break;
    }
    if (i > nbits) i = nbits;
    ranges.push_back(DirtyRange{gfn_to_gpa(base_gfn + start), (i - start) * kPageSize});
  }
  return ranges;
}

}  // namespace gfnmap
