// gfnmap memslot tests: every row of KVM_SET_USER_MEMORY_REGION's check table (spec 7.4) with
// its errno, their order, the change kinds, address spaces and slot limits (invariant 21).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <optional>
#include <thread>

#include "memslot/srcu.h"
#include "memslot/test_peer.h"
#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

using test::kHvaBase;
using test::region;
using test::snapshot;

constexpr uint64_t kMiB = 1 << 20;

// Rows 1 (-EIO, VM dead) and 2 (-EFAULT, copy_from_user) have no counterpart in a library call.

TEST(MemslotChecks, Row03_V1IoctlRejectsFlagsOutsideLogDirtyReadonly_EINVAL) {
  MemslotsConfig config;
  config.private_mem = true;  // GUEST_MEMFD would be allowed by the later flag check
  Memslots slots(config);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd)),
                       EINVAL, "v1 takes only LOG_DIRTY_PAGES|READONLY");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, 1u << 7)), EINVAL,
                       "v1 takes only");
  // The same flags through REGION2 pass this check (and GUEST_MEMFD is then accepted).
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd),
                                            RegionIoctl::kV2),
                    MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, kMiB, kMiB, kHvaBase + kMiB,
                                                   kMemLogDirtyPages | kMemReadonly)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, Row04_SlotIdNotBelowUserSlots_EINVAL) {
  Memslots slots;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(40000, 0, kMiB)), EINVAL,
                       "slot id 40000 >= 32764 user slots");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(kUserMemSlots, 0, kMiB)), EINVAL,
                       "slot id 32764 >= 32764 user slots");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(kUserMemSlots - 1, 0, kMiB)),
                    MemslotChange::kCreate);
  // Only bits 0..15 are the id: as_id bits do not make it larger.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(kUserMemSlots, 0, kMiB, kHvaBase, 0, 1)),
                       EINVAL, "slot id 32764 >= 32764 user slots");
}

TEST(MemslotChecks, Row05_FlagsNotInAllowedSet_EINVAL) {
  {
    MemslotsConfig config;
    config.readonly_mem = false;
    Memslots slots(config);
    EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemReadonly)),
                         EINVAL, "READONLY needs read-only memory support");
  }
  Memslots plain;  // no private memory
  EXPECT_MEMSLOT_ERROR(plain.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd),
                                               RegionIoctl::kV2),
                       EINVAL, "GUEST_MEMFD needs a VM with private memory");
  EXPECT_MEMSLOT_ERROR(plain.set_memory_region(region(0, 0, kMiB, kHvaBase, 1u << 9),
                                               RegionIoctl::kV2),
                       EINVAL, "unknown flag bits");
  EXPECT_MEMSLOT_ERROR(plain.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemslotInvalid),
                                               RegionIoctl::kV2),
                       EINVAL, "unknown flag bits");

  MemslotsConfig config;
  config.private_mem = true;
  Memslots priv(config);
  EXPECT_MEMSLOT_ERROR(
      priv.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd | kMemLogDirtyPages),
                             RegionIoctl::kV2),
      EINVAL, "LOG_DIRTY_PAGES with GUEST_MEMFD");
  EXPECT_MEMSLOT_ERROR(
      priv.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd | kMemReadonly),
                             RegionIoctl::kV2),
      EINVAL, "READONLY with GUEST_MEMFD");
}

TEST(MemslotChecks, Row06_MemorySizeNotPageAligned_EINVAL) {
  Memslots slots;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB + 1)), EINVAL,
                       "memory_size 0x100001 is not a multiple of the page size");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, 0x800)), EINVAL,
                       "not a multiple of the page size");
  // (The "does not fit unsigned long" half of the row cannot happen on LP64.)
}

TEST(MemslotChecks, Row07_GuestPhysAddrNotPageAligned_EINVAL) {
  Memslots slots;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0x1234, kMiB)), EINVAL,
                       "guest_phys_addr 0x1234 is not page aligned");
}

