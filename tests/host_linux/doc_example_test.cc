// gfnmap tests: the example of docs/real-memory.md, compiled and run as written there.
#include <gtest/gtest.h>

#include "gfnmap/follow.h"
#include "gfnmap/linux_host.h"

namespace {

using namespace gfnmap;  // NOLINT(google-build-using-namespace): as in the doc

int doc_main() {
  auto host = LinuxHost::create();                       // opens /proc/self/pagemap
  if (!host.ok()) return 1;
  RegionSpec spec;
  spec.kind = RegionKind::kAnonymous;                    // or kThp, kMemfdShared, kFile*, ...
  spec.size = 64 << 20;
  auto region = (*host)->create_region(spec);            // mmap + tracked by LinuxHost
  if (!region.ok()) return 1;

  Memslot slot;                                          // normally from Memslots
  slot.id = 0;
  slot.base_gfn = Gfn(0x100000);
  slot.npages = spec.size / kPageSize;
  slot.userspace_addr = region->start;

  bool writable = false;
  Page page;
  Pfn pfn = faultin_pfn(**host, &slot, Gfn(0x100010), kFollWrite, &writable, &page);
  if (is_error_noslot_pfn(pfn)) return 1;
  std::byte* bytes = (*host)->page_address(pfn, page.hva);  // the page, through its hva
  bytes[0] = std::byte{1};
  release_faultin_page(page, /*unused=*/false, /*dirty=*/writable);
  return (*host)->outstanding_refs() == 0 ? 0 : 1;
}

TEST(DocRealMemory, ExampleRuns) { EXPECT_EQ(doc_main(), 0); }

}  // namespace
