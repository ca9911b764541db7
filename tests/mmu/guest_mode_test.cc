// gfnmap MMU tests: Vcpu::GuestMode (IN_GUEST_MODE): hits need the same entry bits as the
// per-access path, and every flush kicks a vCPU out of guest mode before it completes.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "mmu_fixture.h"

namespace gfnmap::test {
namespace {

constexpr uint64_t kGpa = uint64_t{1} << 32;

// Invariants 18, 19 and 23 in guest mode: a hit never skips marking, aging or dirty logging,
// and never goes through a zapped entry or a retired table.
TEST_F(MmuTest, GuestMode_Invariant18_19_23_HitsNeedPermissionAndBits) {
  Hva hva = map(8 * kPageSize);
  add_slot(0, kGpa, 8 * kPageSize, hva);
  Vcpu& v = vcpu();
  uint64_t x = 0;
  const uint64_t faults0 = mmu_->stats().faults;
  {
    Vcpu::GuestMode gm(v);
    EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa), &x));  // no entry: nothing done, no fault
    EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa), 1));
    EXPECT_EQ(mmu_->stats().faults, faults0);
    ASSERT_TRUE(gm.write_u64(Gpa(kGpa), 7).ok());  // faults outside guest mode
    EXPECT_EQ(mmu_->stats().faults, faults0 + 1);
    EXPECT_TRUE(gm.try_write_u64(Gpa(kGpa + 8), 8));
    ASSERT_TRUE(gm.try_read_u64(Gpa(kGpa + 8), &x));
    EXPECT_EQ(x, 8u);
    EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa + kPageSize - 4), &x));      // crosses a page
    EXPECT_FALSE(gm.try_read_u64(Gpa(kMmuMaxGfn << kPageShift), &x));  // beyond the table
    ASSERT_TRUE(gm.read_u64(Gpa(kGpa + kPageSize - 4), &x).ok());      // ... done by the Vcpu
  }
  // Aging (from this thread, so outside guest mode): an old entry is made young by the full
  // path, never silently by a hit.
  EXPECT_TRUE(mmu_->clear_young(hva, hva + kPageSize));
  {
    Vcpu::GuestMode gm(v);
    EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa), &x));
    ASSERT_TRUE(gm.read_u64(Gpa(kGpa), &x).ok());
    EXPECT_EQ(x, 7u);
    EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa), &x));
    // The zero page is mapped read-only: reads hit, writes do not.
    ASSERT_TRUE(gm.read_u64(Gpa(kGpa + 2 * kPageSize), &x).ok());
    EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa + 2 * kPageSize), &x));
    EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa + 2 * kPageSize), 1));
  }
  // Dirty logging write-protects: the write goes through the logged path, then hits again.
  ASSERT_TRUE(set_region(0, kGpa, 8 * kPageSize, hva, kMemLogDirtyPages).ok());
  {
    Vcpu::GuestMode gm(v);
    EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa), 9));
    ASSERT_TRUE(gm.write_u64(Gpa(kGpa), 9).ok());
    EXPECT_TRUE(gm.try_write_u64(Gpa(kGpa), 10));
  }
  std::vector<uint64_t> bitmap(1);
  ASSERT_TRUE(dirty_->get_dirty_log(0, bitmap).ok());
  EXPECT_EQ(bitmap[0] & 1, 1u) << "the guest-mode write was not logged";
  // Tables retired (zap_all frees every node): the cached level-2 table is not used again
  // (under ASan a stale pointer would be a use-after-free).
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 3 * kPageSize), 11).ok());
  mmu_->zap_all();
  {
    Vcpu::GuestMode gm(v);
    EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa + 3 * kPageSize), &x));
    ASSERT_TRUE(gm.read_u64(Gpa(kGpa + 3 * kPageSize), &x).ok());
    EXPECT_EQ(x, 11u);
  }
  EXPECT_EQ(balance_gap(), 0u);
}

