// gfnmap MMU soak (label slow): the tsan stress scenario for a minute, more vCPUs, more pages.
// Run with `make soak` or `ctest -L slow`.
#include <gtest/gtest.h>

#include <cstdlib>

#include "mmu_tsan/stress_scenario.h"

namespace gfnmap::test {
namespace {

TEST(MmuSoak, Invariant16_17_18_23_LongRace) {
  StressParams p;
  p.duration_ms = 60000;
  if (const char* ms = std::getenv("GFNMAP_SOAK_MS")) p.duration_ms = static_cast<unsigned>(std::atoi(ms));
  p.nr_vcpus = 4;
  p.pages_per_slot = 512;
  StressScenario scenario(p);
  StressResult r = scenario.run();
  EXPECT_GT(r.writes, 0u);
  EXPECT_GT(r.invalidations, 0u);
}

}  // namespace
}  // namespace gfnmap::test