TEST(MemslotChecks, Row08_UserspaceAddrUnalignedOrNotUserMemory_EINVAL) {
  Memslots slots;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase + 8)), EINVAL,
                       "userspace_addr 0x7f0000000008 is not page aligned");
  // access_ok: [hva, hva + size) must lie below the task size.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, 2 * kPageSize, kTaskSizeMax - kPageSize)),
                       EINVAL, "is not user memory");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kPageSize, kPageOffset)), EINVAL,
                       "is not user memory");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kTaskSizeMax + kPageSize, 0)),
                       EINVAL, "is not user memory");
  // Exactly up to the task size is fine.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kPageSize, kTaskSizeMax - kPageSize)),
                    MemslotChange::kCreate);
  // A smaller configured task size moves the limit.
  MemslotsConfig config;
  config.task_size = uint64_t{1} << 32;
  Memslots small(config);
  EXPECT_MEMSLOT_ERROR(small.set_memory_region(region(0, 0, kPageSize, uint64_t{1} << 32)),
                       EINVAL, "task size 0x100000000");
}

TEST(MemslotChecks, Row09_GuestMemfdOffsetUnalignedOrOverflowing_EINVAL) {
  MemslotsConfig config;
  config.private_mem = true;
  Memslots slots(config);
  auto r = region(0, 0, kMiB, kHvaBase, kMemGuestMemfd);
  r.guest_memfd_offset = 0x10;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(r, RegionIoctl::kV2), EINVAL,
                       "guest_memfd_offset 0x10 is unaligned or overflows");
  r.guest_memfd_offset = ~uint64_t{0} & kPageMask;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(r, RegionIoctl::kV2), EINVAL,
                       "is unaligned or overflows");
  // Without GUEST_MEMFD the offset is not looked at.
  auto plain = region(0, 0, kMiB);
  plain.guest_memfd_offset = 0x10;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(plain, RegionIoctl::kV2), MemslotChange::kCreate);
}

TEST(MemslotChecks, Row10_AddressSpaceOutOfRange_EINVAL) {
  Memslots one;  // 1 address space (x86 without SMM)
  EXPECT_MEMSLOT_ERROR(one.set_memory_region(region(0, 0, kMiB, kHvaBase, 0, 1)), EINVAL,
                       "address space 1 >= 1 address spaces");
  MemslotsConfig config;
  config.nr_address_spaces = 2;
  Memslots two(config);
  ASSERT_MEMSLOT_OK(two.set_memory_region(region(0, 0, kMiB, kHvaBase, 0, 1)),
                    MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(two.set_memory_region(region(0, 0, kMiB, kHvaBase, 0, 2)), EINVAL,
                       "address space 2 >= 2 address spaces");
  // The "id >= KVM_MEM_SLOTS_NUM" half guards KVM's internal slots: a user id never reaches it,
  // because even nr_user_slots == KVM_MEM_SLOTS_NUM stops every larger id at row 4.
  MemslotsConfig all;
  all.nr_user_slots = kMemSlotsNum;
  Memslots max(all);
  EXPECT_MEMSLOT_ERROR(max.set_memory_region(region(kMemSlotsNum, 0, kMiB)), EINVAL,
                       "slot id 32767 >= 32767 user slots");
  ASSERT_MEMSLOT_OK(max.set_memory_region(region(kMemSlotsNum - 1, 0, kMiB)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, Row11_GuestPhysAddrPlusSizeWraps_EINVAL) {
  Memslots slots;
  const uint64_t top = ~uint64_t{0} & kPageMask;  // the last page of the gpa space
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, top, 2 * kPageSize)), EINVAL,
                       "guest_phys_addr 0xfffffffffffff000 + memory_size 0x2000 wraps");
  // Ending exactly at 2^64 wraps to 0 too (the kernel's test is `gpa + size < gpa`).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, top, kPageSize)), EINVAL, "wraps");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, top - kPageSize, kPageSize)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, Row12_MoreThanMaxNrPages_EINVAL) {
  Memslots slots;
  const uint64_t too_many = (kMemMaxNrPages + 1) * kPageSize;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, too_many, 0x1000)), EINVAL,
                       "2147483648 pages > KVM_MEM_MAX_NR_PAGES (2147483647)");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMemMaxNrPages * kPageSize, 0x1000)),
                    MemslotChange::kCreate);
  EXPECT_EQ(slots.nr_memslot_pages(), kMemMaxNrPages);
}

