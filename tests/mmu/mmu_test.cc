// gfnmap MMU tests over the host model: installs, the retry protocol (invariants 16, 17),
// release rules (18), aging (19), memslot windows, dirty logging (23), async PF (24), exits.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "gfnmap/async_pf.h"
#include "mmu_fixture.h"

namespace gfnmap::test {
namespace {

constexpr uint64_t kGpa = 0x100000000ULL;  // 4 GiB: 2M and 1G aligned

// ------------------------------------------------------------------------------- installs

TEST_F(MmuTest, Install_WriteFaultMapsHostPageWritable) {
  Hva hva = map(16 * kPageSize);
  add_slot(0, kGpa, 16 * kPageSize, hva);
  Vcpu& v = vcpu();
  auto data = bytes({1, 2, 3, 4});
  ASSERT_TRUE(v.write(Gpa(kGpa + 0x10), data).ok());
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  ASSERT_TRUE(spte::is_leaf(leaf.spte)) << spte::to_string(leaf.spte);
  EXPECT_TRUE(leaf.spte & spte::kWritable);
  EXPECT_TRUE(leaf.spte & spte::kHostWritable);
  EXPECT_TRUE(leaf.spte & spte::kAccessed);
  EXPECT_TRUE(leaf.spte & spte::kDirty);
  EXPECT_TRUE(leaf.spte & spte::kRefcounted);
  EXPECT_EQ(leaf.level, PgLevel::k4K);
  PteInfo pte = host_.pte(hva);
  ASSERT_EQ(pte.state, PteInfo::State::kPresent);
  EXPECT_EQ(leaf.pfn, pte.pfn);
  // The guest's bytes are in the host's page.
  std::byte* host_page = host_.page_address(pte.pfn, hva);
  ASSERT_NE(host_page, nullptr);
  EXPECT_EQ(std::memcmp(host_page + 0x10, data.data(), data.size()), 0);
  std::vector<std::byte> back(4);
  ASSERT_TRUE(v.read(Gpa(kGpa + 0x10), back).ok());
  EXPECT_EQ(back, data);
  EXPECT_EQ(mmu_->stats().installs, 1u);
  EXPECT_EQ(balance_gap(), 0u);
}

TEST_F(MmuTest, Install_ReadOfFreshAnonMapsZeroPageReadOnlyThenWriteBreaksCow) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  Vcpu& v = vcpu();
  uint64_t x = 1;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(x, 0u);
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  ASSERT_TRUE(spte::is_leaf(leaf.spte));
  EXPECT_FALSE(leaf.spte & spte::kWritable) << "zero page mapped writable";
  EXPECT_FALSE(leaf.spte & spte::kHostWritable);
  EXPECT_EQ(leaf.pfn, host_.zero_pfn());
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 0x1122334455667788ULL).ok());
  Mmu::Leaf after = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  EXPECT_NE(after.pfn, host_.zero_pfn());
  EXPECT_TRUE(after.spte & spte::kWritable);
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(x, 0x1122334455667788ULL);
  // Row 6/zero page: the zero page is reserved and was never dirtied (a violation otherwise).
  FrameInfo zero = host_.frame(host_.zero_pfn());
  EXPECT_FALSE(zero.dirty);
}

// Without the zero page (SimHostConfig::zero_page = false, docs/spec.md 12) a read of fresh
// anonymous memory maps a fresh host-writable page: the leaf is writable at once (row 8), the
// write after it takes no second fault, and on a logging slot the read is logged (G1).
TEST(MmuNoZeroPage, Install_ReadOfFreshAnonMapsAWritablePageAndLogsIt) {
  SimHost host(SimHostConfig{.zero_page = false});
  Memslots slots;
  DirtyLog dirty(slots);
  MmuOptions o;
  o.dirty = &dirty;
  Mmu mmu(slots, host, o);
  auto hva = host.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(hva.ok());
  UserspaceMemoryRegion region;
  region.flags = kMemLogDirtyPages;
  region.guest_phys_addr = kGpa;
  region.memory_size = 4 * kPageSize;
  region.userspace_addr = hva->value;
  ASSERT_TRUE(slots.set_memory_region(region).ok());
  {
    Vcpu v(mmu, 0);
    uint64_t x = 1;
    ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
    EXPECT_EQ(x, 0u);
    Mmu::Leaf leaf = mmu.lookup(0, Gfn(kGpa >> kPageShift));
    ASSERT_TRUE(spte::is_leaf(leaf.spte));
    EXPECT_TRUE(leaf.spte & spte::kWritable) << "row 8: the read found a writable page";
    EXPECT_NE(leaf.pfn, host.zero_pfn());
    const uint64_t faults = mmu.stats().faults;
    ASSERT_TRUE(v.write_u64(Gpa(kGpa), 7).ok());
    EXPECT_EQ(mmu.stats().faults, faults) << "the write hits the writable leaf";
    EXPECT_EQ(mmu.lookup(0, Gfn(kGpa >> kPageShift)).pfn, leaf.pfn) << "no CoW break";
    std::vector<uint64_t> bm(1);
    ASSERT_TRUE(dirty.get_dirty_log(0, bm).ok());
    EXPECT_EQ(bm[0], 1u);
  }
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(host.violations(), 0u);
}

TEST_F(MmuTest, Install_WriteToReadOnlyHostMappingNeverWritable) {
  Hva hva = map(4 * kPageSize, Prot::kRead);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  Vcpu& v = vcpu();
  uint64_t x = 0;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  EXPECT_FALSE(leaf.spte & spte::kWritable);
  EXPECT_FALSE(leaf.spte & spte::kHostWritable);
  VcpuExit ex = v.write_u64(Gpa(kGpa), 1);
  EXPECT_EQ(ex.reason, ExitReason::kMemoryFault);
  EXPECT_EQ(ex.error, EFAULT);
  EXPECT_EQ(ex.gpa, Gpa(kGpa));
  EXPECT_FALSE(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte & spte::kWritable);
}

