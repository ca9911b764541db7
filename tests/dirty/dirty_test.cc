// gfnmap dirty tests: bitmaps (GET/CLEAR_DIRTY_LOG, manual protect, initially set, prepare
// policy), rings (size errnos, order, soft full, reset batching) and the range view.
#include <gtest/gtest.h>

#include <bit>
#include <cerrno>

#include "dirty/dirty_fixture.h"
#include "gfnmap/dirty.h"

namespace gfnmap {
namespace {

using testing_dirty::RecordingProtector;
using testing_dirty::set_slot;
using testing_dirty::slot_copy;

class DirtyTest : public ::testing::Test {
 protected:
  DirtyTest() : log(slots) { log.set_write_protector(&wp); }

  // The log words of slot `id` (non-manual: fetch-and-clear).
  std::vector<uint64_t> get(uint16_t id) {
    const Memslot s = slot_copy(slots, id);
    std::vector<uint64_t> words(dirty_bitmap_words(s.npages), ~uint64_t{0});
    auto r = log.get_dirty_log(id, words);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : error_to_string(r.error()));
    return words;
  }

  Memslots slots;
  DirtyLog log;
  RecordingProtector wp;
};

uint64_t popcount(const std::vector<uint64_t>& words) {
  uint64_t n = 0;
  for (uint64_t w : words) n += static_cast<uint64_t>(std::popcount(w));
  return n;
}

// ---- Invariant 23: marks.

TEST_F(DirtyTest, Invariant23_MarkSetsBitOnlyInLoggingSlot) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 200, kMemLogDirtyPages).ok());
  ASSERT_TRUE(set_slot(slots, 2, 0x10000000, 200, 0).ok());
  const Memslot logging = slot_copy(slots, 1);
  const Memslot plain = slot_copy(slots, 2);
  log.mark_page_dirty_in_slot(logging, logging.base_gfn + 0);
  log.mark_page_dirty_in_slot(logging, logging.base_gfn + 130);
  log.mark_page_dirty_in_slot(logging, logging.base_gfn + 130);  // twice: one bit
  log.mark_page_dirty_in_slot(logging, logging.base_gfn + 200);  // outside: ignored
  log.mark_page_dirty_in_slot(plain, plain.base_gfn + 3);        // not logging: ignored
  std::vector<uint64_t> words = get(1);
  ASSERT_EQ(words.size(), 4u);
  EXPECT_EQ(words[0], 1u);
  EXPECT_EQ(words[1], 0u);
  EXPECT_EQ(words[2], uint64_t{1} << 2);
  EXPECT_EQ(words[3], 0u);
  std::vector<uint64_t> buf(4);
  EXPECT_EQ(log.get_dirty_log(2, buf).code(), ENOENT);
}

TEST_F(DirtyTest, Invariant23_GetFetchesAndClearsThenWriteProtects) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 300, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  for (uint64_t i : {1u, 2u, 64u, 299u}) log.mark_page_dirty_in_slot(s, s.base_gfn + i);
  std::vector<uint64_t> words(5, 0xdead);
  auto r = log.get_dirty_log(1, words);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 4u);
  EXPECT_EQ(words[0], 0b110u);
  EXPECT_EQ(words[1], 1u);
  EXPECT_EQ(words[4], uint64_t{1} << (299 - 256));
  using Call = RecordingProtector::Call;
  EXPECT_EQ(wp.take(), (std::vector<Call>{{1, s.base_gfn.value, 0b110},
                                          {1, s.base_gfn.value + 64, 1},
                                          {1, s.base_gfn.value + 256, uint64_t{1} << 43}}));
  EXPECT_EQ(wp.flushes, 1);
  // Cleared: the next log is empty and protects nothing.
  EXPECT_EQ(popcount(get(1)), 0u);
  EXPECT_TRUE(wp.take().empty());
  EXPECT_EQ(wp.flushes, 1);
}

