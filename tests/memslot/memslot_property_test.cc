// gfnmap memslot tests: random set_memory_region sequences against a naive linear-scan oracle
// (invariants 20, 21, 22): results and errnos, slot tables, every lookup and cache, hva overlap.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

using test::kHvaBase;

constexpr uint32_t kUserSlots = 12;  // small, so that ids past the limit come up
constexpr uint64_t kGfnSpace = 64;   // gpa pages the generator uses
constexpr uint64_t kHvaSpace = 48;   // hva pages: slots often share host memory

// The oracle: KVM_SET_USER_MEMORY_REGION's rules (spec 7.4) over a map, searched linearly.
struct Oracle {
  unsigned nr_as = 1;
  std::map<std::pair<unsigned, uint16_t>, Memslot> slots;  // (as, id) -> slot
  uint64_t total_pages = 0;

  // 0 or the errno, and the change (nullopt for the no-op).
  std::pair<int, std::optional<MemslotChange>> apply(const UserspaceMemoryRegion& r) {
    const uint32_t id = r.slot & 0xffff;
    const uint32_t as = r.slot >> 16;
    if (r.flags & ~(kMemLogDirtyPages | kMemReadonly)) return {EINVAL, {}};
    if (id >= kUserSlots) return {EINVAL, {}};
    if (r.memory_size % kPageSize) return {EINVAL, {}};
    if (as >= nr_as) return {EINVAL, {}};
    const auto key = std::make_pair(as, static_cast<uint16_t>(id));
    auto it = slots.find(key);
    if (r.memory_size == 0) {
      if (it == slots.end()) return {EINVAL, {}};
      total_pages -= it->second.npages;
      slots.erase(it);
      return {0, MemslotChange::kDelete};
    }
    Memslot next{static_cast<uint16_t>(id), static_cast<uint16_t>(as),
                 Gfn(r.guest_phys_addr / kPageSize), r.memory_size / kPageSize,
                 Hva(r.userspace_addr), r.flags};
    MemslotChange change = MemslotChange::kCreate;
    if (it != slots.end()) {
      const Memslot& old = it->second;
      if (old.userspace_addr != next.userspace_addr || old.npages != next.npages ||
          ((old.flags ^ next.flags) & kMemReadonly)) {
        return {EINVAL, {}};
      }
      if (old.base_gfn != next.base_gfn) {
        change = MemslotChange::kMove;
      } else if (old.flags != next.flags) {
        change = MemslotChange::kFlagsOnly;
      } else {
        return {0, std::nullopt};
      }
    }
    if (change != MemslotChange::kFlagsOnly) {
      for (const auto& [k, s] : slots) {
        if (k.first == as && k.second != id && s.base_gfn < next.end_gfn() &&
            next.base_gfn < s.end_gfn()) {
          return {EEXIST, {}};
        }
      }
    }
    if (change == MemslotChange::kCreate) total_pages += next.npages;
    slots[key] = next;
    return {0, change};
  }

  const Memslot* find(unsigned as, Gfn gfn) const {
    for (const auto& [k, s] : slots) {
      if (k.first == as && s.contains(gfn)) return &s;
    }
    return nullptr;
  }
  std::vector<Memslot> of(unsigned as) const {
    std::vector<Memslot> v;
    for (const auto& [k, s] : slots) {
      if (k.first == as) v.push_back(s);
    }
    std::sort(v.begin(), v.end(),
              [](const Memslot& a, const Memslot& b) { return a.base_gfn < b.base_gfn; });
    return v;
  }
};

uint16_t id_or(const Memslot* s, uint16_t none = 0xffff) { return s ? s->id : none; }