TEST_F(MmuTest, Install_CowSharedPageReadOnlyUntilWrite) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  ASSERT_TRUE(host_.make_cow_shared(hva).ok());
  Pfn shared = host_.pte(hva).pfn;
  Vcpu& v = vcpu();
  uint64_t x = 0;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  EXPECT_EQ(leaf.pfn, shared);
  EXPECT_FALSE(leaf.spte & spte::kWritable) << "invariant 6: the upgrade never breaks CoW";
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 7).ok());
  Mmu::Leaf after = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  EXPECT_NE(after.pfn, shared);
  EXPECT_TRUE(after.spte & spte::kWritable);
}

TEST_F(MmuTest, Access_CrossesPagesAndSlots) {
  Hva a = map(2 * kPageSize);
  Hva b = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, a);
  add_slot(1, kGpa + 2 * kPageSize, 2 * kPageSize, b);
  Vcpu& v = vcpu();
  std::vector<std::byte> data(3 * kPageSize);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 7 + 1);
  Gpa at(kGpa + kPageSize / 2);
  ASSERT_TRUE(v.write(at, data).ok());
  std::vector<std::byte> back(data.size());
  VcpuExit ex = v.read(at, back);
  ASSERT_TRUE(ex.ok());
  EXPECT_EQ(ex.bytes_done, data.size());
  EXPECT_EQ(back, data);
  // The second slot's host memory holds its share.
  std::byte* p = host_.page_address(host_.pte(b).pfn, b);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(std::memcmp(p, data.data() + kPageSize + kPageSize / 2, 16), 0);
}

// ------------------------------------------------------------------------------- exits

TEST_F(MmuTest, Exit_NoSlotIsMmioWithGpaLenData) {
  Hva hva = map(kPageSize);
  add_slot(0, kGpa, kPageSize, hva);
  Vcpu& v = vcpu();
  // Starts in the slot, runs off its end into nothing.
  std::vector<std::byte> data(kPageSize + 4, std::byte{0xab});
  VcpuExit ex = v.write(Gpa(kGpa), data);
  EXPECT_EQ(ex.reason, ExitReason::kMmio);
  EXPECT_EQ(ex.bytes_done, kPageSize);
  EXPECT_EQ(ex.gpa, Gpa(kGpa + kPageSize));
  EXPECT_TRUE(ex.mmio.is_write);
  EXPECT_EQ(ex.mmio.len, 4u);
  EXPECT_EQ(ex.mmio.data[0], std::byte{0xab});
  uint64_t x;
  VcpuExit r = v.read_u64(Gpa(0x1000), &x);
  EXPECT_EQ(r.reason, ExitReason::kMmio);
  EXPECT_FALSE(r.mmio.is_write);
  EXPECT_EQ(r.mmio.len, 8u);
  EXPECT_EQ(balance_gap(), 0u);
}

TEST_F(MmuTest, Exit_WriteToReadOnlySlotIsMmioReadSucceeds) {
  Hva hva = map(kPageSize);
  ASSERT_TRUE(host_.populate(hva, kPageSize, true).ok());
  add_slot(0, kGpa, kPageSize, hva, kMemReadonly);
  Vcpu& v = vcpu();
  uint64_t x = 5;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_FALSE(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte & spte::kWritable)
      << "invariant 5: never writable for a READONLY slot";
  VcpuExit ex = v.write_u64(Gpa(kGpa + 8), 9);
  EXPECT_EQ(ex.reason, ExitReason::kMmio);
  EXPECT_TRUE(ex.mmio.is_write);
  EXPECT_EQ(ex.gpa, Gpa(kGpa + 8));
  uint64_t nine = 9;
  EXPECT_EQ(std::memcmp(ex.mmio.data.data(), &nine, 8), 0);
}

TEST_F(MmuTest, Exit_HwpoisonReportsHva) {
  Hva hva = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  ASSERT_TRUE(host_.poison(hva + kPageSize).ok());
  Vcpu& v = vcpu();
  uint64_t x;
  VcpuExit ex = v.read_u64(Gpa(kGpa + kPageSize), &x);
  EXPECT_EQ(ex.reason, ExitReason::kHwpoison);
  EXPECT_EQ(ex.hva, hva + kPageSize);
  EXPECT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
}

TEST_F(MmuTest, Exit_NoVmaIsMemoryFaultEfault) {
  Hva hva = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  ASSERT_TRUE(host_.munmap(hva + kPageSize, kPageSize).ok());
  Vcpu& v = vcpu();
  VcpuExit ex = v.write_u64(Gpa(kGpa + kPageSize), 1);
  EXPECT_EQ(ex.reason, ExitReason::kMemoryFault);
  EXPECT_EQ(ex.error, EFAULT);
  EXPECT_EQ(ex.hva, hva + kPageSize);
}

TEST_F(MmuTest, Exit_FatalSignalIsIntr) {
  Hva hva = map(kPageSize);
  add_slot(0, kGpa, kPageSize, hva);
  Vcpu& v = vcpu();
  host_.set_signal(SignalState::kFatal);
  VcpuExit ex = v.write_u64(Gpa(kGpa), 1);
  host_.set_signal(SignalState::kNone);
  EXPECT_EQ(ex.reason, ExitReason::kIntr);
  EXPECT_EQ(ex.error, EINTR);
  EXPECT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
}

// ------------------------------------------------------------------------------- invariant 16

// A notifier registered after the Mmu sees invalidate_range_start after the Mmu's returned.
struct AfterMmuChecker : MmuNotifier {
  Mmu* mmu = nullptr;
  Gfn gfn0;
  Hva hva0;
  uint64_t checked = 0;
  uint64_t survivors = 0;
  void invalidate_range_start(Hva start, Hva end) override {
    for (Hva h = start; h < end; h = h + kPageSize) {
      if (h < hva0) continue;
      Gfn g = gfn0 + ((h - hva0) >> kPageShift);
      ++checked;
      if (mmu->lookup(0, g).spte != 0) ++survivors;
    }
  }
  void invalidate_range_end(Hva, Hva) override {}
};