TEST_F(DirtyTest, Spec75_GetDirtyLogErrnos) {
  Memslots two(MemslotsConfig{.nr_address_spaces = 2, .nr_user_slots = 100});
  DirtyLog l2(two);
  ASSERT_TRUE(set_slot(two, 5, 0x100000, 64, kMemLogDirtyPages).ok());
  ASSERT_TRUE(set_slot(two, 6, 0x200000, 64, 0).ok());
  std::vector<uint64_t> buf(1);
  EXPECT_TRUE(l2.get_dirty_log(5, buf).ok());
  EXPECT_EQ(l2.get_dirty_log(dirty_log_slot(2, 5), buf).code(), EINVAL);  // as_id >= 2
  EXPECT_EQ(l2.get_dirty_log(100, buf).code(), EINVAL);                   // id >= user slots
  EXPECT_EQ(l2.get_dirty_log(dirty_log_slot(1, 5), buf).code(), ENOENT);  // other AS: absent
  EXPECT_EQ(l2.get_dirty_log(7, buf).code(), ENOENT);                     // absent
  EXPECT_EQ(l2.get_dirty_log(6, buf).code(), ENOENT);                     // not logging
  EXPECT_EQ(l2.get_dirty_log(5, std::span<uint64_t>()).code(), EFAULT);   // buffer too small
  // One address space: as_id 1 is EINVAL (as on x86 without SMM).
  std::vector<uint64_t> b2(1);
  EXPECT_EQ(log.get_dirty_log(dirty_log_slot(1, 0), b2).code(), EINVAL);
  EXPECT_EQ(log.get_dirty_log(kUserMemSlots, b2).code(), EINVAL);
}

TEST_F(DirtyTest, Spec75_GetBufferTooSmallClearsNothing) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 128, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  log.mark_page_dirty_in_slot(s, s.base_gfn + 100);
  std::vector<uint64_t> small(1);
  EXPECT_EQ(log.get_dirty_log(1, small).code(), EFAULT);
  EXPECT_EQ(get(1)[1], uint64_t{1} << 36);
}

TEST_F(DirtyTest, Spec75_ManualProtectGetCopiesWithoutClearing) {
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  EXPECT_TRUE(log.manual_protect());
  EXPECT_FALSE(log.initially_set());
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 64, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  log.mark_page_dirty_in_slot(s, s.base_gfn + 7);
  EXPECT_EQ(get(1)[0], 1u << 7);
  EXPECT_EQ(get(1)[0], 1u << 7);  // still there
  EXPECT_TRUE(wp.take().empty());
  EXPECT_EQ(wp.batches, 0);
  EXPECT_EQ(log.enable_manual_dirty_log_protect(4).code(), EINVAL);
  // INITIALLY_SET is only valid with MANUAL_PROTECT_ENABLE (the cap's allowed options).
  EXPECT_EQ(log.enable_manual_dirty_log_protect(kDirtyLogInitiallySet).code(), EINVAL);
  EXPECT_TRUE(log.manual_protect());  // a refused call changes nothing
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(0).ok());  // off again: fetch-and-clear
  EXPECT_EQ(get(1)[0], 1u << 7);
  EXPECT_EQ(get(1)[0], 0u);
}

TEST_F(DirtyTest, Spec74_InitiallySetBitmapIsAllOnesWithinTheSlot) {
  ASSERT_TRUE(
      log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable | kDirtyLogInitiallySet)
          .ok());
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 100, kMemLogDirtyPages).ok());
  std::vector<uint64_t> w = get(1);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0], ~uint64_t{0});
  EXPECT_EQ(w[1], (uint64_t{1} << 36) - 1);  // pages 64..99 only
}