// One random call: mostly well-formed (to reach the deep rows), sometimes a modification of an
// existing slot (MOVE, FLAGS_ONLY, no-op, or a forbidden change), sometimes garbage.
UserspaceMemoryRegion gen_region(const Oracle& oracle) {
  UserspaceMemoryRegion r;
  const int kind = *rc::gen::inRange(0, 10);
  if (kind < 4 && !oracle.slots.empty()) {
    const size_t pick = *rc::gen::inRange<size_t>(0, oracle.slots.size());
    const Memslot& s = std::next(oracle.slots.begin(), static_cast<ptrdiff_t>(pick))->second;
    r.slot = (uint32_t{s.as_id} << 16) | s.id;
    r.guest_phys_addr = s.base_gfn.value * kPageSize;
    r.memory_size = s.npages * kPageSize;
    r.userspace_addr = s.userspace_addr.value;
    r.flags = s.flags;
    switch (kind) {
      case 0: r.guest_phys_addr = *rc::gen::inRange<uint64_t>(0, kGfnSpace) * kPageSize; break;
      case 1: r.flags ^= kMemLogDirtyPages; break;
      case 2: r.memory_size = 0; break;
      default: break;  // identical: the no-op
    }
    if (*rc::gen::inRange(0, 8) == 0) {  // occasionally a forbidden modification
      switch (*rc::gen::inRange(0, 3)) {
        case 0: r.flags ^= kMemReadonly; break;
        case 1: r.userspace_addr += kPageSize; break;
        default: r.memory_size += kPageSize; break;
      }
    }
    return r;
  }
  const uint32_t id = *rc::gen::inRange<uint32_t>(0, kUserSlots + 2);
  const uint32_t as = *rc::gen::inRange<uint32_t>(0, 3);
  r.slot = (as << 16) | id;
  r.guest_phys_addr = *rc::gen::inRange<uint64_t>(0, kGfnSpace) * kPageSize;
  r.memory_size = *rc::gen::inRange<uint64_t>(0, 13) * kPageSize;
  if (*rc::gen::inRange(0, 20) == 0) r.memory_size += 0x800;
  r.userspace_addr = kHvaBase + *rc::gen::inRange<uint64_t>(0, kHvaSpace) * kPageSize;
  r.flags = *rc::gen::element(0u, kMemLogDirtyPages, kMemReadonly,
                              kMemLogDirtyPages | kMemReadonly, kMemGuestMemfd);
  return r;
}

void check_against_oracle(const Memslots& slots, const Oracle& oracle,
                          std::vector<VcpuMemslotCache>& caches) {
  RC_ASSERT(slots.nr_memslot_pages() == oracle.total_pages);
  auto lock = slots.read_lock();
  for (unsigned as = 0; as < oracle.nr_as; ++as) {
    const MemslotSet& set = lock.set(as);
    RC_ASSERT(set.as_id() == as);
    // Slot table equal; invariant 20: sorted and pairwise disjoint.
    const std::vector<Memslot> want = oracle.of(as);
    RC_ASSERT(std::vector<Memslot>(set.slots().begin(), set.slots().end()) == want);
    for (size_t i = 1; i < want.size(); ++i) RC_ASSERT(want[i - 1].end_gfn() <= want[i].base_gfn);
    for (uint16_t id = 0; id < kUserSlots + 2; ++id) {
      auto it = oracle.slots.find({as, id});
      const Memslot* got = set.id_to_memslot(id);
      RC_ASSERT((got == nullptr) == (it == oracle.slots.end()));
      if (got) RC_ASSERT(*got == it->second);
    }
    // Every gfn: search, VM-wide cache, per-vCPU cache (shared across address spaces, as a vCPU
    // switching in and out of SMM would), approx, visibility. Caches never change the answer.
    for (uint64_t g = 0; g < kGfnSpace + 16; ++g) {
      const Gfn gfn(g);
      const uint16_t want_id = id_or(oracle.find(as, gfn));
      RC_ASSERT(id_or(set.search_memslots(gfn)) == want_id);
      RC_ASSERT(id_or(set.gfn_to_memslot(gfn)) == want_id);
      for (VcpuMemslotCache& cache : caches) {
        const Memslot* v = set.vcpu_gfn_to_memslot(cache, gfn);
        RC_ASSERT(id_or(v) == want_id);
        if (v) RC_ASSERT(v->as_id == as);
      }
      RC_ASSERT(set.is_visible_gfn(gfn) == (want_id != 0xffff));
      const Memslot* approx = set.search_memslots(gfn, true);
      if (want_id != 0xffff) {
        RC_ASSERT(id_or(approx) == want_id);
      } else if (want.empty()) {
        RC_ASSERT(approx == nullptr);
      } else {
        // A neighbour of the hole: the last slot below gfn or the first one above it.
        const Memslot* below = nullptr;
        const Memslot* above = nullptr;
        for (const Memslot& s : want) {
          if (s.base_gfn <= gfn) below = &s;
          if (s.base_gfn > gfn && !above) above = &s;
        }
        RC_ASSERT(approx != nullptr);
        RC_ASSERT(approx->id == id_or(below) || approx->id == id_or(above));
      }
    }
    // hva overlap: random ranges against a scan; each slot once.
    for (int q = 0; q < 8; ++q) {
      const uint64_t a = kHvaBase + *rc::gen::inRange<uint64_t>(0, (kHvaSpace + 16) * 4) * 1024;
      const uint64_t b = a + *rc::gen::inRange<uint64_t>(0, 24 * kPageSize);
      std::vector<uint16_t> got;
      set.for_each_hva_overlap(Hva(a), Hva(b), [&](const Memslot& s) { got.push_back(s.id); });
      std::vector<uint16_t> naive;
      for (const Memslot& s : want) {
        if (a < b && s.userspace_addr.value < b && s.hva_end().value > a) naive.push_back(s.id);
      }
      std::sort(got.begin(), got.end());
      std::sort(naive.begin(), naive.end());
      RC_ASSERT(got == naive);
    }
  }
}

