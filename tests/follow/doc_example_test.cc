// The example of docs/resolver.md, compiled and checked: both API generations on one page of a
// SimHost, with the trace and the release rules.
#include <gtest/gtest.h>

#include "gfnmap/follow.h"
#include "gfnmap/sim_host.h"

namespace {

using namespace gfnmap;

TEST(FollowDocExample, ResolverMd) {
  SimHost host;
  Hva hva = *host.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(host.populate(hva, kPageSize, /*write=*/true).ok());
  Memslot slot;
  slot.id = 1;
  slot.base_gfn = Gfn(0x100);
  slot.npages = 4;
  slot.userspace_addr = hva;

  bool writable = false;
  Page page;
  FollowTrace trace;
  Pfn pfn = faultin_pfn(host, &slot, Gfn(0x100), kFollWrite, &writable, &page, &trace);
  ASSERT_FALSE(is_error_noslot_pfn(pfn));
  EXPECT_EQ(pfn, page.pfn);
  EXPECT_TRUE(writable);
  EXPECT_EQ(trace.rows, std::vector<int>{5});
  EXPECT_EQ(trace.path, FollowPath::kFast);
  EXPECT_FALSE(trace.steps.empty());
  release_faultin_page(page, /*unused=*/false, /*dirty=*/writable);
  EXPECT_EQ(host.outstanding_refs(), 0u);

  FollowPfn foll;
  foll.slot = &slot;
  foll.gfn = Gfn(0x100);
  foll.flags = kFollGet | kFollWrite;
  foll.allow_write_mapping = true;
  pfn = follow_pfn(host, foll);
  EXPECT_EQ(pfn, host.pte(hva).pfn);
  EXPECT_EQ(foll.hva, hva);
  EXPECT_TRUE(foll.writable);
  EXPECT_TRUE(foll.is_refcounted_page);
  release_pfn_dirty(host, pfn, foll.hva);
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(host.violations(), 0u);
  EXPECT_EQ(to_string(FollowPath::kFast), "fast");
  EXPECT_EQ(to_string(static_cast<FollowPath>(42)), "?");  // bad input: a name, not a crash
}

}  // namespace
