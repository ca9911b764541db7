// gfnmap memslot tests: lookups (spec 7.2: search, approx, VM-wide and per-vCPU caches, id,
// visibility, hva overlap) and the gfn -> hva rules (spec 3.1 step 1, 5).
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

using test::kHvaBase;
using test::region;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kPagesPerMiB = kMiB / kPageSize;

// Three slots with holes between them: gfns [0x100, 0x200), [0x300, 0x400), [0x400, 0x500).
class MemslotLookup : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_MEMSLOT_OK(slots_.set_memory_region(region(7, 1 * kMiB, kMiB, kHvaBase)),
                      MemslotChange::kCreate);
    ASSERT_MEMSLOT_OK(slots_.set_memory_region(region(2, 3 * kMiB, kMiB, kHvaBase + kMiB)),
                      MemslotChange::kCreate);
    ASSERT_MEMSLOT_OK(
        slots_.set_memory_region(region(5, 4 * kMiB, kMiB, kHvaBase + 2 * kMiB, kMemReadonly)),
        MemslotChange::kCreate);
  }
  Memslots slots_;
};

TEST_F(MemslotLookup, SearchFindsTheSlotHoldingGfnOrNothing) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  ASSERT_EQ(set.size(), 3u);
  EXPECT_EQ(set.search_memslots(Gfn(0x100))->id, 7);
  EXPECT_EQ(set.search_memslots(Gfn(0x1ff))->id, 7);
  EXPECT_EQ(set.search_memslots(Gfn(0x200)), nullptr);  // end is exclusive
  EXPECT_EQ(set.search_memslots(Gfn(0x0ff)), nullptr);
  EXPECT_EQ(set.search_memslots(Gfn(0x3ff))->id, 2);
  EXPECT_EQ(set.search_memslots(Gfn(0x400))->id, 5);  // adjacent slots
  EXPECT_EQ(set.search_memslots(Gfn(0x500)), nullptr);
  EXPECT_EQ(set.search_memslots(Gfn(~uint64_t{0})), nullptr);
  // slots() is sorted by base gfn.
  ASSERT_TRUE(std::is_sorted(set.slots().begin(), set.slots().end(),
                             [](const Memslot& a, const Memslot& b) {
                               return a.base_gfn < b.base_gfn;
                             }));
}

TEST_F(MemslotLookup, SearchApproxReturnsANeighbourOfTheHole) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  EXPECT_EQ(set.search_memslots(Gfn(0x150), true)->id, 7);  // a hit is a hit
  EXPECT_EQ(set.search_memslots(Gfn(0x0), true)->id, 7);    // below everything: the first
  const Memslot* mid = set.search_memslots(Gfn(0x250), true);
  ASSERT_NE(mid, nullptr);
  EXPECT_TRUE(mid->id == 7 || mid->id == 2) << mid->id;  // either side of the hole
  EXPECT_EQ(set.search_memslots(Gfn(0x9999), true)->id, 5);  // above everything: the last
  Memslots empty;
  auto elock = empty.read_lock();
  EXPECT_EQ(elock.set().search_memslots(Gfn(0), true), nullptr);
}

TEST_F(MemslotLookup, IdToMemslot) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  EXPECT_EQ(set.id_to_memslot(7)->base_gfn, Gfn(0x100));
  EXPECT_EQ(set.id_to_memslot(5)->flags, kMemReadonly);
  EXPECT_EQ(set.id_to_memslot(0), nullptr);
  EXPECT_EQ(set.id_to_memslot(6), nullptr);
  EXPECT_EQ(set.id_to_memslot(0xffff), nullptr);
}

TEST_F(MemslotLookup, Invariant20_VmWideLastUsedCacheNeverChangesTheAnswer) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  // Alternate between slots and holes so that the cache holds a slot the next gfn is not in.
  for (uint64_t gfn : {0x150, 0x250, 0x160, 0x350, 0x450, 0x100, 0x1ff, 0x200, 0x3ff, 0x400,
                       0x400, 0x0, 0x4ff, 0x500}) {
    EXPECT_EQ(set.gfn_to_memslot(Gfn(gfn)), set.search_memslots(Gfn(gfn))) << std::hex << gfn;
  }
}