TEST_F(DirtyTest, Spec74_PreparePolicyFreshReusedDropped) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 64, 0).ok());
  EXPECT_EQ(log.bitmap_bytes(), 0u);
  // Newly on: fresh (FLAGS_ONLY).
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 64, kMemLogDirtyPages).ok());
  EXPECT_EQ(log.bitmap_bytes(), 8u);
  Memslot s = slot_copy(slots, 1);
  log.mark_page_dirty_in_slot(s, s.base_gfn + 3);
  // MOVE with logging kept on: the bitmap is reused (the bit survives).
  ASSERT_TRUE(set_slot(slots, 1, 0x400000, 64, kMemLogDirtyPages, s.userspace_addr.value).ok());
  std::vector<uint64_t> buf(1);
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  ASSERT_TRUE(log.get_dirty_log(1, buf).ok());
  EXPECT_EQ(buf[0], 1u << 3);
  // Off: dropped.
  ASSERT_TRUE(set_slot(slots, 1, 0x400000, 64, 0, s.userspace_addr.value).ok());
  EXPECT_EQ(log.get_dirty_log(1, buf).code(), ENOENT);
  EXPECT_EQ(log.bitmap_bytes(), 0u);
  // On again: fresh, the old bit is gone.
  ASSERT_TRUE(set_slot(slots, 1, 0x400000, 64, kMemLogDirtyPages, s.userspace_addr.value).ok());
  ASSERT_TRUE(log.get_dirty_log(1, buf).ok());
  EXPECT_EQ(buf[0], 0u);
  // DELETE: dropped.
  ASSERT_TRUE(set_slot(slots, 1, 0x400000, 0, 0, s.userspace_addr.value).ok());
  EXPECT_EQ(log.bitmap_bytes(), 0u);
  EXPECT_EQ(log.get_dirty_log(1, buf).code(), ENOENT);
}

TEST_F(DirtyTest, Spec74_StaleSlotMarkAfterDeleteIsHarmless) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 1000, kMemLogDirtyPages).ok());
  const Memslot old = slot_copy(slots, 1);
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 0, 0).ok());
  log.mark_page_dirty_in_slot(old, old.base_gfn + 900);  // no bitmap: dropped
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 10, kMemLogDirtyPages).ok());
  log.mark_page_dirty_in_slot(old, old.base_gfn + 900);  // beyond the new bitmap: dropped
  EXPECT_EQ(popcount(get(1)), 0u);
}

// ---- CLEAR_DIRTY_LOG.

TEST_F(DirtyTest, Spec75_ClearDirtyLogErrnos) {
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 200, kMemLogDirtyPages).ok());
  ASSERT_TRUE(set_slot(slots, 2, 0x10000000, 64, 0).ok());
  std::vector<uint64_t> m(4, ~uint64_t{0});
  EXPECT_EQ(log.clear_dirty_log(dirty_log_slot(1, 1), 0, 64, m).code(), EINVAL);  // as_id
  EXPECT_EQ(log.clear_dirty_log(kUserMemSlots, 0, 64, m).code(), EINVAL);          // id
  EXPECT_EQ(log.clear_dirty_log(1, 32, 64, m).code(), EINVAL);    // first_page % 64
  EXPECT_EQ(log.clear_dirty_log(9, 0, 64, m).code(), ENOENT);     // absent
  EXPECT_EQ(log.clear_dirty_log(2, 0, 64, m).code(), ENOENT);     // not logging
  EXPECT_EQ(log.clear_dirty_log(9, 32, 64, m).code(), EINVAL);    // alignment before lookup
  EXPECT_EQ(log.clear_dirty_log(1, 256, 0, m).code(), EINVAL);    // first_page > npages
  EXPECT_EQ(log.clear_dirty_log(1, 128, 128, m).code(), EINVAL);  // runs past the end
  EXPECT_EQ(log.clear_dirty_log(1, 0, 100, m).code(), EINVAL);    // % 64, not at the end
  EXPECT_EQ(log.clear_dirty_log(1, 0, 64, std::span<const uint64_t>()).code(), EFAULT);
  // Valid: multiple of 64, ends at the slot end, first_page == npages with 0 pages.
  EXPECT_TRUE(log.clear_dirty_log(1, 0, 128, m).ok());
  EXPECT_TRUE(log.clear_dirty_log(1, 128, 72, m).ok());
  EXPECT_TRUE(log.clear_dirty_log(1, 0, 200, m).ok());
  EXPECT_TRUE(log.clear_dirty_log(1, 192, 8, m).ok());
  EXPECT_EQ(log.clear_dirty_log(1, 200, 0, m).code(), EINVAL);  // at the end, but 200 % 64
  // first_page == npages with 0 pages is valid when npages is a multiple of 64.
  ASSERT_TRUE(set_slot(slots, 3, 0x20000000, 128, kMemLogDirtyPages).ok());
  EXPECT_TRUE(log.clear_dirty_log(3, 128, 0, m).ok());
  EXPECT_EQ(log.clear_dirty_log(3, 192, 0, m).code(), EINVAL);  // first_page > npages
}

