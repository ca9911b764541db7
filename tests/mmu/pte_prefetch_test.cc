// gfnmap MMU tests: the PTE prefetch (MmuOptions::pte_prefetch, KVM's direct_pte_prefetch) over
// the host model: which neighbours it maps, with which bits, and when it must not run.
#include <gtest/gtest.h>

#include "mmu_fixture.h"

namespace gfnmap::test {
namespace {

constexpr uint64_t kPrefetchGpa = 0x100000000ULL;  // 4 GiB
const Gfn kG0(kPrefetchGpa >> kPageShift);

class PtePrefetchTest : public MmuTest {
 protected:
  void SetUp() override {
    MmuOptions o;
    o.pte_prefetch = true;
    make_mmu(o);
  }
  // 16 pages; `present` of them populated for write in the host (fast GUP finds them).
  Hva setup(std::initializer_list<unsigned> present, uint32_t flags = 0) {
    Hva hva = map(16 * kPageSize);
    for (unsigned i : present) {
      EXPECT_TRUE(host_.populate(hva + i * kPageSize, kPageSize, true).ok());
    }
    add_slot(0, kPrefetchGpa, 16 * kPageSize, hva, flags);
    return hva;
  }
  uint64_t mapped(unsigned first, unsigned end) {
    return mmu_->count_mapped(0, kG0 + first, kG0 + end);
  }
};

TEST_F(PtePrefetchTest, FillsPresentNeighboursOfTheAlignedGroupWithoutAccessedBit) {
  Hva hva = setup({0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kPrefetchGpa + 3 * kPageSize), 42).ok());
  EXPECT_EQ(mapped(0, 8), 8u) << "the group of kPtePrefetchNum around the fault";
  EXPECT_EQ(mapped(8, 16), 0u) << "never outside the group";
  MmuStats s = mmu_->stats();
  EXPECT_EQ(s.installs, 1u);
  EXPECT_EQ(s.pte_prefetches, 7u);
  EXPECT_EQ(balance_gap(), 0u) << "prefetched leaves are not fault outcomes";
  const uint64_t faulted = mmu_->lookup(0, kG0 + 3).spte;
  EXPECT_TRUE(faulted & spte::kAccessed);
  EXPECT_TRUE(faulted & spte::kDirty);
  for (unsigned i : {0u, 1u, 2u, 4u, 5u, 6u, 7u}) {
    Mmu::Leaf leaf = mmu_->lookup(0, kG0 + i);
    ASSERT_TRUE(spte::is_leaf(leaf.spte)) << i;
    EXPECT_FALSE(leaf.spte & spte::kAccessed) << "prefetched, not accessed: " << i;
    EXPECT_FALSE(leaf.spte & spte::kDirty) << i;
    EXPECT_TRUE(leaf.spte & spte::kWritable) << "a write GUP found it: " << i;
    EXPECT_TRUE(leaf.spte & spte::kHostWritable) << i;
    EXPECT_TRUE(leaf.spte & spte::kRefcounted) << i;
    EXPECT_EQ(leaf.pfn, host_.pte(hva + i * kPageSize).pfn) << i;
  }
  // A prefetched page is used without a fault; the access sets its accessed/dirty bits.
  ASSERT_TRUE(v.write_u64(Gpa(kPrefetchGpa + 5 * kPageSize), 7).ok());
  EXPECT_EQ(mmu_->stats().faults, s.faults);
  const uint64_t e5 = mmu_->lookup(0, kG0 + 5).spte;
  EXPECT_TRUE((e5 & spte::kAccessed) && (e5 & spte::kDirty));
  uint64_t x = 0;
  std::memcpy(&x, host_.page_address(host_.pte(hva + 5 * kPageSize).pfn, hva + 5 * kPageSize), 8);
  EXPECT_EQ(x, 7u);
}

TEST_F(PtePrefetchTest, StopsAtTheFirstPageTheHostDoesNotHave) {
  setup({0, 1, 2, 6});
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa + 1 * kPageSize), 1).ok());
  // Runs [0,1) and [2,8): the fast-only GUP of a run stops at page 3, so page 6 stays unmapped.
  EXPECT_EQ(mapped(0, 8), 3u);
  EXPECT_FALSE(spte::is_leaf(mmu_->lookup(0, kG0 + 6).spte));
  EXPECT_EQ(mmu_->stats().pte_prefetches, 2u);
}

TEST_F(PtePrefetchTest, NeverOnAnEmptyHost) {
  setup({});
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa + 4 * kPageSize), 1).ok());
  EXPECT_EQ(mapped(0, 16), 1u) << "prefetch never faults pages in";
}

TEST_F(PtePrefetchTest, NotForSlotsLoggingDirtyPages) {
  setup({0, 1, 2, 3, 4, 5, 6, 7}, kMemLogDirtyPages);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa), 1).ok());
  EXPECT_EQ(mapped(0, 8), 1u) << "a prefetched writable leaf would miss the log";
}

TEST_F(PtePrefetchTest, NotForReadOnlySlots) {
  setup({0, 1, 2, 3, 4, 5, 6, 7}, kMemReadonly);
  uint64_t x = 0;
  ASSERT_TRUE(vcpu().read_u64(Gpa(kPrefetchGpa), &x).ok());
  EXPECT_EQ(mapped(0, 8), 1u) << "prefetch_pages wants a writable hva";
}

TEST_F(PtePrefetchTest, NotWhileAnInvalidationIsInProgress) {
  Hva hva = setup({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
  // An invalidation of pages 8..15 in progress: a fault on page 2 still installs, but the
  // prefetch stays off everywhere (it could map addresses being invalidated).
  mmu_->invalidate_range_start(hva + 8 * kPageSize, hva + 16 * kPageSize);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa + 2 * kPageSize), 1).ok());
  mmu_->invalidate_range_end(hva + 8 * kPageSize, hva + 16 * kPageSize);
  EXPECT_EQ(mapped(0, 16), 1u);
  EXPECT_EQ(mmu_->stats().pte_prefetches, 0u);
}

TEST_F(PtePrefetchTest, PrefetchedLeavesAreZappedByInvalidation) {
  Hva hva = setup({0, 1, 2, 3, 4, 5, 6, 7});
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa), 1).ok());
  ASSERT_EQ(mapped(0, 8), 8u);
  mmu_->invalidate_range_start(hva + 4 * kPageSize, hva + 8 * kPageSize);
  EXPECT_EQ(mapped(4, 8), 0u) << "no leaf survives invalidate_range_start";
  mmu_->invalidate_range_end(hva + 4 * kPageSize, hva + 8 * kPageSize);
  EXPECT_EQ(mapped(0, 4), 4u);
}

TEST_F(MmuTest, PtePrefetch_OffByDefault) {
  Hva hva = map(8 * kPageSize);
  ASSERT_TRUE(host_.populate(hva, 8 * kPageSize, true).ok());
  add_slot(0, kPrefetchGpa, 8 * kPageSize, hva);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kPrefetchGpa), 1).ok());
  EXPECT_EQ(mmu_->count_mapped(0, kG0, kG0 + 8), 1u);
  EXPECT_EQ(mmu_->stats().pte_prefetches, 0u);
}

}  // namespace
}  // namespace gfnmap::test
