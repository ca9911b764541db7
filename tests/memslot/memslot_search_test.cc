// gfnmap memslot tests: the gfn search tree (spec 7.2) at every depth it can have, against a
// sorted-sweep oracle: search_memslots (exact and approx), both caches, visibility, and the
// writer's own searches (insert position, overlap check) through set_memory_region.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "memslot/memslot_test_util.h"
#include "memslot/test_peer.h"

namespace gfnmap {
namespace {

using test::kHvaBase;
using test::region;

// Slots of 1..4 pages with holes of 0..3 pages (0: adjacent slots), ids shuffled so that the
// id order differs from the gfn order.
std::vector<Memslot> random_layout(size_t n, uint64_t first_gfn, std::mt19937_64& rng) {
  std::vector<uint16_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = static_cast<uint16_t>(i);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<Memslot> out;
  uint64_t gfn = first_gfn;
  for (size_t i = 0; i < n; ++i) {
    Memslot m;
    m.id = ids[i];
    gfn += rng() % 4;
    m.base_gfn = Gfn(gfn);
    m.npages = 1 + rng() % 4;
    m.userspace_addr = Hva(kHvaBase + i * 4 * kPageSize);
    gfn += m.npages;
    out.push_back(m);
  }
  return out;
}

// Every gfn from 0 to two past the last slot, plus the top of the gfn space, checked against
// the sorted slots `want` by a sweep. Lookups run in a shuffled order too, so the VM-wide and
// per-vCPU caches hold some other slot when a gfn is looked up.
void expect_lookups_match(const MemslotSet& set, const std::vector<Memslot>& want,
                          std::mt19937_64& rng) {
  ASSERT_EQ(set.size(), want.size());
  const uint64_t top = want.empty() ? 4 : want.back().end_gfn().value + 2;
  std::vector<uint64_t> gfns;
  for (uint64_t g = 0; g <= top; ++g) gfns.push_back(g);
  std::vector<const Memslot*> expected(gfns.size(), nullptr);
  size_t next = 0;  // the first slot whose end is above g
  for (uint64_t g = 0; g <= top; ++g) {
    while (next < want.size() && want[next].end_gfn().value <= g) ++next;
    if (next < want.size() && want[next].contains(Gfn(g))) {
      expected[g] = set.id_to_memslot(want[next].id);
    }
  }
  for (uint64_t g : {~uint64_t{0}, ~uint64_t{0} - 1, uint64_t{1} << 52}) {
    gfns.push_back(g);
    expected.push_back(nullptr);
  }
  std::vector<size_t> order(gfns.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);

  VcpuMemslotCache cache;
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t j = 0; j < gfns.size(); ++j) {
      const size_t i = pass == 0 ? j : order[j];
      const Gfn gfn(gfns[i]);
      const Memslot* want_slot = expected[i];
      ASSERT_EQ(set.search_memslots(gfn), want_slot) << "gfn " << gfn.value;
      ASSERT_EQ(set.gfn_to_memslot(gfn), want_slot) << "gfn " << gfn.value;
      ASSERT_EQ(set.vcpu_gfn_to_memslot(cache, gfn), want_slot) << "gfn " << gfn.value;
      ASSERT_EQ(set.is_visible_gfn(gfn), want_slot != nullptr) << "gfn " << gfn.value;
      const Memslot* approx = set.search_memslots(gfn, true);
      if (want_slot) {
        ASSERT_EQ(approx, want_slot);
      } else if (want.empty()) {
        ASSERT_EQ(approx, nullptr);
      } else {
        // A neighbour of the hole: the last slot starting below gfn or the first above it.
        ASSERT_NE(approx, nullptr) << "gfn " << gfn.value;
        auto above = std::upper_bound(want.begin(), want.end(), gfn,
                                      [](Gfn g, const Memslot& m) { return g < m.base_gfn; });
        const bool is_below = above != want.begin() && approx->id == std::prev(above)->id;
        const bool is_above = above != want.end() && approx->id == above->id;
        ASSERT_TRUE(is_below || is_above) << "gfn " << gfn.value << " approx " << approx->id;
      }
    }
  }
}

