// gfnmap memslot tests: the example of docs/memslots.md, call for call, with its printed results
// asserted, so the page cannot drift from the library.
#include <gtest/gtest.h>

#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

TEST(MemslotDocExample, SameResultsAsDocsMemslotsMd) {
  Memslots slots;
  UserspaceMemoryRegion ram;
  ram.slot = 0;
  ram.guest_phys_addr = 0;
  ram.memory_size = 256 << 20;
  ram.userspace_addr = 0x7f0000000000;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(ram), MemslotChange::kCreate);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(ram), std::nullopt);

  UserspaceMemoryRegion rom = ram;
  rom.slot = 1;
  rom.flags = kMemReadonly;
  rom.guest_phys_addr = 128 << 20;
  rom.memory_size = 1 << 20;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(rom), EEXIST,
                       "gfns [0x8000, 0x8100) of slot 1 overlap slot 0 [0x0, 0x10000) in "
                       "address space 0");
  rom.guest_phys_addr = 0xfff00000;
  rom.userspace_addr = 0x7f0010000000;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(rom), MemslotChange::kCreate);
  {
    MemslotsReadLock lock = slots.read_lock();
    const MemslotSet& set = lock.set();
    const Gfn gfn = gpa_to_gfn(Gpa(0x1234000));
    const Memslot* slot = set.gfn_to_memslot(gfn);
    ASSERT_NE(slot, nullptr);
    EXPECT_EQ(slot->id, 0);
    EXPECT_EQ(gfn_to_hva_memslot(slot, gfn), Hva(0x7f0001234000));
    const Memslot* r = set.gfn_to_memslot(gpa_to_gfn(Gpa(0xfff00000)));
    ASSERT_NE(r, nullptr);
    bool writable = true;
    EXPECT_EQ(gfn_to_hva_memslot_prot(r, r->base_gfn, &writable), Hva(0x7f0010000000));
    EXPECT_FALSE(writable);
    EXPECT_TRUE(kvm_is_error_hva(gfn_to_hva_memslot(r, r->base_gfn)));
  }
  ram.flags = kMemLogDirtyPages;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(ram), MemslotChange::kFlagsOnly);
  ram.guest_phys_addr = 1ull << 32;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(ram), MemslotChange::kMove);
  ram.memory_size = 0;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(ram), MemslotChange::kDelete);
  EXPECT_EQ(slots.generation(0), 7u);
  EXPECT_EQ(slots.nr_memslot_pages(), 256u);
}

}  // namespace
}  // namespace gfnmap