TEST(MemslotChecks, Row13_DeleteOfAbsentSlot_EINVAL) {
  Memslots slots;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(5, 0, 0)), EINVAL,
                       "DELETE of slot 5 in address space 0, which does not exist");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(5, 0, kMiB)), MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(5, 0, 0)), MemslotChange::kDelete);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(5, 0, 0)), EINVAL, "does not exist");
}

TEST(MemslotChecks, Row14_CreateOverflowingVmPageTotal_EINVAL) {
  Memslots slots;
  detail::MemslotsTestPeer::set_nr_memslot_pages(slots, ~uint64_t{0} - 10);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, 16 * kPageSize)), EINVAL,
                       "VM-wide page total 18446744073709551605 + 16 overflows");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, 10 * kPageSize)),
                    MemslotChange::kCreate);
  EXPECT_EQ(slots.nr_memslot_pages(), ~uint64_t{0});
}

TEST(MemslotChecks, Row15_ModifyWithGuestMemfd_EINVAL) {
  MemslotsConfig config;
  config.private_mem = true;
  Memslots slots(config);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd),
                                            RegionIoctl::kV2),
                    MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 4 * kMiB, kMiB, kHvaBase, kMemGuestMemfd),
                                               RegionIoctl::kV2),
                       EINVAL, "GUEST_MEMFD slots cannot be modified");
  // Even the identical region: the immutability check comes before the no-op test.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, kMemGuestMemfd),
                                               RegionIoctl::kV2),
                       EINVAL, "GUEST_MEMFD slots cannot be modified");
  // Nor can it shed the flag: a MOVE or FLAGS_ONLY without GUEST_MEMFD is a modification too
  // (fuzz/corpus/memslot/gmem-slot-sheds-flag).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, 0), RegionIoctl::kV1),
                       EINVAL, "GUEST_MEMFD slots cannot be modified");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 4 * kMiB, kMiB, kHvaBase,
                                                      kMemLogDirtyPages), RegionIoctl::kV2),
                       EINVAL, "GUEST_MEMFD slots cannot be modified");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, 0), RegionIoctl::kV2),
                    MemslotChange::kDelete);
}

TEST(MemslotChecks, Row16_ModifyDifferentHvaNpagesOrReadonly_EINVAL) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemLogDirtyPages)),
                    MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, kMiB, kHvaBase + kMiB)), EINVAL,
                       "exists with userspace_addr 0x7f0000000000, not 0x7f0000100000");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, 2 * kMiB, kHvaBase)), EINVAL,
                       "exists with 256 pages, not 512 (slots cannot be resized)");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemReadonly)),
                       EINVAL, "READONLY cannot be toggled");
  // A MOVE that also changes the hva is still this row, not a MOVE.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 8 * kMiB, kMiB, kHvaBase + kMiB)),
                       EINVAL, "userspace_addr");
  const auto s = snapshot(slots);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].flags, kMemLogDirtyPages);
}

TEST(MemslotChecks, Row17_ModifyIdentical_NoOpReturnsNullopt) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemReadonly)),
                    MemslotChange::kCreate);
  const uint64_t gen = slots.generation(0);
  const auto before = snapshot(slots);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemReadonly)),
                    std::nullopt);
  EXPECT_EQ(slots.generation(0), gen) << "a no-op must not swap";
  EXPECT_EQ(snapshot(slots), before);
}

