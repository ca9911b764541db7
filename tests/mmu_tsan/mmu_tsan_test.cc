// gfnmap MMU concurrency tests (run under ThreadSanitizer): invariants 16-18 and 23 while
// faults, invalidations, memslot moves/deletes and dirty-log harvests race (a few seconds each).
#include <gtest/gtest.h>

#include "mmu_tsan/stress_scenario.h"

namespace gfnmap::test {
namespace {

TEST(MmuTsan, Invariant16_17_18_23_FaultsRaceInvalidationsMovesDeletesHarvests) {
  StressParams p;
  p.duration_ms = 1500;
  p.nr_vcpus = 2;
  p.pages_per_slot = 64;
  StressScenario scenario(p);
  StressResult r = scenario.run();
  EXPECT_GT(r.writes, 0u);
  EXPECT_GT(r.invalidations, 0u);
  EXPECT_GT(r.moves + r.deletes, 0u);
  EXPECT_GT(r.harvests, 0u);
  std::printf("writes %llu mmio %llu invalidations %llu moves %llu deletes %llu harvests %llu\n",
              static_cast<unsigned long long>(r.writes),
              static_cast<unsigned long long>(r.mmio_exits),
              static_cast<unsigned long long>(r.invalidations),
              static_cast<unsigned long long>(r.moves),
              static_cast<unsigned long long>(r.deletes),
              static_cast<unsigned long long>(r.harvests));
}

// The same race with the vCPUs in guest mode (one access window for the whole run): every
// flush must kick them out of it, or a write through a zapped or retired table is lost or lands
// in a freed page.
TEST(MmuTsan, Invariant16_17_18_23_GuestModeRacesInvalidationsMovesDeletesHarvests) {
  StressParams p;  // 2 vCPUs, 64 pages per slot
  p.duration_ms = 1000;
  p.guest_mode = true;
  StressResult r = StressScenario(p).run();
  EXPECT_GT(r.writes, 0u);
  EXPECT_GT(r.invalidations, 0u);
  EXPECT_GT(r.moves + r.deletes, 0u);
  EXPECT_GT(r.harvests, 0u);
}

// The same race with the PTE prefetch on: leaves installed for neighbours (slot 3 does not log
// dirty pages, so its faults prefetch) must be zapped by invalidations like any other, and no
// write through one may be lost.
TEST(MmuTsan, Invariant16_17_18_23_PtePrefetchRacesInvalidationsMovesDeletes) {
  StressParams p;
  p.duration_ms = 1000;
  p.nr_vcpus = 2;
  p.pages_per_slot = 64;
  p.pte_prefetch = true;
  // Only the non-logging slot prefetches, and only while no invalidation is in progress: with
  // the invalidating thread never pausing, a 2-core machine under TSan can go a whole run
  // without such a window (CI did, five runs in a row). A 50 us gap between invalidations
  // leaves windows while keeping thousands of invalidations per run; a run that still ends
  // before the first prefetch is repeated (each checks every invariant itself), at most five.
  p.invalidation_gap_us = 50;
  StressResult total;
  for (int run = 0; run < 5 && total.pte_prefetches == 0; ++run) {
    StressResult r = StressScenario(p).run();
    total.writes += r.writes;
    total.invalidations += r.invalidations;
    total.pte_prefetches += r.pte_prefetches;
  }
  EXPECT_GT(total.writes, 0u);
  EXPECT_GT(total.invalidations, 0u);
  EXPECT_GT(total.pte_prefetches, 0u) << "five runs never exercised the prefetch";
}

}  // namespace
}  // namespace gfnmap::test