TEST_F(DirtyTest, Invariant23_ClearClearsExactlyMaskAndOld) {
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 100, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  for (uint64_t i : {0u, 1u, 5u, 64u, 70u, 99u}) log.mark_page_dirty_in_slot(s, s.base_gfn + i);
  // Mask: bits 1, 2 (2 is clean), 70, 71 (clean) and every bit beyond the slot end.
  const uint64_t beyond = ~((uint64_t{1} << 36) - 1);
  std::vector<uint64_t> mask = {0b110, (uint64_t{1} << 6) | (uint64_t{1} << 7) | beyond};
  auto r = log.clear_dirty_log(1, 0, 100, mask);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 2u);  // pages 1 and 70
  using Call = RecordingProtector::Call;
  EXPECT_EQ(wp.take(), (std::vector<Call>{{1, s.base_gfn.value, 0b10},
                                          {1, s.base_gfn.value + 64, uint64_t{1} << 6}}));
  EXPECT_EQ(wp.flushes, 1);
  std::vector<uint64_t> w = get(1);
  EXPECT_EQ(w[0], 0b100001u);
  EXPECT_EQ(w[1], 1u | (uint64_t{1} << 35));  // pages 64 and 99 stay dirty
  // Clearing clean bits reports nothing and protects nothing.
  std::vector<uint64_t> clean = {0b11000, 0};
  EXPECT_EQ(*log.clear_dirty_log(1, 0, 100, clean), 0u);
  EXPECT_TRUE(wp.take().empty());
}

TEST_F(DirtyTest, Spec75_ClearWithFirstPageOffsetsTheMask) {
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 256, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  log.mark_page_dirty_in_slot(s, s.base_gfn + 130);
  std::vector<uint64_t> mask = {uint64_t{1} << 2};
  EXPECT_EQ(*log.clear_dirty_log(1, 128, 64, mask), 1u);
  EXPECT_EQ(popcount(get(1)), 0u);
}

// ---- Dirty rings.

TEST(DirtyRingTest, Spec75_RingSizeErrnos) {
  Memslots slots;
  DirtyLog log(slots);
  EXPECT_EQ(log.enable_dirty_ring(0).code(), EINVAL);
  EXPECT_EQ(log.enable_dirty_ring(4096 + 16).code(), EINVAL);      // not a power of two
  EXPECT_EQ(log.enable_dirty_ring(2048).code(), EINVAL);           // below one page
  EXPECT_EQ(log.enable_dirty_ring(2u << 20).code(), E2BIG);        // 131072 entries
  EXPECT_TRUE(log.enable_dirty_ring(1u << 20).ok());               // 65536 entries: the max
  EXPECT_EQ(log.enable_dirty_ring(4096).code(), EINVAL);           // only once
  EXPECT_EQ(log.dirty_ring_size_bytes(), 1u << 20);

  Memslots slots2;
  DirtyLog late(slots2);
  ASSERT_TRUE(late.create_vcpu(0).ok());
  EXPECT_EQ(late.enable_dirty_ring(4096).code(), EINVAL);  // a vCPU exists
  EXPECT_EQ(late.create_vcpu(0).code(), EEXIST);

  // The reserved area counts the arch entries: (64 + 512) * 16 = 9216 bytes.
  Memslots slots3;
  DirtyLog pml(slots3, DirtyLogConfig{.ring_arch_reserved_entries = 512});
  EXPECT_EQ(pml.enable_dirty_ring(8192).code(), EINVAL);
  EXPECT_TRUE(pml.enable_dirty_ring(16384).ok());
  auto ring = pml.create_vcpu(3);
  ASSERT_TRUE(ring.ok());
  ASSERT_NE(*ring, nullptr);
  EXPECT_EQ((*ring)->size(), 1024u);
  EXPECT_EQ((*ring)->soft_limit(), 1024u - 576u);
}