TEST_F(MemslotLookup, Invariant20_VcpuCacheNeverChangesTheAnswerAndIsDroppedByGeneration) {
  VcpuMemslotCache cache;
  {
    auto lock = slots_.read_lock();
    const MemslotSet& set = lock.set();
    EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(0x150))->id, 7);
    EXPECT_EQ(cache.generation, set.generation());
    EXPECT_EQ(cache.slot->id, 7);
    EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(0x350))->id, 2);  // miss, replaces the entry
    EXPECT_EQ(cache.slot->id, 2);
    EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(0x250)), nullptr);  // hole: entry kept
    EXPECT_EQ(cache.slot->id, 2);
  }
  // Move slot 2 away: the cached generation is stale, so gfn 0x350 is no longer found.
  ASSERT_MEMSLOT_OK(slots_.set_memory_region(region(2, 16 * kMiB, kMiB, kHvaBase + kMiB)),
                    MemslotChange::kMove);
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  EXPECT_NE(cache.generation, set.generation());
  EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(0x350)), nullptr);
  EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(16 * kPagesPerMiB))->id, 2);
  EXPECT_EQ(cache.generation, set.generation());
}

TEST_F(MemslotLookup, VcpuCacheLeavesTheVmWideCacheAlone) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  EXPECT_EQ(set.gfn_to_memslot(Gfn(0x150))->id, 7);  // VM-wide cache: slot 7
  VcpuMemslotCache cache;
  EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, Gfn(0x450))->id, 5);
  // Not observable through the answer (invariant 20), but the VM-wide entry is still slot 7:
  // a lookup in slot 7 and one elsewhere both stay correct.
  EXPECT_EQ(set.gfn_to_memslot(Gfn(0x151))->id, 7);
  EXPECT_EQ(set.gfn_to_memslot(Gfn(0x451))->id, 5);
}

TEST(MemslotLookupAs, VcpuCacheIsPerAddressSpaceThroughGenerations) {
  MemslotsConfig config;
  config.nr_address_spaces = 2;
  Memslots slots(config);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, 0, 0)),
                    MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase + kMiB, 0, 1)),
                    MemslotChange::kCreate);
  auto lock = slots.read_lock();
  VcpuMemslotCache cache;
  const Memslot* a = lock.set(0).vcpu_gfn_to_memslot(cache, Gfn(3));
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->as_id, 0);
  // Same cache, other address space (an SMM switch): the generations differ, so the AS-0 slot
  // is not returned.
  EXPECT_NE(lock.set(0).generation(), lock.set(1).generation());
  const Memslot* b = lock.set(1).vcpu_gfn_to_memslot(cache, Gfn(3));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->as_id, 1);
  EXPECT_EQ(gfn_to_hva_memslot(b, Gfn(3)), Hva(kHvaBase + kMiB + 3 * kPageSize));
}

TEST_F(MemslotLookup, IsVisibleGfn) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  EXPECT_TRUE(set.is_visible_gfn(Gfn(0x100)));
  EXPECT_TRUE(set.is_visible_gfn(Gfn(0x4ff)));  // READONLY slots are visible
  EXPECT_FALSE(set.is_visible_gfn(Gfn(0x200)));
  EXPECT_FALSE(set.is_visible_gfn(Gfn(0x500)));
}

// Collects the ids for_each_hva_overlap reports (each must come once).
std::vector<uint16_t> overlap_ids(const MemslotSet& set, uint64_t start, uint64_t end) {
  std::vector<uint16_t> ids;
  set.for_each_hva_overlap(Hva(start), Hva(end), [&](const Memslot& s) { ids.push_back(s.id); });
  std::sort(ids.begin(), ids.end());
  return ids;
}