TEST(MemslotChecks, Row18_CreateOrMoveOverlappingAnotherSlot_EEXIST) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0x100000, 0x100000, kHvaBase)),
                    MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0x300000, 0x100000, kHvaBase + kMiB)),
                    MemslotChange::kCreate);
  // CREATE overlapping the start, the end, the inside, and covering slot 0.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, 0x0ff000, 0x2000, kHvaBase)), EEXIST,
                       "gfns [0xff, 0x101) of slot 2 overlap slot 0 [0x100, 0x200)");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, 0x1ff000, 0x2000)), EEXIST, "slot 0");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, 0x180000, 0x1000)), EEXIST, "slot 0");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, 0x000000, 0x1000000)), EEXIST,
                       "overlap slot");
  // Adjacent is fine.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(2, 0x200000, 0x100000, kHvaBase + 2 * kMiB)),
                    MemslotChange::kCreate);
  // MOVE onto another slot: EEXIST; MOVE overlapping only its own old range: fine.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0x280000, 0x100000, kHvaBase + kMiB)),
                       EEXIST, "of slot 1 overlap slot 2");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0x380000, 0x100000, kHvaBase + kMiB)),
                    MemslotChange::kMove);
  // Slots may share host memory (hva): only gfns must not overlap.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, 0x800000, 0x100000, kHvaBase)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, Row19_AllocationFailure_ENOMEM) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB)), MemslotChange::kCreate);
  const auto before = snapshot(slots);
  const uint64_t gen = slots.generation(0);
  detail::MemslotsTestPeer::fail_set_allocations(1);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, kMiB, kMiB, kHvaBase + kMiB)), ENOMEM,
                       "out of memory");
  // DELETE builds both its sets (INVALID copy, final) before publishing either.
  detail::MemslotsTestPeer::fail_set_allocations(1);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, 0)), ENOMEM, "out of memory");
  detail::MemslotsTestPeer::fail_set_allocations(0);
  EXPECT_EQ(snapshot(slots), before);
  EXPECT_EQ(slots.generation(0), gen);
  EXPECT_EQ(slots.nr_memslot_pages(), kMiB / kPageSize);
}

class RejectingListener : public MemslotListener {
 public:
  Result<void> prepare_memory_region(const Memslot*, const Memslot*, MemslotChange) override {
    return make_error(ERANGE, "gfn beyond the MMU's max gfn");
  }
};

TEST(MemslotChecks, Row20_ArchPrepareRejects_ItsErrno) {
  Memslots slots;
  RejectingListener reject;
  slots.add_listener(&reject);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB)), ERANGE,
                       "gfn beyond the MMU's max gfn");
  EXPECT_TRUE(snapshot(slots).empty());
  EXPECT_EQ(slots.nr_memslot_pages(), 0u);
}

// ---------------------------------------------------------------------------------------------
// Order: an input failing two checks gets the earlier check's error.

TEST(MemslotChecks, Order_EarlierCheckWins) {
  MemslotsConfig config;
  config.readonly_mem = false;
  Memslots slots(config);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB)), MemslotChange::kCreate);
  // v1 flags (row 3) before slot id (row 4).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(40000, 0, kMiB, kHvaBase, kMemGuestMemfd)),
                       EINVAL, "v1 takes only");
  // Slot id (4) before flags (5).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(40000, 0, kMiB, kHvaBase, kMemReadonly)),
                       EINVAL, "slot id 40000");
  // Flags (5) before size alignment (6).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, 123, kHvaBase, kMemReadonly)), EINVAL,
                       "READONLY needs");
  // Size (6) before gpa (7) before hva (8).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0x10, 123, 0x10)), EINVAL, "memory_size");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0x10, kMiB, 0x10)), EINVAL,
                       "guest_phys_addr 0x10");
  // hva (8) before address space (10).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, kMiB, 0x10, 0, 3)), EINVAL,
                       "userspace_addr 0x10");
  // Address space (10) before wrap (11) and before delete-of-absent (13).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, ~uint64_t{0} & kPageMask, kMiB, kHvaBase,
                                                      0, 3)),
                       EINVAL, "address space 3");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, 0, kHvaBase, 0, 3)), EINVAL,
                       "address space 3");
  // Wrap (11) before too many pages (12).
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, ~uint64_t{0} & kPageMask,
                                                      (kMemMaxNrPages + 1) * kPageSize, 0)),
                       EINVAL, "wraps");
  // Modify checks (16) before overlap (18): EINVAL, not EEXIST.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 4 * kMiB, kMiB, kHvaBase)),
                    MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, 2 * kMiB, kHvaBase)), EINVAL,
                       "cannot be resized");
  // Size check (6) before overlap (18): EINVAL, not EEXIST.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, 0, kMiB + 1)), EINVAL, "memory_size");
  // Delete of an absent slot ignores the other fields (gpa, hva) once they pass their checks.
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(7, 0, 0, 0)), EINVAL, "does not exist");
}