class DirtyRingFixture : public ::testing::Test {
 protected:
  DirtyRingFixture() : log(slots) {
    log.set_write_protector(&wp);
    EXPECT_TRUE(log.enable_dirty_ring(4096).ok());  // 256 entries, soft limit 192
    EXPECT_TRUE(set_slot(slots, 1, 0x100000, 1024, kMemLogDirtyPages).ok());
    EXPECT_TRUE(set_slot(slots, 2, 0x10000000, 1024, kMemLogDirtyPages).ok());
    a = slot_copy(slots, 1);
    b = slot_copy(slots, 2);
    r0 = *log.create_vcpu(0);
    r1 = *log.create_vcpu(1);
  }
  std::vector<std::pair<uint32_t, uint64_t>> harvest(DirtyRing* r) {
    std::vector<std::pair<uint32_t, uint64_t>> out;
    r->harvest([&](uint32_t slot, uint64_t offset) { out.emplace_back(slot, offset); });
    return out;
  }

  Memslots slots;
  DirtyLog log;
  RecordingProtector wp;
  Memslot a, b;
  DirtyRing* r0 = nullptr;
  DirtyRing* r1 = nullptr;
};

TEST_F(DirtyRingFixture, Invariant23_RingEntriesInWriteOrderPerVcpu) {
  log.mark_page_dirty_in_slot(a, a.base_gfn + 9, r0);
  log.mark_page_dirty_in_slot(b, b.base_gfn + 1, r1);
  log.mark_page_dirty_in_slot(a, a.base_gfn + 2, r0);
  log.mark_page_dirty_in_slot(b, b.base_gfn + 7, r0);
  log.mark_page_dirty_in_slot(a, a.base_gfn + 9, r0);  // rings do not dedupe
  using V = std::vector<std::pair<uint32_t, uint64_t>>;
  EXPECT_EQ(harvest(r0), (V{{1, 9}, {1, 2}, {2, 7}, {1, 9}}));
  EXPECT_EQ(harvest(r1), (V{{2, 1}}));
  EXPECT_TRUE(harvest(r0).empty());
  EXPECT_EQ(log.vcpu_ring(0), r0);
  EXPECT_EQ(log.vcpu_ring(7), nullptr);
  // Ring entries carry as_id << 16 | id.
  EXPECT_EQ(dirty_log_slot(1, 5), 0x10005u);
}