// Sizes on both sides of every tree depth up to 10 (the tree holds n - 1 bases: depth d holds
// up to 2^d - 1), plus the benchmark's sizes.
std::vector<size_t> sizes_around_depths() {
  std::vector<size_t> sizes = {0, 1, 2, 3};
  for (size_t p = 4; p <= 1024; p *= 2) {
    for (size_t n : {p - 1, p, p + 1}) sizes.push_back(n);
  }
  sizes.push_back(16);
  sizes.push_back(512);
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

TEST(MemslotSearch, EveryGfnMatchesASweepAtEveryTreeDepth) {
  std::mt19937_64 rng(20240607);
  for (size_t n : sizes_around_depths()) {
    for (uint64_t first : {uint64_t{0}, uint64_t{5}}) {
      SCOPED_TRACE(testing::Message() << n << " slots from gfn " << first);
      Memslots slots;
      const std::vector<Memslot> layout = random_layout(n, first, rng);
      detail::MemslotsTestPeer::bulk_insert(slots, 0, layout);
      auto lock = slots.read_lock();
      expect_lookups_match(lock.set(), layout, rng);
      if (HasFatalFailure()) return;
    }
  }
}

// Through set_memory_region: creates in random order (the insert position is the writer's
// search), overlapping creates refused with EEXIST (its overlap check is a search too), then
// deletes and moves; every set on the way is checked.
TEST(MemslotSearch, WriterSearchesKeepTheTreeRightThroughCreatesMovesAndDeletes) {
  std::mt19937_64 rng(7);
  for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{33}, size_t{130}}) {
    SCOPED_TRACE(testing::Message() << n << " slots");
    Memslots slots;
    std::vector<Memslot> layout = random_layout(n, 3, rng);
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<Memslot> present;
    for (size_t i : order) {
      const Memslot& m = layout[i];
      ASSERT_MEMSLOT_OK(slots.set_memory_region(region(m.id, m.base_gfn.value * kPageSize,
                                                       m.npages * kPageSize,
                                                       m.userspace_addr.value)),
                        MemslotChange::kCreate);
      present.insert(std::upper_bound(present.begin(), present.end(), m,
                                      [](const Memslot& a, const Memslot& b) {
                                        return a.base_gfn < b.base_gfn;
                                      }),
                     m);
      // A one-page create on the new slot's last page, or just past it, with a fresh id.
      const uint64_t probe = m.end_gfn().value - 1 + rng() % 2;
      const bool taken = std::any_of(present.begin(), present.end(), [&](const Memslot& s) {
        return s.contains(Gfn(probe));
      });
      auto r = slots.set_memory_region(region(4000, probe * kPageSize, kPageSize));
      if (taken) {
        ASSERT_FALSE(r.ok());
        ASSERT_EQ(r.code(), EEXIST);
      } else {
        ASSERT_TRUE(r.ok()) << error_to_string(r.error());
        ASSERT_TRUE(slots.set_memory_region(region(4000, probe * kPageSize, 0)).ok());
      }
    }
    {
      auto lock = slots.read_lock();
      expect_lookups_match(lock.set(), present, rng);
      if (HasFatalFailure()) return;
    }
    // Move every other slot far above the rest (keeping its order), delete the others.
    const uint64_t far = present.back().end_gfn().value + 100;
    std::vector<Memslot> after;
    for (size_t i = 0; i < present.size(); ++i) {
      Memslot m = present[i];
      if (i % 2 == 0) {
        m.base_gfn = Gfn(far + m.base_gfn.value);
        ASSERT_MEMSLOT_OK(slots.set_memory_region(region(m.id, m.base_gfn.value * kPageSize,
                                                         m.npages * kPageSize,
                                                         m.userspace_addr.value)),
                          MemslotChange::kMove);
        after.push_back(m);
      } else {
        ASSERT_MEMSLOT_OK(slots.set_memory_region(region(m.id, 0, 0)), MemslotChange::kDelete);
      }
    }
    auto lock = slots.read_lock();
    expect_lookups_match(lock.set(), after, rng);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace gfnmap