TEST_F(MmuTest, Invariant16_NoSpteSurvivesInvalidationStart) {
  Hva hva = map(64 * kPageSize);
  add_slot(0, kGpa, 64 * kPageSize, hva);
  Vcpu& v = vcpu();
  for (uint64_t i = 0; i < 64; ++i) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  EXPECT_EQ(mmu_->count_mapped(0, Gfn(kGpa >> kPageShift), Gfn((kGpa >> kPageShift) + 64)), 64u);
  AfterMmuChecker checker;
  checker.mmu = mmu_.get();
  checker.gfn0 = Gfn(kGpa >> kPageShift);
  checker.hva0 = hva;
  host_.register_notifier(&checker);
  uint64_t flushes = mmu_->stats().tlb_flushes;
  ASSERT_TRUE(host_.discard(hva + 8 * kPageSize, 16 * kPageSize).ok());
  host_.unregister_notifier(&checker);
  EXPECT_EQ(checker.checked, 16u);
  EXPECT_EQ(checker.survivors, 0u);
  EXPECT_GT(mmu_->stats().tlb_flushes, flushes);
  EXPECT_EQ(mmu_->count_mapped(0, Gfn(kGpa >> kPageShift), Gfn((kGpa >> kPageShift) + 64)), 48u);
  // The discarded pages read back as zero through a fresh fault.
  uint64_t x = 1;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 8 * kPageSize), &x).ok());
  EXPECT_EQ(x, 0u);
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 7 * kPageSize), &x).ok());
  EXPECT_EQ(x, 7u);
}

TEST_F(MmuTest, Invariant16_FaultRetriesWhenInvalidationInProgress) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  bool fired = false;
  MmuOptions o;
  o.after_faultin_hook = [&](Gfn) {
    if (fired) return;
    fired = true;
    mmu_->invalidate_range_start(hva, hva + kPageSize);  // what the host would do
  };
  make_mmu(o);
  Vcpu& v = vcpu();
  VcpuExit ex;
  EXPECT_EQ(v.fault(Gpa(kGpa), Access::kWrite, &ex), FaultResult::kRetry);
  EXPECT_EQ(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte, 0u) << "installed despite the race";
  EXPECT_EQ(mmu_->invalidate_in_progress(), 1);
  // Invariant 18: a retried fault releases the page unused (neither dirty nor accessed).
  FrameInfo f = host_.frame(host_.pte(hva).pfn);
  EXPECT_FALSE(f.dirty);
  EXPECT_FALSE(f.accessed);
  EXPECT_EQ(host_.outstanding_refs(), 0u);
  // Still in progress: the same gfn keeps retrying; another gfn outside the range installs.
  EXPECT_EQ(v.fault(Gpa(kGpa), Access::kWrite, &ex), FaultResult::kRetry);
  EXPECT_EQ(v.fault(Gpa(kGpa + 2 * kPageSize), Access::kWrite, &ex), FaultResult::kFixed);
  mmu_->invalidate_range_end(hva, hva + kPageSize);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 0);
  EXPECT_EQ(v.fault(Gpa(kGpa), Access::kWrite, &ex), FaultResult::kFixed);
  EXPECT_EQ(balance_gap(), 0u);
}

TEST_F(MmuTest, Invariant16_FaultRetriesAfterCompletedInvalidation) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  bool fired = false;
  MmuOptions o;
  o.after_faultin_hook = [&](Gfn) {
    if (fired) return;
    fired = true;
    // An invalidation of a different page that completes: only seq tells.
    mmu_->invalidate_range_start(hva + 3 * kPageSize, hva + 4 * kPageSize);
    mmu_->invalidate_range_end(hva + 3 * kPageSize, hva + 4 * kPageSize);
  };
  make_mmu(o);
  Vcpu& v = vcpu();
  uint64_t seq = mmu_->invalidate_seq();
  VcpuExit ex;
  EXPECT_EQ(v.fault(Gpa(kGpa), Access::kRead, &ex), FaultResult::kRetry);
  EXPECT_EQ(mmu_->invalidate_seq(), seq + 1);
  EXPECT_EQ(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte, 0u);
  EXPECT_EQ(v.fault(Gpa(kGpa), Access::kRead, &ex), FaultResult::kFixed);
  EXPECT_TRUE(mmu_->invalidate_retry_gfn(seq, Gfn(kGpa >> kPageShift)));
  EXPECT_FALSE(mmu_->invalidate_retry_gfn(mmu_->invalidate_seq(), Gfn(kGpa >> kPageShift)));
}

// ------------------------------------------------------------------------------- invariant 17

TEST_F(MmuTest, Invariant17_InProgressBalancedSeqBumpsOncePerEndWithSlot) {
  Hva hva = map(8 * kPageSize);
  Hva elsewhere = map(4 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva);
  uint64_t seq = mmu_->invalidate_seq();
  // No memslot intersects: nothing counted.
  mmu_->invalidate_range_start(elsewhere, elsewhere + kPageSize);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 0);
  mmu_->invalidate_range_end(elsewhere, elsewhere + kPageSize);
  EXPECT_EQ(mmu_->invalidate_seq(), seq);
  // Nested overlapping invalidations widen the range; it resets when they all end.
  mmu_->invalidate_range_start(hva, hva + kPageSize);
  mmu_->invalidate_range_start(hva + 4 * kPageSize, hva + 6 * kPageSize);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 2);
  auto [s, e] = mmu_->invalidate_range();
  EXPECT_EQ(s, kGpa >> kPageShift);
  EXPECT_EQ(e, (kGpa >> kPageShift) + 6);
  mmu_->invalidate_range_end(hva + 4 * kPageSize, hva + 6 * kPageSize);
  EXPECT_EQ(mmu_->invalidate_seq(), seq + 1);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 1);
  mmu_->invalidate_range_end(hva, hva + kPageSize);
  EXPECT_EQ(mmu_->invalidate_seq(), seq + 2);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 0);
  EXPECT_EQ(slots_.mn_active_invalidate_count(), 0);
  // Partial pages round outward.
  mmu_->invalidate_range_start(hva + 100, hva + kPageSize + 1);
  auto [s2, e2] = mmu_->invalidate_range();
  EXPECT_EQ(s2, kGpa >> kPageShift);
  EXPECT_EQ(e2, (kGpa >> kPageShift) + 2);
  mmu_->invalidate_range_end(hva + 100, hva + kPageSize + 1);
  EXPECT_EQ(mmu_->invalidate_in_progress(), 0);
}

