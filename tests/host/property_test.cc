// gfnmap tests, host: random sequences of SimHost operations against a naive oracle of page
// contents, with the reference balance and the no-violation rule checked after every step.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cerrno>
#include <map>
#include <vector>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

constexpr uint64_t kPages = 6;

// One VMA per kind whose data must survive every operation except the ones that drop it.
struct Region {
  VmaKind kind;
  Hva start;
  bool read_only = false;
  std::map<uint64_t, uint8_t> bytes;  // page -> byte 0 of the page (absent: 0)
};

uint8_t read_byte(SimHost& mm, Hva hva) {
  Page page;
  long r = mm.get_user_pages_unlocked(hva, kFollHwpoison, &page);
  RC_ASSERT(r == 1L);
  std::byte* p = mm.page_address(page.pfn, hva);
  RC_ASSERT(p != nullptr);
  const auto v = static_cast<uint8_t>(p[0]);
  mm.put_page(page);
  return v;
}

// Invariant 2 and the data path (CoW copies, swap, page cache eviction, discard, mremap).
RC_GTEST_PROP(SimHostProperty, Invariant02_DataAndReferencesSurviveRandomOperations, ()) {
  SimHost mm;
  std::vector<Region> regions;
  for (VmaKind kind : {VmaKind::kAnonPrivate, VmaKind::kAnonShared, VmaKind::kFileShared,
                       VmaKind::kFilePrivate}) {
    MmapOptions o;
    o.page_cache_resident = *rc::gen::arbitrary<bool>();
    Result<Hva> h = mm.mmap(kPages * kPageSize, kProtRW, kind, o);
    RC_ASSERT(h.ok());
    regions.push_back(Region{kind, *h, false, {}});
  }
  std::vector<Page> held;
  const int steps = *rc::gen::inRange(1, 60);
  for (int step = 0; step < steps; ++step) {
    Region& r = regions[*rc::gen::inRange<size_t>(0, regions.size())];
    const uint64_t pg = *rc::gen::inRange<uint64_t>(0, kPages);
    const Hva hva = r.start + pg * kPageSize;
    switch (*rc::gen::inRange(0, 10)) {
      case 0: {  // write a byte through a write GUP
        Page page;
        long ret = mm.get_user_pages_unlocked(hva, kFollWrite | kFollHwpoison, &page);
        if (r.read_only) {
          RC_ASSERT(ret == long{-EFAULT});
          break;
        }
        RC_ASSERT(ret == 1L);
        const auto v = *rc::gen::inRange<uint8_t>(1, 255);
        mm.page_address(page.pfn, hva)[0] = std::byte{v};
        mm.set_page_dirty(page);
        mm.put_page(page);
        r.bytes[pg] = v;
        break;
      }
      case 1:  // read back through a read GUP
        RC_ASSERT(read_byte(mm, hva) == (r.bytes.count(pg) ? r.bytes[pg] : 0));
        break;
      case 2: {  // take a reference and keep it for a while
        Page page;
        if (mm.get_user_pages_unlocked(hva, kFollHwpoison, &page) == 1) held.push_back(page);
        break;
      }
      case 3:  // give one back
        if (!held.empty()) {
          mm.put_page(held.back());
          held.pop_back();
        }
        break;
      case 4:  // MADV_DONTNEED: anonymous private data is gone, the rest stays in its file
        RC_ASSERT(mm.discard(hva, kPageSize).ok());
        if (r.kind == VmaKind::kAnonPrivate || r.kind == VmaKind::kFilePrivate) {
          r.bytes.erase(pg);  // private copies are dropped (file-private re-reads the file)
        }
        break;
      case 5:
        if (r.kind == VmaKind::kAnonPrivate) {
          RC_ASSERT(mm.swap_out(hva).ok());
        } else if (r.kind != VmaKind::kFilePrivate) {
          RC_ASSERT(mm.evict_from_page_cache(hva).ok());
        }
        break;
      case 6:
        if (r.kind == VmaKind::kAnonPrivate) RC_ASSERT(mm.make_cow_shared(hva).ok());
        break;
      case 7:
        r.read_only = !r.read_only;
        RC_ASSERT(mm.mprotect(r.start, kPages * kPageSize, r.read_only ? Prot::kRead : kProtRW)
                      .ok());
        break;
      case 8: {  // move the whole VMA between two places of its own
        const uint64_t lane = 0x7e0000000000 + static_cast<uint64_t>(&r - regions.data()) *
                                                   0x10000000;
        const Hva dst(r.start.value == lane ? lane + 0x1000000 : lane);
        Result<Hva> moved = mm.mremap(r.start, kPages * kPageSize, kPages * kPageSize, dst);
        RC_ASSERT(moved.ok());
        RC_ASSERT(*moved == dst);
        r.start = *moved;
        break;
      }
      case 9:
        mm.age_range(r.start, r.start + kPages * kPageSize, *rc::gen::arbitrary<bool>());
        break;
    }
    RC_ASSERT(mm.outstanding_refs() == held.size());
    RC_ASSERT(mm.violations() == 0u);
  }
  for (const Region& r : regions) {
    for (uint64_t pg = 0; pg < kPages; ++pg) {
      const uint8_t want = r.bytes.count(pg) ? r.bytes.at(pg) : 0;
      RC_ASSERT(read_byte(mm, r.start + pg * kPageSize) == want);
    }
  }
  for (const Page& p : held) mm.put_page(p);
  RC_ASSERT(mm.outstanding_refs() == 0u);
  RC_ASSERT(mm.violations() == 0u);
}

}  // namespace
}  // namespace gfnmap
