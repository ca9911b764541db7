// gfnmap dirty tests: the example of docs/dirty-logging.md, call for call, with its results
// asserted, so the page cannot drift from the library.
#include <gtest/gtest.h>

#include <cerrno>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"

namespace gfnmap {
namespace {

// The MMU's side of the write-protect step; here it only counts pages.
class CountingProtector : public DirtyWriteProtector {
 public:
  void write_protect(const Memslot& /*slot*/, Gfn /*base*/, uint64_t mask) override {
    pages += static_cast<uint64_t>(__builtin_popcountll(mask));
  }
  uint64_t pages = 0;
};

TEST(DirtyDocExample, BitmapGetClearAndRing) {
  Memslots slots;
  DirtyLog log(slots);  // registers as a memslot listener: create it before any slot logs
  CountingProtector wp;
  log.set_write_protector(&wp);

  UserspaceMemoryRegion ram;  // slot 0: 1 MiB at gpa 0, logging dirty pages
  ram.slot = 0;
  ram.flags = kMemLogDirtyPages;
  ram.guest_phys_addr = 0;
  ram.memory_size = 1 << 20;  // 256 pages
  ram.userspace_addr = 0x7f0000000000;
  ASSERT_TRUE(slots.set_memory_region(ram).ok());

  {  // KVM-originated writes (the MMU / kvm_write_guest do this), inside a read section.
    MemslotsReadLock lock = slots.read_lock();
    const Memslot* slot = lock.set().gfn_to_memslot(Gfn(3));
    ASSERT_NE(slot, nullptr);
    log.mark_page_dirty_in_slot(*slot, Gfn(3));
    log.mark_page_dirty_in_slot(*slot, Gfn(4));
    log.mark_page_dirty_in_slot(*slot, Gfn(200));
  }

  // KVM_GET_DIRTY_LOG (no manual protect): fetch-and-clear, write-protect the reported pages.
  std::vector<uint64_t> bitmap(dirty_bitmap_words(256));  // 4 words
  Result<uint64_t> got = log.get_dirty_log(dirty_log_slot(0, 0), bitmap);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, 3u);
  EXPECT_EQ(wp.pages, 3u);
  EXPECT_EQ(bitmap[0], 0x18u);                  // pages 3 and 4
  EXPECT_EQ(bitmap[3], uint64_t{1} << (200 - 192));
  EXPECT_EQ(dirty_bitmap_to_ranges(Gfn(0), bitmap, 256),
            (std::vector<DirtyRange>{{Gpa(0x3000), 0x2000}, {Gpa(0xc8000), 0x1000}}));
  EXPECT_EQ(*log.get_dirty_log(dirty_log_slot(0, 0), bitmap), 0u);  // already cleared

  // Manual protect: GET copies, CLEAR_DIRTY_LOG clears exactly mask & old and re-protects.
  ASSERT_TRUE(log.enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok());
  {
    MemslotsReadLock lock = slots.read_lock();
    log.mark_page_dirty_in_slot(*lock.set().id_to_memslot(0), Gfn(70));
  }
  ASSERT_EQ(*log.get_dirty_log(dirty_log_slot(0, 0), bitmap), 1u);
  EXPECT_EQ(bitmap[1], uint64_t{1} << 6);
  const std::vector<uint64_t> mask = {bitmap[1]};
  EXPECT_EQ(*log.clear_dirty_log(dirty_log_slot(0, 0), /*first_page=*/64, 64, mask), 1u);
  EXPECT_EQ(log.clear_dirty_log(dirty_log_slot(0, 0), 32, 64, mask).code(), EINVAL);  // % 64
  EXPECT_EQ(log.get_dirty_log(dirty_log_slot(0, 7), bitmap).code(), ENOENT);  // no slot 7

  // A dirty ring: enable before any vCPU exists, then every vCPU write goes to its ring.
  Memslots slots2;
  DirtyLog ring_log(slots2);
  ring_log.set_write_protector(&wp);
  ASSERT_TRUE(ring_log.enable_dirty_ring(4096).ok());  // 256 entries of 16 bytes
  ASSERT_TRUE(slots2.set_memory_region(ram).ok());
  DirtyRing* ring = *ring_log.create_vcpu(0);
  EXPECT_EQ(ring->soft_limit(), 256u - kDirtyRingRsvdEntries);
  EXPECT_EQ(ring_log.enable_dirty_ring(8192).code(), EINVAL);  // a vCPU exists
  {
    MemslotsReadLock lock = slots2.read_lock();
    const Memslot* slot = lock.set().id_to_memslot(0);
    EXPECT_FALSE(ring_log.mark_page_dirty_in_slot(*slot, Gfn(9), ring));  // not soft-full
    EXPECT_FALSE(ring_log.mark_page_dirty_in_slot(*slot, Gfn(5), ring));
  }
  std::vector<uint64_t> offsets;
  EXPECT_EQ(ring->harvest([&](uint32_t slot, uint64_t offset) {
              EXPECT_EQ(slot, dirty_log_slot(0, 0));
              offsets.push_back(offset);
            }),
            2u);
  EXPECT_EQ(offsets, (std::vector<uint64_t>{9, 5}));  // push order
  EXPECT_EQ(*ring_log.reset_dirty_rings(), 2u);        // re-protects gfns 5 and 9
  EXPECT_EQ(ring->used(), 0u);
  EXPECT_EQ(ring_log.get_dirty_log(dirty_log_slot(0, 0), bitmap).code(), ENXIO);  // ring-only
}

}  // namespace
}  // namespace gfnmap