TEST_F(MemslotLookup, HvaOverlapDisjointSlots) {
  auto lock = slots_.read_lock();
  const MemslotSet& set = lock.set();
  using V = std::vector<uint16_t>;
  EXPECT_EQ(overlap_ids(set, kHvaBase, kHvaBase + 1), V{7});
  EXPECT_EQ(overlap_ids(set, kHvaBase + kMiB - 1, kHvaBase + kMiB + 1), (V{2, 7}));
  EXPECT_EQ(overlap_ids(set, kHvaBase + kMiB, kHvaBase + 2 * kMiB), V{2});  // half-open
  EXPECT_EQ(overlap_ids(set, 0, ~uint64_t{0}), (V{2, 5, 7}));
  EXPECT_EQ(overlap_ids(set, kHvaBase + 3 * kMiB, kHvaBase + 4 * kMiB), V{});
  EXPECT_EQ(overlap_ids(set, 0, kHvaBase), V{});
  EXPECT_EQ(overlap_ids(set, kHvaBase + 5, kHvaBase + 5), V{});  // empty range
  EXPECT_EQ(overlap_ids(set, kHvaBase + 9, kHvaBase + 5), V{});  // reversed range
}

TEST(MemslotHvaOverlap, SlotsSharingHostMemoryAreEachReportedOnce) {
  // Several slots alias the same host memory (as in mmu_stress_test: many slots over one memfd),
  // nested and staggered, so the index needs its interval tree.
  Memslots slots;
  const uint64_t b = kHvaBase;
  struct S {
    uint32_t id;
    uint64_t hva;
    uint64_t pages;
  };
  const std::vector<S> layout = {{0, b, 256},           {1, b, 256},
                                 {2, b + kMiB / 2, 64}, {3, b + kMiB / 4, 512},
                                 {4, b + 4 * kMiB, 16}, {5, b + 4 * kMiB + 8 * kPageSize, 16},
                                 {6, b, 1},             {7, b + 8 * kMiB, 256}};
  uint64_t gpa = 0;
  for (const S& s : layout) {
    ASSERT_MEMSLOT_OK(slots.set_memory_region(region(s.id, gpa, s.pages * kPageSize, s.hva)),
                      MemslotChange::kCreate);
    gpa += 4 * kMiB;
  }
  auto lock = slots.read_lock();
  const MemslotSet& set = lock.set();
  // Oracle: a linear scan over every slot.
  auto naive = [&](uint64_t qs, uint64_t qe) {
    std::vector<uint16_t> ids;
    if (qs >= qe) return ids;
    for (const Memslot& m : set.slots()) {
      if (m.userspace_addr.value < qe && m.hva_end().value > qs) ids.push_back(m.id);
    }
    std::sort(ids.begin(), ids.end());
    return ids;
  };
  std::vector<uint64_t> points = {0, b - 1, b, b + 1};
  for (const Memslot& m : set.slots()) {
    for (uint64_t p : {m.userspace_addr.value, m.hva_end().value}) {
      points.push_back(p - 1);
      points.push_back(p);
      points.push_back(p + 1);
    }
  }
  for (uint64_t qs : points) {
    for (uint64_t qe : points) {
      ASSERT_EQ(overlap_ids(set, qs, qe), naive(qs, qe)) << std::hex << qs << ".." << qe;
    }
  }
  using V = std::vector<uint16_t>;
  EXPECT_EQ(overlap_ids(set, b, b + 1), (V{0, 1, 6}));  // slot 3 starts at b + 256K
  EXPECT_EQ(overlap_ids(set, b + kMiB / 2, b + kMiB / 2 + 1), (V{0, 1, 2, 3}));
}

// ---------------------------------------------------------------------------------------------
// gfn -> hva (spec 3.1 step 1, 5).

TEST(MemslotGfnToHva, NullOrInvalidSlotGivesHvaErrBad) {
  EXPECT_EQ(gfn_to_hva_many(nullptr, Gfn(0), nullptr, false), kHvaErrBad);
  EXPECT_EQ(gfn_to_hva_memslot(nullptr, Gfn(0)), kHvaErrBad);
  bool writable = true;
  EXPECT_EQ(gfn_to_hva_memslot_prot(nullptr, Gfn(0), &writable), kHvaErrBad);
  EXPECT_TRUE(writable) << "*writable is written only on success";
  Memslot invalid{.id = 1, .as_id = 0, .base_gfn = Gfn(0x10), .npages = 4,
                  .userspace_addr = Hva(kHvaBase), .flags = kMemslotInvalid};
  EXPECT_EQ(gfn_to_hva_many(&invalid, Gfn(0x11), nullptr, false), kHvaErrBad);
  EXPECT_EQ(gfn_to_hva_memslot(&invalid, Gfn(0x11)), kHvaErrBad);
  EXPECT_EQ(gfn_to_hva_memslot_prot(&invalid, Gfn(0x11), &writable), kHvaErrBad);
  invalid.flags |= kMemReadonly;  // INVALID wins over READONLY: BAD, not RO_BAD
  EXPECT_EQ(gfn_to_hva_memslot(&invalid, Gfn(0x11)), kHvaErrBad);
  EXPECT_TRUE(kvm_is_error_hva(kHvaErrBad));
}