TEST_F(MmuTest, Invariant17_MemslotSwapWaitsWhileInvalidationActive) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  mmu_->invalidate_range_start(hva, hva + kPageSize);
  EXPECT_EQ(slots_.mn_active_invalidate_count(), 1);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    auto r = set_region(1, kGpa + 0x100000, 4 * kPageSize, hva + 4 * kPageSize);
    EXPECT_TRUE(r.ok());
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(done.load()) << "memslot swap ran while an invalidation was active";
  mmu_->invalidate_range_end(hva, hva + kPageSize);
  writer.join();
  EXPECT_TRUE(done.load());
}

// ------------------------------------------------------------------------------- invariant 18

TEST_F(MmuTest, Invariant18_InstalledWritableIsDirtyAndAccessed) {
  Hva hva = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
  FrameInfo f = host_.frame(host_.pte(hva).pfn);
  EXPECT_TRUE(f.dirty);
  EXPECT_TRUE(f.accessed);
  EXPECT_EQ(f.held_refs, 0u);
}

TEST_F(MmuTest, Invariant18_ReadFaultOfWritableHostPageIsDirtyToo) {
  // map_writable upgrade: a read fault of a host-writable page is released dirty (spec 6).
  Hva hva = map(2 * kPageSize);
  ASSERT_TRUE(host_.populate(hva, kPageSize, true).ok());
  add_slot(0, kGpa, 2 * kPageSize, hva);
  Pfn pfn = host_.pte(hva).pfn;
  Vcpu& v = vcpu();
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_TRUE(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte & spte::kWritable);
  EXPECT_TRUE(host_.frame(pfn).dirty);
}

TEST_F(MmuTest, Invariant18_ReadOnlyHostPageIsAccessedNotDirty) {
  Hva hva = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  ASSERT_TRUE(host_.make_cow_shared(hva).ok());
  Pfn pfn = host_.pte(hva).pfn;
  bool dirty_before = host_.frame(pfn).dirty;
  Vcpu& v = vcpu();
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  FrameInfo f = host_.frame(pfn);
  EXPECT_TRUE(f.accessed);
  EXPECT_EQ(f.dirty, dirty_before) << "a page mapped read-only was dirtied";
}

TEST_F(MmuTest, Invariant18_ReservedZeroPageNeverMarked) {
  Hva hva = map(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  Vcpu& v = vcpu();
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  FrameInfo z = host_.frame(host_.zero_pfn());
  EXPECT_TRUE(z.reserved);
  EXPECT_FALSE(z.dirty);
  EXPECT_FALSE(z.accessed);
}

// ------------------------------------------------------------------------------- invariant 19

TEST_F(MmuTest, Invariant19_AgingYoungBitsAndFlushes) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
  Gfn g(kGpa >> kPageShift);
  uint64_t before = mmu_->lookup(0, g).spte;
  // test_young: no side effects.
  EXPECT_TRUE(mmu_->test_young(hva, hva + kPageSize));
  EXPECT_EQ(mmu_->lookup(0, g).spte, before);
  // clear_young: clears, never flushes.
  uint64_t flushes = mmu_->stats().tlb_flushes;
  EXPECT_TRUE(mmu_->clear_young(hva, hva + kPageSize));
  EXPECT_EQ(mmu_->stats().tlb_flushes, flushes);
  EXPECT_FALSE(mmu_->lookup(0, g).spte & spte::kAccessed);
  EXPECT_FALSE(mmu_->test_young(hva, hva + kPageSize));
  // clear_flush_young: flushes only when something was young.
  EXPECT_FALSE(mmu_->clear_flush_young(hva, hva + kPageSize));
  EXPECT_EQ(mmu_->stats().tlb_flushes, flushes);
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());  // the access makes it young again
  EXPECT_TRUE(mmu_->test_young(hva, hva + kPageSize));
  EXPECT_TRUE(mmu_->clear_flush_young(hva, hva + kPageSize));
  EXPECT_EQ(mmu_->stats().tlb_flushes, flushes + 1);
  // Through the host: age_range reaches the notifier.
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  AgeResult r = host_.age_range(hva, hva + kPageSize, /*flush=*/false);
  EXPECT_TRUE(r.secondary_young);
  EXPECT_FALSE(host_.test_young(hva, hva + kPageSize).secondary_young);
}

// ------------------------------------------------------------------------------- memslots

// Runs after the Mmu's flush_shadow_memslot (registered later): the slot is INVALID.
struct WindowProbe : MemslotListener {
  Mmu* mmu = nullptr;
  Vcpu* vcpu = nullptr;
  Gpa gpa;
  int calls = 0;
  FaultResult result = FaultResult::kFixed;
  uint64_t mapped = ~uint64_t{0};
  void flush_shadow_memslot(const Memslot& slot) override {
    ++calls;
    mapped = mmu->count_mapped(slot.as_id, slot.base_gfn, slot.end_gfn());
    VcpuExit ex;
    result = mmu->page_fault(*vcpu, gpa, Access::kRead, false, &ex);
  }
};

