// gfnmap tests, host: the setup example of docs/host-model.md, compiled and checked, so the page
// stays true. Run with --gtest_filter='DocExample.*' to see describe() and dump() output.
#include <cstdio>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

TEST(DocExample, SetupApiAtAGlance) {
  SimHost host;  // or SimHost(SimHostConfig{...})
  Hva anon = *host.mmap(16 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(host.populate(anon, kPageSize, /*write=*/true));  // MADV_POPULATE_WRITE
  ASSERT_TRUE(host.make_cow_shared(anon + kPageSize));  // simulated fork: read-only, CoW
  ASSERT_TRUE(host.poison(anon + 2 * kPageSize));         // memory_failure()
  host.set_signal(SignalState::kPending);

  MmapOptions dev;  // device memory, PTEs installed by fixup
  dev.pfnmap_backing = PfnmapBacking::kRefcountZero;
  dev.ptes_present = false;
  Hva bar = *host.mmap(4 * kPageSize, kProtRW, VmaKind::kPfnmap, dev);

  FixupInjection drop;  // row 19: the VMA changes while unlocked
  drop.drop_lock_times = 1;
  drop.while_unlocked = [bar](SimHost& h) { ASSERT_TRUE(h.munmap(bar, 4 * kPageSize)); };
  ASSERT_TRUE(host.inject_fixup(bar, std::move(drop)));

  std::printf("%s", host.describe(anon + kPageSize).c_str());
  std::printf("%s", host.dump().c_str());

  EXPECT_EQ(anon, Hva(0x7f0000000000));
  EXPECT_EQ(host.describe(anon + kPageSize),
            "hva 0x7f0000001000\n"
            "  vma [0x7f0000000000, 0x7f0000010000) anon-private rw- 4k\n"
            "  pte present pfn 0x1002 read-only cow-shared young dirty\n"
            "  frame 0x1002: anon refcount 2 held 0 refs 0 pins\n"
            "  host mapping level 4K\n"
            "  signal pending\n");
  // The injected lock drop runs the callback: the device VMA is gone afterwards.
  host.mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(host.fixup_user_fault(bar, false, &unlocked), -EFAULT);
  EXPECT_TRUE(unlocked);
  EXPECT_FALSE(host.vma_lookup(bar));
  host.mmap_read_unlock();
  EXPECT_EQ(host.violations(), 0u);
}

}  // namespace
}  // namespace gfnmap