// ---------------------------------------------------------------------------------------------
// Change kinds.

TEST(MemslotChecks, FlagsOnly_TogglesLogDirtyPages) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB)), MemslotChange::kCreate);
  const uint64_t gen = slots.generation(0);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB, kHvaBase, kMemLogDirtyPages)),
                    MemslotChange::kFlagsOnly);
  EXPECT_EQ(slots.generation(0), gen + 1) << "FLAGS_ONLY is one swap";
  auto s = snapshot(slots);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_TRUE(s[0].logs_dirty());
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB)), MemslotChange::kFlagsOnly);
  EXPECT_FALSE(snapshot(slots)[0].logs_dirty());
  EXPECT_EQ(slots.nr_memslot_pages(), kMiB / kPageSize);
}

TEST(MemslotChecks, Move_ChangesBaseKeepsEverythingElse) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB, kHvaBase, kMemReadonly)),
                    MemslotChange::kCreate);
  const uint64_t gen = slots.generation(0);
  // A MOVE may also change LOG_DIRTY_PAGES.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(
                        region(3, 16 * kMiB, kMiB, kHvaBase, kMemReadonly | kMemLogDirtyPages)),
                    MemslotChange::kMove);
  EXPECT_EQ(slots.generation(0), gen + 2) << "MOVE: INVALID swap, then the final swap";
  auto s = snapshot(slots);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].base_gfn, Gfn(16 * kMiB / kPageSize));
  EXPECT_EQ(s[0].npages, kMiB / kPageSize);
  EXPECT_EQ(s[0].userspace_addr, Hva(kHvaBase));
  EXPECT_EQ(s[0].flags, kMemReadonly | kMemLogDirtyPages);
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set().search_memslots(Gfn(kMiB / kPageSize)), nullptr);
  EXPECT_EQ(slots.nr_memslot_pages(), kMiB / kPageSize);
}

TEST(MemslotChecks, Delete_RemovesSlotAndPages) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB)), MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(4, 2 * kMiB, kMiB, kHvaBase + kMiB)),
                    MemslotChange::kCreate);
  EXPECT_EQ(slots.nr_memslot_pages(), 2 * kMiB / kPageSize);
  const uint64_t gen = slots.generation(0);
  // DELETE ignores gpa, hva and flags.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, 0x5000, 0, 0x1000, kMemReadonly)),
                    MemslotChange::kDelete);
  EXPECT_EQ(slots.generation(0), gen + 2);
  auto s = snapshot(slots);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].id, 4);
  EXPECT_EQ(slots.nr_memslot_pages(), kMiB / kPageSize);
  // The id can be reused at a different place and size.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, 64 * kMiB, 4 * kMiB, kHvaBase + 8 * kMiB)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, TwoAddressSpaces_SlotsMayOverlapAcrossButNotWithin) {
  MemslotsConfig config;
  config.nr_address_spaces = 2;
  Memslots slots(config);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase, 0, 0)),
                    MemslotChange::kCreate);
  // Same id and same gfns in AS 1: a different slot.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB, kHvaBase + kMiB, 0, 1)),
                    MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0x80000, kMiB, kHvaBase, 0, 0)), EEXIST,
                       "in address space 0");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0x80000, kMiB, kHvaBase, 0, 1)), EEXIST,
                       "in address space 1");
  auto lock = slots.read_lock();
  const Memslot* a = lock.set(0).gfn_to_memslot(Gfn(5));
  const Memslot* b = lock.set(1).gfn_to_memslot(Gfn(5));
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->as_id, 0);
  EXPECT_EQ(b->as_id, 1);
  EXPECT_EQ(gfn_to_hva_memslot(b, Gfn(5)), Hva(kHvaBase + kMiB + 5 * kPageSize));
  EXPECT_EQ(lock.set(0).as_id(), 0u);
  EXPECT_EQ(lock.set(1).as_id(), 1u);
  EXPECT_EQ(slots.nr_memslot_pages(), 2 * kMiB / kPageSize);  // VM-wide: both AS
}