TEST_F(MmuTest, Invariant20_DeleteWindowRetriesThenMmio) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva);
  Vcpu& v = vcpu();
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  WindowProbe probe;
  probe.mmu = mmu_.get();
  Vcpu& other = vcpu(1);
  probe.vcpu = &other;
  probe.gpa = Gpa(kGpa + 3 * kPageSize);
  slots_.add_listener(&probe);
  ASSERT_TRUE(set_region(0, kGpa, 0, hva).ok());
  slots_.remove_listener(&probe);
  EXPECT_EQ(probe.calls, 1);
  EXPECT_EQ(probe.mapped, 0u) << "entries survived DELETE's flush";
  EXPECT_EQ(probe.result, FaultResult::kRetry) << "INVALID slot must retry, never map";
  uint64_t x;
  EXPECT_EQ(v.read_u64(Gpa(kGpa + 3 * kPageSize), &x).reason, ExitReason::kMmio);
  EXPECT_EQ(balance_gap(), 0u);
}

TEST_F(MmuTest, Invariant20_MoveWindowNeverStaleAndDataFollows) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva);
  Vcpu& v = vcpu();
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i + 100).ok());
  WindowProbe probe;
  probe.mmu = mmu_.get();
  Vcpu& other = vcpu(1);
  probe.vcpu = &other;
  probe.gpa = Gpa(kGpa);
  slots_.add_listener(&probe);
  uint64_t moved = kGpa + 0x40000000ULL;
  ASSERT_TRUE(set_region(0, moved, 8 * kPageSize, hva).ok());
  slots_.remove_listener(&probe);
  EXPECT_EQ(probe.mapped, 0u);
  EXPECT_EQ(probe.result, FaultResult::kRetry);
  uint64_t x;
  EXPECT_EQ(v.read_u64(Gpa(kGpa), &x).reason, ExitReason::kMmio);
  for (uint64_t i = 0; i < 8; ++i) {
    ASSERT_TRUE(v.read_u64(Gpa(moved + i * kPageSize), &x).ok());
    EXPECT_EQ(x, i + 100);
  }
}

TEST_F(MmuTest, Memslot_BeyondMmuWidthRejected) {
  Hva hva = map(kPageSize);
  auto r = set_region(0, kMmuMaxGfn << kPageShift, kPageSize, hva);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), EINVAL);
}

// ------------------------------------------------------------------------------- dirty logging

TEST_F(MmuTest, DirtyLog_EnableWriteProtectsThenFastPathLogsWithoutResolver) {
  Hva hva = map(64 * kPageSize);
  add_slot(0, kGpa, 64 * kPageSize, hva);
  Vcpu& v = vcpu();
  for (uint64_t i = 0; i < 64; ++i) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  ASSERT_TRUE(set_region(0, kGpa, 64 * kPageSize, hva, kMemLogDirtyPages).ok());
  Gfn g0(kGpa >> kPageShift);
  for (uint64_t i = 0; i < 64; ++i) {
    uint64_t e = mmu_->lookup(0, g0 + i).spte;
    ASSERT_TRUE(spte::is_dirty_log_protected(e)) << i << ": " << spte::to_string(e);
  }
  std::vector<uint64_t> bm(1);
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], 0u);
  host_.reset_counters();
  MmuStats before = mmu_->stats();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 5 * kPageSize), 55).ok());
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 9 * kPageSize), 99).ok());
  MmuStats after = mmu_->stats();
  EXPECT_EQ(after.fast_faults - before.fast_faults, 2u);
  EXPECT_EQ(after.faults, before.faults) << "the fast path must not run page_fault";
  SimCounters sc = host_.counters();
  EXPECT_EQ(sc.fast_lookups + sc.slow_gups, 0u) << "the fast path must not call the resolver";
  auto got = dirty_->get_dirty_log(0, bm);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 2u);
  EXPECT_EQ(bm[0], (uint64_t{1} << 5) | (uint64_t{1} << 9));
  // get_dirty_log write-protected them again: the next write is logged again.
  EXPECT_TRUE(spte::is_dirty_log_protected(mmu_->lookup(0, g0 + 5).spte));
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 5 * kPageSize), 56).ok());
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], uint64_t{1} << 5);
  // Reads never log.
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 7 * kPageSize), &x).ok());
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], 0u);
}

// Manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GET only copies and leaves the entries
// writable; CLEAR write-protects exactly the cleared pages through the DirtyWriteProtector,
// so their next write is logged again and the others keep hitting without a fault.
TEST_F(MmuTest, Invariant23_ManualProtectGetKeepsWritableClearWriteProtects) {
  ASSERT_TRUE(dirty_->enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  Hva hva = map(64 * kPageSize);
  add_slot(0, kGpa, 64 * kPageSize, hva, kMemLogDirtyPages);
  Vcpu& v = vcpu();
  Gfn g0(kGpa >> kPageShift);
  for (uint64_t i : {3u, 4u, 40u}) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  std::vector<uint64_t> bm(1);
  auto got = dirty_->get_dirty_log(0, bm);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 3u);
  const uint64_t want = (uint64_t{1} << 3) | (uint64_t{1} << 4) | (uint64_t{1} << 40);
  EXPECT_EQ(bm[0], want);
  for (uint64_t i : {3u, 4u, 40u}) {
    uint64_t e = mmu_->lookup(0, g0 + i).spte;
    EXPECT_TRUE(e & spte::kWritable) << i << ": " << spte::to_string(e);
  }
  // Clear pages 3 and 40 only.
  const uint64_t clear = (uint64_t{1} << 3) | (uint64_t{1} << 40);
  std::vector<uint64_t> cm{clear};
  auto cleared = dirty_->clear_dirty_log(0, 0, 64, cm);
  ASSERT_TRUE(cleared.ok());
  EXPECT_EQ(*cleared, 2u);
  EXPECT_TRUE(spte::is_dirty_log_protected(mmu_->lookup(0, g0 + 3).spte));
  EXPECT_TRUE(spte::is_dirty_log_protected(mmu_->lookup(0, g0 + 40).spte));
  EXPECT_TRUE(mmu_->lookup(0, g0 + 4).spte & spte::kWritable);
  EXPECT_FALSE(v.try_write_u64(Gpa(kGpa + 3 * kPageSize), 1));
  EXPECT_TRUE(v.try_write_u64(Gpa(kGpa + 4 * kPageSize), 1));
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 40 * kPageSize), 41).ok());
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], (uint64_t{1} << 4) | (uint64_t{1} << 40));
}