TEST(MemslotGfnToHva, WriteToReadonlySlotGivesRoBadReadSucceeds) {
  const Memslot ro{.id = 1, .as_id = 0, .base_gfn = Gfn(0x10), .npages = 4,
                   .userspace_addr = Hva(kHvaBase), .flags = kMemReadonly};
  EXPECT_EQ(gfn_to_hva_many(&ro, Gfn(0x12), nullptr, true), kHvaErrRoBad);
  EXPECT_EQ(gfn_to_hva_memslot(&ro, Gfn(0x12)), kHvaErrRoBad);
  EXPECT_TRUE(kvm_is_error_hva(kHvaErrRoBad));
  EXPECT_EQ(gfn_to_hva_many(&ro, Gfn(0x12), nullptr, false), Hva(kHvaBase + 2 * kPageSize));
  bool writable = true;
  EXPECT_EQ(gfn_to_hva_memslot_prot(&ro, Gfn(0x12), &writable), Hva(kHvaBase + 2 * kPageSize));
  EXPECT_FALSE(writable);
  EXPECT_EQ(gfn_to_hva_memslot_prot(&ro, Gfn(0x12), nullptr), Hva(kHvaBase + 2 * kPageSize));
}

TEST(MemslotGfnToHva, UsableSlotGivesHvaNrPagesAndWritable) {
  const Memslot rw{.id = 1, .as_id = 0, .base_gfn = Gfn(0x10), .npages = 4,
                   .userspace_addr = Hva(kHvaBase), .flags = kMemLogDirtyPages};
  uint64_t nr = 0;
  EXPECT_EQ(gfn_to_hva_many(&rw, Gfn(0x10), &nr, true), Hva(kHvaBase));
  EXPECT_EQ(nr, 4u);
  EXPECT_EQ(gfn_to_hva_many(&rw, Gfn(0x13), &nr, false), Hva(kHvaBase + 3 * kPageSize));
  EXPECT_EQ(nr, 1u);
  EXPECT_EQ(gfn_to_hva_memslot(&rw, Gfn(0x11)), Hva(kHvaBase + kPageSize));
  bool writable = false;
  EXPECT_EQ(gfn_to_hva_memslot_prot(&rw, Gfn(0x11), &writable), Hva(kHvaBase + kPageSize));
  EXPECT_TRUE(writable);
  // Error paths leave nr_pages alone.
  nr = 77;
  EXPECT_EQ(gfn_to_hva_many(nullptr, Gfn(0), &nr, false), kHvaErrBad);
  EXPECT_EQ(nr, 77u);
}

TEST(MemslotGfnToHva, GfnOutsideTheSlotIsClampedNeverBeyondIt) {
  // The precondition is broken; the result must still lie inside the slot (array_index_nospec).
  const Memslot rw{.id = 1, .as_id = 0, .base_gfn = Gfn(0x10), .npages = 4,
                   .userspace_addr = Hva(kHvaBase), .flags = 0};
  for (uint64_t gfn : {0x0ull, 0xfull, 0x14ull, 0x1000ull, ~0ull}) {
    uint64_t nr = 0;
    const Hva hva = gfn_to_hva_many(&rw, Gfn(gfn), &nr, false);
    EXPECT_GE(hva, rw.userspace_addr) << gfn;
    EXPECT_LT(hva, rw.hva_end()) << gfn;
    EXPECT_EQ(hva.value + nr * kPageSize, rw.hva_end().value) << gfn;
  }
}

}  // namespace
}  // namespace gfnmap
