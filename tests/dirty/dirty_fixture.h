// gfnmap dirty tests: shared fixture pieces (a VM's memslots with a DirtyLog, a recording
// write protector) for the dirty and dirty_tsan suites.
#pragma once

#include <gtest/gtest.h>

#include <mutex>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"

namespace gfnmap::testing_dirty {

inline constexpr uint64_t kHvaBase = 0x7f0000000000ULL;

// Records every write_protect call.
class RecordingProtector : public DirtyWriteProtector {
 public:
  struct Call {
    uint16_t slot_id;
    uint64_t base;
    uint64_t mask;
    friend bool operator==(const Call&, const Call&) = default;
  };
  void write_protect(const Memslot& slot, Gfn base, uint64_t mask) override {
    std::lock_guard<std::mutex> g(mu);
    EXPECT_TRUE(in_batch) << "write_protect outside begin_batch/end_batch";
    EXPECT_NE(mask, 0u);
    EXPECT_TRUE(slot.contains(base)) << "base " << base.value;
    calls.push_back({slot.id, base.value, mask});
  }
  void flush_remote_tlbs(const Memslot& /*slot*/) override {
    std::lock_guard<std::mutex> g(mu);
    ++flushes;
  }
  void begin_batch() override {
    std::lock_guard<std::mutex> g(mu);
    in_batch = true;
    ++batches;
  }
  void end_batch() override {
    std::lock_guard<std::mutex> g(mu);
    in_batch = false;
  }
  std::vector<Call> take() {
    std::lock_guard<std::mutex> g(mu);
    std::vector<Call> out;
    out.swap(calls);
    return out;
  }

  std::mutex mu;
  std::vector<Call> calls;
  int flushes = 0;
  int batches = 0;
  bool in_batch = false;
};

// Creates or changes slot `id` of address space 0 (KVM_SET_USER_MEMORY_REGION).
inline Result<std::optional<MemslotChange>> set_slot(Memslots& slots, uint16_t id, uint64_t gpa,
                                                     uint64_t npages, uint32_t flags,
                                                     uint64_t hva = 0) {
  UserspaceMemoryRegion r;
  r.slot = id;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = npages * kPageSize;
  r.userspace_addr = hva ? hva : kHvaBase + uint64_t{id} * (uint64_t{1} << 32);
  return slots.set_memory_region(r);
}

inline Memslot slot_copy(Memslots& slots, uint16_t id, unsigned as_id = 0) {
  auto lock = slots.read_lock();
  const Memslot* s = lock.set(as_id).id_to_memslot(id);
  EXPECT_NE(s, nullptr) << "slot " << id;
  return s ? *s : Memslot{};
}

}  // namespace gfnmap::testing_dirty