TEST_F(MmuTest, Invariant23_NewFaultOnLoggingSlotIsLogged) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva, kMemLogDirtyPages);
  Vcpu& v = vcpu();
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + kPageSize), &x).ok());
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 2 * kPageSize), 1).ok());
  // A read fault of a page the host maps writable installs a writable leaf and logs it, as the
  // kernel's make_spte does (docs/spec-notes.md, G1); a read of a page the host maps read-only
  // (page 1: the zero page) is neither writable nor logged.
  ASSERT_TRUE(host_.populate(hva + 3 * kPageSize, kPageSize, true).ok());
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 3 * kPageSize), &x).ok());
  const uint64_t e3 = mmu_->lookup(0, Gfn((kGpa >> kPageShift) + 3)).spte;
  EXPECT_TRUE(e3 & spte::kWritable);
  EXPECT_FALSE(e3 & spte::kDirty);  // the leaf's dirty bit still means "written"
  EXPECT_FALSE(mmu_->lookup(0, Gfn((kGpa >> kPageShift) + 1)).spte & spte::kWritable);
  std::vector<uint64_t> bm(1);
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], (uint64_t{1} << 2) | (uint64_t{1} << 3));
  // GET write-protected it again: the next read leaves the log clean, a write logs it.
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 3 * kPageSize), &x).ok());
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], 0u);
}

TEST_F(MmuTest, Invariant23_VmmWritesAreLogged) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva, kMemLogDirtyPages);
  auto data = bytes({9, 8, 7});
  ASSERT_TRUE(mmu_->write_guest(Gpa(kGpa + kPageSize - 1), data).ok());  // crosses a page
  std::vector<uint64_t> bm(1);
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], 0b11u);
  // Again on an entry that is writable already: still logged (kvm_write_guest always marks).
  ASSERT_TRUE(mmu_->write_guest(Gpa(kGpa + kPageSize), data).ok());
  ASSERT_TRUE(mmu_->write_guest(Gpa(kGpa + kPageSize + 8), data).ok());
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], 0b10u);
  std::vector<std::byte> back(3);
  ASSERT_TRUE(mmu_->read_guest(Gpa(kGpa + kPageSize + 8), back).ok());
  EXPECT_EQ(back, data);
}

TEST_F(MmuTest, Invariant23_DirtyRingSoftFullExits) {
  ASSERT_NO_FATAL_FAILURE(make_mmu_with_dirty_ring(4096));  // 256 entries, soft limit 192
  Hva hva = map(256 * kPageSize);
  add_slot(0, kGpa, 256 * kPageSize, hva, kMemLogDirtyPages);
  Vcpu& v = vcpu(3);
  ASSERT_NE(v.dirty_ring(), nullptr);
  uint64_t i = 0;
  VcpuExit ex;
  for (; i < 256; ++i) {
    ex = v.write_u64(Gpa(kGpa + i * kPageSize), i);
    if (!ex.ok()) break;
  }
  ASSERT_EQ(ex.reason, ExitReason::kDirtyRingFull);
  EXPECT_EQ(v.dirty_ring()->used(), v.dirty_ring()->soft_limit());
  // Cannot re-enter until harvested and reset.
  EXPECT_EQ(v.write_u64(Gpa(kGpa + i * kPageSize), i).reason, ExitReason::kDirtyRingFull);
  std::vector<uint64_t> seen;
  v.dirty_ring()->harvest([&](uint32_t, uint64_t off) { seen.push_back(off); });
  ASSERT_TRUE(dirty_->reset_dirty_rings().ok());
  for (size_t k = 0; k < seen.size(); ++k) ASSERT_EQ(seen[k], k) << "ring order = write order";
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  // Reset write-protected the harvested pages: writing one again is logged again.
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
  EXPECT_EQ(seen.size(), i + 1) << "the write that filled the ring was logged, not done";
  EXPECT_EQ(v.dirty_ring()->used(), 2u);
}

// ------------------------------------------------------------------------------- table hit path