TEST(MemslotChecks, SlotLimit_ConfiguredSmallFillsEveryId) {
  MemslotsConfig config;
  config.nr_user_slots = 64;
  Memslots slots(config);
  for (uint32_t id = 0; id < 64; ++id) {
    ASSERT_MEMSLOT_OK(slots.set_memory_region(region(id, id * kMiB, kMiB, kHvaBase + id * kMiB)),
                      MemslotChange::kCreate);
  }
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(64, 64 * kMiB, kMiB, kHvaBase)), EINVAL,
                       "slot id 64 >= 64 user slots");
  EXPECT_EQ(snapshot(slots).size(), 64u);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(10, 0, 0)), MemslotChange::kDelete);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(10, 100 * kMiB, kMiB, kHvaBase)),
                    MemslotChange::kCreate);
}

TEST(MemslotChecks, SlotLimit_Real32764) {
  Memslots slots;
  EXPECT_EQ(slots.config().nr_user_slots, 32764u);
  // Every id below the limit is accepted, the limit itself is not. (Filling all 32,764 slots
  // one call at a time costs O(n^2) copying; the benchmark builds such sets in bulk.)
  for (uint32_t id : {0u, 1u, 16383u, 32762u, 32763u}) {
    ASSERT_MEMSLOT_OK(slots.set_memory_region(region(id, id * kMiB, kMiB, kHvaBase)),
                      MemslotChange::kCreate);
  }
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(32764, 0x7fff00000000ULL, kMiB)), EINVAL,
                       "slot id 32764 >= 32764 user slots");
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set().id_to_memslot(32763)->base_gfn, Gfn(32763ull * kMiB / kPageSize));
}

TEST(MemslotChecks, BadInputsGiveErrorsNotCrashes) {
  MemslotsConfig config;
  config.nr_address_spaces = 7;  // clamped to 2
  config.nr_user_slots = 0;      // clamped to 1
  Memslots slots(config);
  EXPECT_EQ(slots.config().nr_address_spaces, 2u);
  EXPECT_EQ(slots.config().nr_user_slots, 1u);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB), static_cast<RegionIoctl>(9)),
                       EINVAL, "unknown region ioctl");
  EXPECT_EQ(slots.generation(5), kMemslotGenUpdateInProgress);
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set(5).size(), 0u);
  EXPECT_EQ(lock.set(5).gfn_to_memslot(Gfn(0)), nullptr);
  VcpuMemslotCache fresh;  // its sentinel generation equals the bad-as_id set's
  EXPECT_EQ(lock.set(5).vcpu_gfn_to_memslot(fresh, Gfn(0)), nullptr);
  slots.mn_invalidate_end();  // unbalanced: ignored
  EXPECT_EQ(slots.mn_active_invalidate_count(), 0);
}

TEST(MemslotChecks, SetMemoryRegionInsideReadSection_EDEADLK) {
  Memslots slots;
  auto lock = slots.read_lock();
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB)), EDEADLK,
                       "inside a memslots read section");
}