// The VMM's pseudo-vCPU never writes on the hit path (every VMM write is logged in the bitmap).
// A soft-full dirty ring stops every hit as it stops KVM_RUN, and the exit leaves guest mode,
// so the ring can be harvested and reset from the vCPU's thread while the GuestMode lives (a
// reset flushes; inside guest mode it would wait for this thread itself).
TEST_F(MmuTest, GuestMode_VmmWritesAndFullRingTakeTheVcpuPath) {
  ASSERT_NO_FATAL_FAILURE(make_mmu_with_dirty_ring(4096));  // 256 entries, soft limit 192
  Hva hva = map(256 * kPageSize);
  add_slot(0, kGpa, 256 * kPageSize, hva);
  {
    Vcpu vmm(*mmu_, Mmu::kVmmVcpuId);
    Vcpu::GuestMode gm(vmm);
    ASSERT_TRUE(gm.write_u64(Gpa(kGpa), 1).ok());
    EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa), 2)) << "a VMM write skipped the dirty log";
    uint64_t x = 0;
    EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa), &x));
    EXPECT_EQ(x, 1u);
  }
  ASSERT_TRUE(set_region(0, kGpa, 256 * kPageSize, hva, kMemLogDirtyPages).ok());
  Vcpu& v = vcpu(3);
  Vcpu::GuestMode gm(v);
  VcpuExit ex;
  uint64_t i = 0;
  for (; i < 256; ++i) {
    ex = gm.write_u64(Gpa(kGpa + i * kPageSize), i);
    if (!ex.ok()) break;
  }
  ASSERT_EQ(ex.reason, ExitReason::kDirtyRingFull);
  // Page 0 is mapped writable and dirty, but the ring is soft-full: nothing runs.
  uint64_t x = 0;
  EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa), 5));
  EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa), &x));
  EXPECT_EQ(gm.write_u64(Gpa(kGpa), 5).reason, ExitReason::kDirtyRingFull);
  v.dirty_ring()->harvest([](uint32_t, uint64_t) {});
  ASSERT_TRUE(dirty_->reset_dirty_rings().ok());  // write-protects and flushes: must return
  ASSERT_TRUE(gm.write_u64(Gpa(kGpa), 6).ok());
  EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa), &x));
  EXPECT_EQ(x, 6u);
}

// A flush (here: an invalidation's) waits until a vCPU in guest mode has left it, and the kick
// makes the vCPU leave on its next access: no access that starts after the invalidation
// returned goes through the zapped entry.
TEST_F(MmuTest, GuestMode_FlushKicksTheVcpuAndWaitsForIt) {
  Hva hva = map(4 * kPageSize);
  add_slot(0, kGpa, 4 * kPageSize, hva);
  Vcpu& v = vcpu();
  ASSERT_TRUE(v.write_u64(Gpa(kGpa), 42).ok());
  std::atomic<bool> hitting{false}, invalidated{false};
  std::atomic<uint64_t> hits_after{0};
  std::thread guest([&] {
    Vcpu::GuestMode gm(v);
    uint64_t x = 0;
    for (;;) {
      const bool after = invalidated.load();
      if (!gm.try_read_u64(Gpa(kGpa), &x)) break;
      EXPECT_EQ(x, 42u);
      if (after) hits_after.fetch_add(1);
      hitting.store(true);
    }
  });
  while (!hitting.load()) std::this_thread::yield();
  ASSERT_TRUE(host_.discard(hva, kPageSize).ok());  // zap + flush: must not hang
  invalidated.store(true);
  guest.join();  // the loop ends at the first miss
  EXPECT_EQ(hits_after.load(), 0u) << "a hit through the zapped entry after the invalidation";

  // A vCPU holding guest mode without accessing holds every flush until it leaves.
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + kPageSize), 1).ok());
  std::atomic<bool> entered{false}, release{false}, left{false};
  std::thread idle([&] {
    {
      Vcpu::GuestMode gm(v);
      entered.store(true);
      while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      left.store(true);
    }
  });
  while (!entered.load()) std::this_thread::yield();
  std::atomic<bool> flushed_before_left{false};
  std::thread inval([&] {
    ASSERT_TRUE(host_.discard(hva + kPageSize, kPageSize).ok());
    flushed_before_left.store(!left.load());
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  release.store(true);
  inval.join();
  idle.join();
  EXPECT_FALSE(flushed_before_left.load()) << "the flush did not wait for the guest-mode vCPU";
  EXPECT_EQ(balance_gap(), 0u);
}

// The cached level-2 table of a live GuestMode is never used after the flush that retired it:
// while a vCPU keeps writing in guest mode, another thread retires every table (zap_all) and
// moves the 2M-aligned slot. Under ASan a stale table is a use-after-free; and every write
// that returned must be where the guest reads it back.
TEST_F(MmuTest, GuestMode_CachedTableNeverOutlivesItsRetirement) {
  constexpr uint64_t kSize = 4 * k2M;
  Hva hva = map(kSize);
  add_slot(0, kGpa, kSize, hva);
  Vcpu& v = vcpu();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> gpa_base{kGpa};
  std::atomic<uint64_t> writes{0};
  uint64_t last[4] = {};
  std::thread guest([&] {
    Vcpu::GuestMode gm(v);
    uint64_t value = 0;
    while (!stop.load()) {
      for (unsigned k = 0; k < 4; ++k) {
        const Gpa gpa(gpa_base.load() + k * k2M + 8 * kPageSize);
        ++value;
        if (gm.write_u64(gpa, value).ok()) {
          last[k] = value;
          writes.fetch_add(1);
        }
      }
    }
  });
  for (int round = 0; round < 50; ++round) {
    const uint64_t w = writes.load();
    while (writes.load() < w + 8) std::this_thread::yield();  // hits through the cache
    mmu_->zap_all();
    if (round % 10 == 9) {
      const uint64_t to = (round / 10) % 2 ? kGpa : kGpa + (uint64_t{1} << 30);
      ASSERT_TRUE(set_region(0, to, kSize, hva).ok());  // MOVE: zap + flush, new gpa
      gpa_base.store(to);
    }
  }
  stop.store(true);
  guest.join();
  EXPECT_GE(writes.load(), 400u);
  // The memory behind the slot holds each page's last write, whatever gpa it had then.
  for (unsigned k = 0; k < 4; ++k) {
    uint64_t got = 0;
    ASSERT_TRUE(v.read_u64(Gpa(gpa_base.load() + k * k2M + 8 * kPageSize), &got).ok());
    EXPECT_EQ(got, last[k]) << "page " << k << ": a write through a retired table was lost";
  }
  EXPECT_EQ(balance_gap(), 0u);
}

// The flat level-1 array of a region holds no leaf under a huge leaf: the 4K leaves a split
// made are zeroed when they are unlinked (here when logging is turned off), so a hit never goes
// through one after the 2M leaf is back. Aging the 2M leaf then makes the hit miss; a stale 4K
// entry (still accessed) would let it through without the accessed bit being set again.
TEST_F(MmuTest, GuestMode_FlatArrayHoldsNoLeafUnderAHugeLeaf) {
  MmapOptions o;
  o.backing = PageBacking::kThp;
  Hva hva = map(k2M, kProtRW, VmaKind::kAnonPrivate, o);
  add_slot(0, kGpa, k2M, hva);
  Vcpu& v = vcpu();
  const Gfn g0(kGpa >> kPageShift);
  ASSERT_TRUE(v.write_u64(Gpa(kGpa + 5 * kPageSize), 5).ok());
  ASSERT_EQ(mmu_->lookup(0, g0).level, PgLevel::k2M);
  uint64_t x = 0;
  {
    Vcpu::GuestMode gm(v);
    EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa + 5 * kPageSize), &x)) << "a 2M leaf hits out of line";
    EXPECT_EQ(x, 5u);
  }
  ASSERT_TRUE(set_region(0, kGpa, k2M, hva, kMemLogDirtyPages).ok());  // split: 4K leaves
  ASSERT_EQ(mmu_->lookup(0, g0 + 5).level, PgLevel::k4K);
  {
    Vcpu::GuestMode gm(v);
    EXPECT_TRUE(gm.try_read_u64(Gpa(kGpa + 5 * kPageSize), &x)) << "the split's 4K leaf";
    EXPECT_FALSE(gm.try_write_u64(Gpa(kGpa + 5 * kPageSize), 6)) << "write-protected for logging";
  }
  ASSERT_TRUE(set_region(0, kGpa, k2M, hva, 0).ok());  // zaps the 4K leaves
  ASSERT_TRUE(v.read_u64(Gpa(kGpa + 5 * kPageSize), &x).ok());
  ASSERT_EQ(mmu_->lookup(0, g0 + 5).level, PgLevel::k2M) << "huge mapping came back";
  EXPECT_TRUE(mmu_->clear_young(hva, hva + k2M));
  {
    Vcpu::GuestMode gm(v);
    EXPECT_FALSE(gm.try_read_u64(Gpa(kGpa + 5 * kPageSize), &x))
        << "hit through a 4K entry left in the flat array under the aged 2M leaf";
    ASSERT_TRUE(gm.read_u64(Gpa(kGpa + 5 * kPageSize), &x).ok());
    EXPECT_EQ(x, 5u);
  }
  EXPECT_TRUE(mmu_->test_young(hva, hva + k2M)) << "the read made the 2M leaf young again";
  EXPECT_EQ(balance_gap(), 0u);
}