// try_read_u64/try_write_u64 (the inline hit path of read_u64/write_u64) act only through an
// entry that already has the needed permission and accessed/dirty bits (invariants 18, 19,
// 23: a hit never skips marking, aging or dirty logging), and never use a table retired since
// the vCPU cached it (the level-2 paging-structure cache follows the table epoch).
TEST_F(MmuTest, TableHit_TryAccessNeedsPermissionAndBitsAndNeverFaults) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva);
  Vcpu& v = vcpu();
  uint64_t x = 0;
  const uint64_t faults0 = mmu_->stats().faults;
  EXPECT_FALSE(v.try_read_u64(Gpa(kGpa), &x));  // no entry: nothing done, no fault
  EXPECT_FALSE(v.try_write_u64(Gpa(kGpa), 1));
  EXPECT_EQ(mmu_->stats().faults, faults0);
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 7).ok());
  EXPECT_TRUE(v.try_write_u64(Gpa(kGpa + 8), 8));
  ASSERT_TRUE(v.try_read_u64(Gpa(kGpa + 8), &x));
  EXPECT_EQ(x, 8u);
  EXPECT_FALSE(v.try_read_u64(Gpa(kGpa + kPageSize - 4), &x));  // crosses a page
  EXPECT_FALSE(v.try_read_u64(Gpa(kMmuMaxGfn << kPageShift), &x));  // beyond the table
  // Aging: an old entry is made young by the full path, never silently by a hit.
  EXPECT_TRUE(mmu_->clear_young(hva, hva + kPageSize));
  EXPECT_FALSE(v.try_read_u64(Gpa(kGpa), &x));
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(x, 7u);
  EXPECT_TRUE(v.try_read_u64(Gpa(kGpa), &x));
  // A read fault of a fresh anon page maps the zero page read-only: reads hit, writes do not.
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + kPageSize), &x).ok());
  EXPECT_TRUE(v.try_read_u64(Gpa(kGpa + kPageSize), &x));
  EXPECT_FALSE(v.try_write_u64(Gpa(kGpa + kPageSize), 1));
  // Dirty logging write-protects: the write goes through the logged path, then hits again.
  ASSERT_TRUE(set_region(0, kGpa, 8 * kPageSize, hva, kMemLogDirtyPages).ok());
  EXPECT_FALSE(v.try_write_u64(Gpa(kGpa), 9));
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 9).ok());
  EXPECT_TRUE(v.try_write_u64(Gpa(kGpa), 10));
  // Invalidation: no hit through a zapped entry.
  ASSERT_TRUE(host_.discard(hva, kPageSize).ok());
  EXPECT_FALSE(v.try_read_u64(Gpa(kGpa), &x));
  // Tables retired (zap_all frees every node): the cached level-2 table is not used again
  // (under ASan a stale pointer would be a use-after-free).
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 2 * kPageSize), 11).ok());
  ASSERT_TRUE(v.try_read_u64(Gpa(kGpa + 2 * kPageSize), &x));
  mmu_->zap_all();
  EXPECT_FALSE(v.try_read_u64(Gpa(kGpa + 2 * kPageSize), &x));
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 2 * kPageSize), &x).ok());
  EXPECT_EQ(x, 11u);
  EXPECT_TRUE(v.try_read_u64(Gpa(kGpa + 2 * kPageSize), &x));
  EXPECT_EQ(x, 11u);
  EXPECT_EQ(balance_gap(), 0u);
}

// ------------------------------------------------------------------------------- huge leaves

class MmuHugeTest : public MmuTest {
 protected:
  Hva thp(uint64_t size) {
    MmapOptions o;
    o.backing = PageBacking::kThp;
    return map(size, kProtRW, VmaKind::kAnonPrivate, o);
  }
};

TEST_F(MmuHugeTest, Huge_ThpBackedCongruentSlotGets2MLeaf) {
  Hva hva = thp(2 * k2M);
  ASSERT_EQ(hva.value % k2M, 0u);
  add_slot(0, kGpa, 2 * k2M, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 0x3008), 42).ok());
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn((kGpa + 0x3008) >> kPageShift));
  ASSERT_EQ(host_.pte(hva + 0x3000).level, PgLevel::k2M);
  EXPECT_EQ(leaf.level, PgLevel::k2M);
  EXPECT_TRUE(leaf.spte & spte::kLarge);
  EXPECT_EQ(leaf.pfn, host_.pte(hva + 0x3000).pfn);
  Gfn g0(kGpa >> kPageShift);
  EXPECT_EQ(mmu_->count_mapped(0, g0, g0 + 1024), 512u);
  // Every 4K page of the leaf reaches the host's frame for it.
  for (uint64_t p : {uint64_t{0}, uint64_t{1}, uint64_t{511}}) {
    Gpa gpa(kGpa + p * kPageSize + 16);
    ASSERT_TRUE(v.write_u64(gpa, p + 1000).ok());
    PteInfo pte = host_.pte(hva + p * kPageSize);
    uint64_t x = 0;
    std::memcpy(&x, host_.page_address(pte.pfn, hva + p * kPageSize) + 16, 8);
    EXPECT_EQ(x, p + 1000);
  }
  EXPECT_EQ(mmu_->stats().installs_2m, 1u);
}

TEST_F(MmuHugeTest, Huge_NonCongruentOrPartialSlotGets4K) {
  Hva hva = thp(2 * k2M);
  add_slot(0, kGpa + kPageSize, k2M, hva);  // gpa and hva differ modulo 2M
  add_slot(1, kGpa + 0x10000000ULL, k2M / 2, hva + k2M);  // slot smaller than 2M
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 2 * kPageSize), 1).ok());
  EXPECT_EQ(mmu_->lookup(0, Gfn((kGpa >> kPageShift) + 2)).level, PgLevel::k4K);
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 0x10000000ULL), 1).ok());
  EXPECT_EQ(mmu_->lookup(0, Gfn((kGpa + 0x10000000ULL) >> kPageShift)).level, PgLevel::k4K);
}

TEST_F(MmuHugeTest, Huge_DirtyLoggingSplitsAndDisablingRestores) {
  Hva hva = thp(k2M);
  add_slot(0, kGpa, k2M, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
  Gfn g0(kGpa >> kPageShift);
  ASSERT_EQ(mmu_->lookup(0, g0).level, PgLevel::k2M);
  ASSERT_TRUE(set_region(0, kGpa, k2M, hva, kMemLogDirtyPages).ok());
  Mmu::Leaf split = mmu_->lookup(0, g0 + 7);
  EXPECT_EQ(split.level, PgLevel::k4K);
  EXPECT_TRUE(spte::is_dirty_log_protected(split.spte));
  EXPECT_EQ(mmu_->count_mapped(0, g0, g0 + 512), 512u) << "split keeps every page mapped";
  EXPECT_GE(mmu_->stats().splits, 1u);
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 7 * kPageSize), 7).ok());
  std::vector<uint64_t> bm(8);
  ASSERT_TRUE(dirty_->get_dirty_log(0, bm).ok());
  EXPECT_EQ(bm[0], uint64_t{1} << 7);
  // New faults while logging are 4K.
  ASSERT_TRUE(set_region(0, kGpa, k2M, hva, 0).ok());
  EXPECT_EQ(mmu_->lookup(0, g0 + 7).spte, 0u) << "disabling logging drops the 4K leaves";
  uint64_t x = 0;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 7 * kPageSize), &x).ok());
  EXPECT_EQ(x, 7u);
  EXPECT_EQ(mmu_->lookup(0, g0 + 7).level, PgLevel::k2M) << "huge mapping came back";
}