TEST_F(DirtyRingFixture, Invariant23_SoftFullForcesExitUntilReset) {
  ASSERT_EQ(r0->soft_limit(), 192u);
  for (uint64_t i = 0; i < 191; ++i) {
    EXPECT_FALSE(log.mark_page_dirty_in_slot(a, a.base_gfn + i, r0)) << i;
  }
  EXPECT_TRUE(log.mark_page_dirty_in_slot(a, a.base_gfn + 191, r0));  // the 192nd push
  EXPECT_TRUE(r0->soft_full());
  EXPECT_FALSE(r1->soft_full());
  // Harvesting alone does not free the ring; the reset does.
  EXPECT_EQ(harvest(r0).size(), 192u);
  EXPECT_TRUE(r0->soft_full());
  auto n = log.reset_dirty_rings();
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 192u);
  EXPECT_FALSE(r0->soft_full());
  EXPECT_EQ(r0->used(), 0u);
  // Consecutive offsets are re-protected in 64-gfn windows: 3 calls.
  using Call = RecordingProtector::Call;
  EXPECT_EQ(wp.take(), (std::vector<Call>{{1, a.base_gfn.value, ~uint64_t{0}},
                                          {1, a.base_gfn.value + 64, ~uint64_t{0}},
                                          {1, a.base_gfn.value + 128, ~uint64_t{0}}}));
  // Past the soft limit the ring keeps the entries (up to its size), then drops.
  for (uint64_t i = 0; i < 256; ++i) log.mark_page_dirty_in_slot(a, a.base_gfn + i, r0);
  EXPECT_EQ(r0->used(), 256u);
  EXPECT_EQ(r0->dropped(), 0u);
  log.mark_page_dirty_in_slot(a, a.base_gfn, r0);
  EXPECT_EQ(r0->dropped(), 1u);
  // Wraps around after harvest + reset.
  EXPECT_EQ(harvest(r0).size(), 256u);
  EXPECT_EQ(*log.reset_dirty_rings(), 256u);
  log.mark_page_dirty_in_slot(b, b.base_gfn + 5, r0);
  using V = std::vector<std::pair<uint32_t, uint64_t>>;
  EXPECT_EQ(harvest(r0), (V{{2, 5}}));
}

TEST_F(DirtyRingFixture, Spec75_ResetBatchesPerSlotWithin64GfnWindow) {
  for (uint64_t off : {5u, 3u, 70u, 6u}) log.mark_page_dirty_in_slot(a, a.base_gfn + off, r0);
  log.mark_page_dirty_in_slot(b, b.base_gfn + 5, r0);
  log.mark_page_dirty_in_slot(a, a.base_gfn + 7, r0);
  log.mark_page_dirty_in_slot(a, a.base_gfn + 8, r1);  // not harvested: not reset
  ASSERT_EQ(harvest(r0).size(), 6u);
  auto n = log.reset_dirty_rings();
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 6u);
  const uint64_t A = a.base_gfn.value;
  const uint64_t B = b.base_gfn.value;
  using Call = RecordingProtector::Call;
  // 5 then 3: the window slides down to 3 (bits 0 and 2); 70 is 67 away: new window; 6 is 64
  // below 70: new window; slot change flushes.
  EXPECT_EQ(wp.take(), (std::vector<Call>{{1, A + 3, 0b101},
                                          {1, A + 70, 1},
                                          {1, A + 6, 1},
                                          {2, B + 5, 1},
                                          {1, A + 7, 1}}));
  EXPECT_EQ(r1->used(), 1u);
  ASSERT_EQ(harvest(r1).size(), 1u);
  EXPECT_EQ(*log.reset_dirty_rings(), 1u);
}

TEST_F(DirtyRingFixture, Spec75_ResetStopsAtUnharvestedAndSkipsGoneSlots) {
  log.mark_page_dirty_in_slot(b, b.base_gfn + 1, r0);
  log.mark_page_dirty_in_slot(a, a.base_gfn + 1, r0);
  // The VMM harvests only the first entry by hand (the raw mmapped view).
  auto entries = r0->entries();
  ASSERT_EQ(entries[0].flags.load(), kDirtyGfnDirty);
  entries[0].flags.store(kDirtyGfnReset);
  ASSERT_TRUE(set_slot(slots, 2, 0x10000000, 0, 0).ok());  // slot 2 deleted meanwhile
  EXPECT_EQ(*log.reset_dirty_rings(), 1u);
  EXPECT_TRUE(wp.take().empty());  // its gfn is skipped, nothing to protect
  EXPECT_EQ(r0->used(), 1u);
  EXPECT_EQ(entries[0].flags.load(), 0u);
}

