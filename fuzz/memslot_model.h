// gfnmap fuzz: an independent reference model of KVM_SET_USER_MEMORY_REGION(2), written from
// docs/spec.md 7.4 alone (a map of slots, linear scans), for differential fuzzing of Memslots.
#pragma once

#include <cerrno>
#include <cstdint>
#include <map>
#include <optional>
#include <utility>

#include "gfnmap/memslot.h"

namespace gfnmap::fuzz {

struct ModelSlot {
  uint64_t base_gfn = 0;
  uint64_t npages = 0;
  uint64_t hva = 0;
  uint32_t flags = 0;
};

struct ModelResult {
  int err = 0;                          // 0 or the errno of the first failing row
  int row = 0;                          // that row of the 7.4 table (0 on success)
  std::optional<MemslotChange> change;  // on success; nullopt for the no-op modify (row 17)
};

class MemslotModel {
 public:
  explicit MemslotModel(const MemslotsConfig& c) : c_(c) {}

  // The rows of the 7.4 table, in order; the first that fails decides. Rows 1, 2 (no user
  // copy), 14 (the page total cannot overflow 64 bits with at most 32764 slots of < 2^31
  // pages), 18b (no guest_memfd lookup in the default config) and 19 (no allocation fails)
  // cannot fail here.
  ModelResult apply(const UserspaceMemoryRegion& m, RegionIoctl ioctl) {
    constexpr uint64_t kMask = kPageSize - 1;
    const uint32_t id = m.slot & 0xffff;
    const uint32_t as = m.slot >> 16;
    const uint32_t f = m.flags;
    const bool gmem = f & kMemGuestMemfd;
    if (ioctl == RegionIoctl::kV1 && (f & ~(kMemLogDirtyPages | kMemReadonly))) return fail(3);
    if (id >= c_.nr_user_slots) return fail(4);
    uint32_t valid = kMemLogDirtyPages;
    if (c_.readonly_mem && !gmem) valid |= kMemReadonly;
    if (c_.private_mem) valid |= kMemGuestMemfd;
    if ((f & ~valid) || (gmem && (f & kMemLogDirtyPages))) return fail(5);
    if (m.memory_size & kMask) return fail(6);
    if (m.guest_phys_addr & kMask) return fail(7);
    if ((m.userspace_addr & kMask) || m.userspace_addr + m.memory_size < m.userspace_addr ||
        m.userspace_addr + m.memory_size > c_.task_size) {
      return fail(8);
    }
    if (gmem && ((m.guest_memfd_offset & kMask) ||
                 m.guest_memfd_offset + m.memory_size < m.guest_memfd_offset)) {
      return fail(9);
    }
    if (as >= c_.nr_address_spaces || id >= kMemSlotsNum) return fail(10);
    if (m.guest_phys_addr + m.memory_size < m.guest_phys_addr) return fail(11);
    const uint64_t npages = m.memory_size / kPageSize;
    const uint64_t base = m.guest_phys_addr / kPageSize;
    if (npages > kMemMaxNrPages) return fail(12);
    const auto key = std::make_pair(as, id);
    auto old = slots_.find(key);
    if (m.memory_size == 0) {
      if (old == slots_.end()) return fail(13);
      slots_.erase(old);
      return ok(MemslotChange::kDelete);
    }
    MemslotChange change = MemslotChange::kCreate;
    if (old != slots_.end()) {
      const ModelSlot& o = old->second;
      if ((o.flags & kMemGuestMemfd) || gmem) return fail(15);
      if (m.userspace_addr != o.hva || npages != o.npages ||
          ((f ^ o.flags) & kMemReadonly)) {
        return fail(16);
      }
      if (base != o.base_gfn) {
        change = MemslotChange::kMove;
      } else if (f != o.flags) {
        change = MemslotChange::kFlagsOnly;
      } else {
        return ModelResult{};  // row 17
      }
    }
    if (change != MemslotChange::kFlagsOnly) {
      for (const auto& [k, s] : slots_) {
        if (k.first != as || k.second == id) continue;
        if (base < s.base_gfn + s.npages && s.base_gfn < base + npages) return fail(18, EEXIST);
      }
      if (base + npages - 1 > c_.max_gfn) return fail(20);
    }
    slots_[key] = ModelSlot{base, npages, m.userspace_addr, f};
    return ok(change);
  }

  const std::map<std::pair<uint32_t, uint32_t>, ModelSlot>& slots() const { return slots_; }

  // The slot of `as` holding gfn (a linear scan), or nullptr.
  const ModelSlot* find(uint32_t as, uint64_t gfn, uint32_t* id) const {
    for (const auto& [k, s] : slots_) {
      if (k.first == as && gfn >= s.base_gfn && gfn - s.base_gfn < s.npages) {
        *id = k.second;
        return &s;
      }
    }
    return nullptr;
  }

  uint64_t total_pages() const {
    uint64_t n = 0;
    for (const auto& [k, s] : slots_) n += s.npages;
    return n;
  }

 private:
  static ModelResult fail(int row, int err = EINVAL) { return ModelResult{err, row, {}}; }
  static ModelResult ok(MemslotChange c) { return ModelResult{0, 0, c}; }

  MemslotsConfig c_;
  std::map<std::pair<uint32_t, uint32_t>, ModelSlot> slots_;
};

}  // namespace gfnmap::fuzz