TEST_F(MmuHugeTest, Huge_InvalidatingOnePageDropsTheWholeLeaf) {
  Hva hva = thp(k2M);
  add_slot(0, kGpa, k2M, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 5 * kPageSize), 5).ok());
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 6 * kPageSize), 6).ok());
  Gfn g0(kGpa >> kPageShift);
  ASSERT_EQ(mmu_->lookup(0, g0).level, PgLevel::k2M);
  ASSERT_TRUE(host_.discard(hva + 5 * kPageSize, kPageSize).ok());
  EXPECT_EQ(mmu_->count_mapped(0, g0, g0 + 512), 0u);
  uint64_t x = 1;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 5 * kPageSize), &x).ok());
  EXPECT_EQ(x, 0u);
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 6 * kPageSize), &x).ok());
  EXPECT_EQ(x, 6u);
}

TEST_F(MmuHugeTest, Huge_MaxLevelOptionCaps) {
  MmuOptions o;
  o.max_level = PgLevel::k4K;
  make_mmu(o);
  Hva hva = thp(k2M);
  add_slot(0, kGpa, k2M, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 1).ok());
  EXPECT_EQ(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).level, PgLevel::k4K);
}

// ------------------------------------------------------------------------------- async PF

class MmuAsyncTest : public MmuTest {
 protected:
  void SetUp() override {
    pool_ = std::make_unique<AsyncPfWorkerPool>(host_, 2);
    MmuOptions o;
    o.async_pf_pool = pool_.get();
    make_mmu(o);
  }
  void TearDown() override {
    vcpus_.clear();
    MmuTest::TearDown();
    pool_.reset();
  }
  Hva file_backed(uint64_t size) {
    auto f = host_.create_file(size, /*resident=*/false);
    EXPECT_TRUE(f.ok());
    MmapOptions o;
    o.file = *f;
    return map(size, kProtRW, VmaKind::kFileShared, o);
  }
  std::unique_ptr<AsyncPfWorkerPool> pool_;
};

TEST_F(MmuAsyncTest, Invariant24_NeedsIoGoesAsyncHaltsOnRepeatAndReadyPrefetches) {
  Hva hva = file_backed(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  // The first two GUPs of the page (our NOWAIT try and then either the worker or our repeated
  // NOWAIT try) report "needs I/O", so the repeat sees NEEDS_IO whatever the interleaving.
  GupInjection inj;
  inj.result = 0;
  inj.times = 2;
  ASSERT_TRUE(host_.inject_gup_result(hva, inj).ok());
  VcpuOptions vo;
  vo.async_pf = true;
  Vcpu& v = vcpu(2, vo);
  uint64_t x;
  VcpuExit ex = v.read_u64(Gpa(kGpa), &x);
  ASSERT_EQ(ex.reason, ExitReason::kAsyncPfNotPresent);
  EXPECT_NE(ex.token, 0u);
  EXPECT_EQ(ex.token & 0xfff, 2u) << "token = id << 12 | vcpu_id";
  uint32_t token = ex.token;
  // A repeated fault on the outstanding gfn halts instead of queueing again.
  VcpuExit again = v.read_u64(Gpa(kGpa + 8), &x);
  EXPECT_EQ(again.reason, ExitReason::kAsyncPfHalt);
  EXPECT_EQ(v.async_pf_queue()->queued(), 1u);
  ASSERT_TRUE(v.wait_async_pf(10000));
  std::vector<AsyncPfEvent> events = v.check_async_pf_completion();
  bool ready = false;
  for (const auto& e : events) {
    if (e.kind == AsyncPfEvent::Kind::kPageReady && e.token == token) ready = true;
  }
  EXPECT_TRUE(ready);
  // "page ready" re-ran the fault as a prefetch: mapped, not accessed.
  uint64_t e = mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte;
  ASSERT_TRUE(spte::is_leaf(e));
  EXPECT_FALSE(e & spte::kAccessed);
  MmuStats s = mmu_->stats();
  EXPECT_GE(s.prefetches, 1u);
  EXPECT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(balance_gap(), 0u);
}

TEST_F(MmuAsyncTest, Invariant24_WithoutAsyncTheSyncRetryResolves) {
  Hva hva = file_backed(2 * kPageSize);
  add_slot(0, kGpa, 2 * kPageSize, hva);
  Vcpu& v = vcpu();  // async_pf off
  uint64_t x;
  ASSERT_TRUE(v.read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(mmu_->stats().slow_faults, 1u);
  EXPECT_EQ(mmu_->stats().async_queued, 0u);
}

TEST_F(MmuAsyncTest, Invariant24_AtMost64OutstandingThenSynchronous) {
  constexpr uint64_t kPages = kAsyncPfPerVcpu + 2;
  Hva hva = file_backed(kPages * kPageSize);
  add_slot(0, kGpa, kPages * kPageSize, hva);
  VcpuOptions vo;
  vo.async_pf = true;
  Vcpu& v = vcpu(1, vo);
  // Keep workers from completing early affecting the count: count what went async.
  uint64_t asyncs = 0;
  uint64_t x;
  for (uint64_t i = 0; i < kPages; ++i) {
    VcpuExit ex = v.read_u64(Gpa(kGpa + i * kPageSize), &x);
    if (ex.reason == ExitReason::kAsyncPfNotPresent) ++asyncs;
    EXPECT_LE(v.async_pf_queue()->queued(), kAsyncPfPerVcpu);
  }
  EXPECT_LE(asyncs, kAsyncPfPerVcpu);
  EXPECT_EQ(mmu_->stats().async_queued, asyncs);
  while (v.async_pf_queue()->queued() > 0) {
    v.wait_async_pf(1000);
    v.check_async_pf_completion();
  }
}

}  // namespace
}  // namespace gfnmap::test