RC_GTEST_PROP(MemslotProperty, Invariant20_21_22_RandomCallsMatchNaiveOracle, ()) {
  MemslotsConfig config;
  config.nr_address_spaces = *rc::gen::inRange(1u, 3u);
  config.nr_user_slots = kUserSlots;
  Memslots slots(config);
  Oracle oracle;
  oracle.nr_as = config.nr_address_spaces;
  std::vector<VcpuMemslotCache> caches(2);
  std::vector<uint64_t> gens(config.nr_address_spaces);
  for (unsigned as = 0; as < config.nr_address_spaces; ++as) {
    gens[as] = slots.generation(as);
    RC_ASSERT(gens[as] == as);
  }

  const int steps = *rc::gen::inRange(1, 40);
  for (int step = 0; step < steps; ++step) {
    const UserspaceMemoryRegion r = gen_region(oracle);
    const auto [want_code, want_change] = oracle.apply(r);
    auto got = slots.set_memory_region(r);
    RC_ASSERT(got.code() == want_code);
    if (got.ok()) {
      RC_ASSERT(*got == want_change);
    } else {
      RC_ASSERT(!got.error().message.empty());
    }
    // Invariant 22: a change moves its AS's generation forward (by nr_as per swap), nothing
    // else does; never bit 63 outside a swap; gen % nr_as == as_id.
    for (unsigned as = 0; as < config.nr_address_spaces; ++as) {
      const uint64_t g = slots.generation(as);
      RC_ASSERT((g & kMemslotGenUpdateInProgress) == 0u);
      RC_ASSERT(g % config.nr_address_spaces == as);
      const bool changed = got.ok() && want_change && (r.slot >> 16) == as;
      if (changed) {
        const uint64_t swaps = (*want_change == MemslotChange::kMove ||
                                *want_change == MemslotChange::kDelete) ? 2 : 1;
        RC_ASSERT(g == gens[as] + swaps * config.nr_address_spaces);
      } else {
        RC_ASSERT(g == gens[as]);
      }
      gens[as] = g;
    }
    check_against_oracle(slots, oracle, caches);
  }
}

}  // namespace
}  // namespace gfnmap