// A kick never lands in a GuestMode that is gone: one thread creates and destroys GuestModes
// (a few hits each) while another flushes all the time. Under ASan a late kick would be a
// stack use after scope; anywhere, a lost one would hang the flusher.
TEST_F(MmuTest, GuestMode_KicksRaceItsDestruction) {
  Hva hva = map(16 * kPageSize);
  add_slot(0, kGpa, 16 * kPageSize, hva);
  Vcpu& v = vcpu();
  for (uint64_t i = 0; i < 16; ++i) ASSERT_TRUE(v.write_u64(Gpa(kGpa + i * kPageSize), i).ok());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> flushes{0};
  std::thread flusher([&] {
    while (!stop.load()) {
      ASSERT_TRUE(host_.discard(hva + 15 * kPageSize, kPageSize).ok());  // zap + flush
      flushes.fetch_add(1);
    }
  });
  uint64_t modes = 0;
  for (; modes < 20000 || flushes.load() < 200; ++modes) {
    Vcpu::GuestMode gm(v);
    uint64_t x = 0;
    for (uint64_t i = 0; i < 4; ++i) {
      if (gm.try_read_u64(Gpa(kGpa + i * kPageSize), &x)) {
        EXPECT_EQ(x, i);
      }
    }
  }
  stop.store(true);
  flusher.join();
  EXPECT_GE(flushes.load(), 200u);
  EXPECT_EQ(balance_gap(), 0u);
}

}  // namespace
}  // namespace gfnmap::test