TEST_F(DirtyRingFixture, Spec75_RingOnlyModeHasNoBitmaps) {
  std::vector<uint64_t> buf(16);
  EXPECT_EQ(log.get_dirty_log(1, buf).code(), ENXIO);
  EXPECT_EQ(log.clear_dirty_log(1, 0, 64, buf).code(), ENXIO);
  EXPECT_FALSE(log.uses_bitmaps());
  // A write without a vCPU has nowhere to go: dropped, nothing crashes.
  log.mark_page_dirty_in_slot(a, a.base_gfn + 1);
  EXPECT_EQ(r0->used(), 0u);
  // WITH_BITMAP needs empty memslots.
  EXPECT_EQ(log.enable_dirty_ring_with_bitmap().code(), EINVAL);
}

TEST(DirtyRingTest, Spec75_ResetWithoutRingIsEinval) {
  Memslots slots;
  DirtyLog log(slots);
  EXPECT_EQ(log.reset_dirty_rings().code(), EINVAL);
  EXPECT_EQ(log.enable_dirty_ring_with_bitmap().code(), EINVAL);  // no ring
  auto ring = log.create_vcpu(0);
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(*ring, nullptr);
}

TEST(DirtyRingTest, Spec75_RingWithBitmapLogsWritesWithoutVcpu) {
  Memslots slots;
  DirtyLog log(slots);
  ASSERT_TRUE(log.enable_dirty_ring(4096).ok());
  ASSERT_TRUE(log.enable_dirty_ring_with_bitmap().ok());
  EXPECT_TRUE(log.uses_bitmaps());
  DirtyRing* ring = *log.create_vcpu(0);
  ASSERT_TRUE(set_slot(slots, 1, 0x100000, 64, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 1);
  log.mark_page_dirty_in_slot(s, s.base_gfn + 4, ring);  // vCPU write: ring
  log.mark_page_dirty_in_slot(s, s.base_gfn + 9);        // VMM write: bitmap
  std::vector<uint64_t> buf(1);
  ASSERT_TRUE(log.get_dirty_log(1, buf).ok());
  EXPECT_EQ(buf[0], 1u << 9);
  EXPECT_EQ(ring->used(), 1u);
}

TEST(DirtyRingTest, BadInput_DirectRingSizeIsRoundedDownToAPowerOfTwo) {
  DirtyRing ring(2, 100, 16);  // 64 entries, soft limit 48
  EXPECT_EQ(ring.size(), 64u);
  EXPECT_EQ(ring.soft_limit(), 48u);
  for (uint32_t i = 0; i < 64; ++i) EXPECT_TRUE(ring.push(1, i));
  EXPECT_FALSE(ring.push(1, 64));  // completely full: dropped, no overrun
  EXPECT_EQ(ring.dropped(), 1u);
  uint64_t next = 0;
  EXPECT_EQ(ring.harvest([&](uint32_t, uint64_t offset) { EXPECT_EQ(offset, next++); }), 64u);
  DirtyRing empty(3, 0, 64);
  EXPECT_FALSE(empty.push(1, 0));
  EXPECT_EQ(empty.harvest([](uint32_t, uint64_t) {}), 0u);
}

// ---- Range view.

TEST(DirtyRangesTest, RangesMergeRunsAndIgnoreBitsBeyondNpages) {
  std::vector<uint64_t> words = {0, 0};
  EXPECT_TRUE(dirty_bitmap_to_ranges(Gfn(0x100), words, 128).empty());
  words = {0b1110'0001, ~uint64_t{0}};
  words[0] |= uint64_t{1} << 63;
  auto r = dirty_bitmap_to_ranges(Gfn(0x100), words, 100);
  std::vector<DirtyRange> want = {{gfn_to_gpa(Gfn(0x100)), kPageSize},
                                  {gfn_to_gpa(Gfn(0x105)), 3 * kPageSize},
                                  {gfn_to_gpa(Gfn(0x100 + 63)), (100 - 63) * kPageSize}};
  EXPECT_EQ(r, want);
}

}  // namespace
}  // namespace gfnmap