// A section may end on another thread (SRCU allows it, the lock is movable). The end counts
// for the thread that opened it: that thread may update again, and the thread it ended on
// is still refused inside a section of its own.
TEST(MemslotChecks, SectionEndedOnAnotherThread_OpenerMayUpdateAgain) {
  Memslots slots;
  std::optional<MemslotsReadLock> lock(slots.read_lock());
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, kMiB)), EDEADLK,
                       "inside a memslots read section");
  std::thread([&] { lock.reset(); }).join();
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB)), MemslotChange::kCreate);
}

TEST(MemslotChecks, SectionEndedOnAnotherThread_EnderIsStillRefusedInsideItsOwn) {
  Memslots slots;
  std::optional<MemslotsReadLock> handed;
  std::thread([&] { handed.emplace(slots.read_lock()); }).join();  // the opener has exited
  // On a thread of its own, so that a wrong answer (going on to wait for its own section)
  // fails the test instead of hanging it.
  std::packaged_task<int()> task([&] {
    handed.reset();
    auto own = slots.read_lock();
    return slots.set_memory_region(region(0, 0, kMiB)).code();
  });
  auto result = task.get_future();
  std::thread ender(std::move(task));
  if (result.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    std::fprintf(stderr, "set_memory_region waited for its own thread's read section\n");
    std::_Exit(1);
  }
  ender.join();
  EXPECT_EQ(result.get(), EDEADLK);
  // And threads that never held a section update freely, the late end notwithstanding.
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB)), MemslotChange::kCreate);
  std::thread([&] {
    ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, 0)), MemslotChange::kDelete);
  }).join();
}

// MemslotsConfig::membarrier = false (a process whose seccomp filter will deny membarrier):
// the seq_cst protocol, with the same behaviour.
TEST(MemslotChecks, MembarrierOff_SeqCstReadSectionsBehaveTheSame) {
  MemslotsConfig config;
  config.membarrier = false;
  Memslots slots(config);
  EXPECT_FALSE(detail::MemslotsTestPeer::uses_membarrier(slots));
  EXPECT_EQ(detail::MemslotsTestPeer::uses_membarrier(Memslots()),
            detail::Srcu::membarrier_available());
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, kMiB)), MemslotChange::kCreate);
  {
    auto lock = slots.read_lock();
    EXPECT_NE(lock.set().gfn_to_memslot(Gfn(0)), nullptr);
    EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(0, 0, 0)), EDEADLK,
                         "inside a memslots read section");
  }
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(0, 0, 0)), MemslotChange::kDelete);
}

// Row 20, the arch prepare hook as the kernel applies it: x86 refuses CREATE and MOVE past kvm_mmu_max_gfn() with
// EINVAL, after the overlap check (an overlapping slot past the limit is EEXIST); FLAGS_ONLY and
// DELETE are not checked. Verified against the kernel in tests/kvm (memslot conformance).
TEST(MemslotChecks, Row20_ArchMaxGfnOnCreateAndMoveAfterOverlap_EINVAL) {
  MemslotsConfig config;
  config.max_gfn = (uint64_t{1} << 40) - 1;  // x86 shadow MMU: 52-bit gpas
  Memslots slots(config);
  const uint64_t top = (config.max_gfn + 1) << kPageShift;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, top - kMiB, kMiB)), MemslotChange::kCreate);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, top, kPageSize, kHvaBase + kMiB)),
                       EINVAL, "past the arch's last gfn");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(2, top - kPageSize, 2 * kPageSize,
                                                      kHvaBase + kMiB)),
                       EEXIST, "overlap");
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, top - kMiB / 2, kMiB)), EINVAL,
                       "past the arch's last gfn");
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, top - kMiB, kMiB, kHvaBase,
                                                   kMemLogDirtyPages)),
                    MemslotChange::kFlagsOnly);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemLogDirtyPages)),
                    MemslotChange::kMove);
}

}  // namespace
}  // namespace gfnmap
