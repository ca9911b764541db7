// gfnmap tests, host: reference accounting and protocol violations (counted and recorded, never
// a crash), call counters, describe/dump, and the enum names the CLI parses.
#include <cerrno>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

using test::gup;

TEST(SimHostAccounting, Invariant02_ReferencesAndPinsBalance) {
  SimHost mm;
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  std::vector<Page> held;
  for (uint64_t i = 0; i < 4; ++i) {
    Page page;
    ASSERT_EQ(gup(mm, h + i * kPageSize, kFollWrite | (i % 2 ? kFollPin : 0), &page), 1);
    held.push_back(page);
  }
  Page fast;
  ASSERT_TRUE(mm.get_user_page_fast_only(h, kFollWrite | kFollPin, &fast));
  held.push_back(fast);
  EXPECT_EQ(mm.outstanding_refs(), 5u);
  EXPECT_EQ(mm.frame(held[0].pfn).held_refs, 1u);
  EXPECT_EQ(mm.frame(held[0].pfn).held_pins, 1u);
  EXPECT_EQ(mm.frame(held[0].pfn).refcount, 3);  // PTE + ref + pin
  for (const Page& p : held) mm.put_page(p);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.frame(held[0].pfn).refcount, 1);
  EXPECT_EQ(mm.counters().puts, 5u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostAccounting, ProtocolViolationsAreCountedNotFatal) {
  SimHost mm;
  SimHost other;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  mm.put_page(page);
  mm.put_page(page);  // 1: double put
  EXPECT_EQ(mm.frame(page.pfn).refcount, 1);  // the PTE's reference survived
  Page pinned = page;
  pinned.pinned = true;
  mm.put_page(pinned);  // 2: unpin of a page never pinned
  other.put_page(page);  // (on `other`): a Page of another mm
  Page bogus{&mm, Pfn(0xdeadbeef), h, false};
  mm.put_page(bogus);  // 3: unknown pfn
  mm.set_page_dirty(page);  // 4: dirty of a page nobody holds
  mm.mark_page_accessed(page);  // 5: accessed of a page nobody holds

  Page zero;
  ASSERT_EQ(gup(mm, h + kPageSize, 0, &zero), 1);
  ASSERT_EQ(zero.pfn, mm.zero_pfn());
  mm.set_page_dirty(zero);  // 6: dirty of the reserved zero page
  mm.mark_page_accessed(zero);  // 7: accessed of a reserved page
  mm.put_page(zero);
  EXPECT_FALSE(mm.frame(mm.zero_pfn()).dirty);

  MmapOptions o;
  o.pfnmap_backing = PfnmapBacking::kRefcountZero;
  Hva d = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, o);
  std::optional<Page> tail = mm.pfn_to_refcounted_page(mm.vma_info(d)->device_pfn, d);
  ASSERT_TRUE(tail);
  mm.set_page_dirty(*tail);  // 8: marking a refcount-0 page
  mm.put_page(*tail);        // 9: put of a page not held
  EXPECT_EQ(mm.frame(tail->pfn).refcount, 0);  // never underflows

  ASSERT_TRUE(mm.munmap(h, 2 * kPageSize));
  mm.put_page(page);  // 10: put of a freed frame
  EXPECT_EQ(mm.violations(), 10u);
  EXPECT_EQ(other.violations(), 1u);
  std::vector<SimViolation> log = mm.violation_log();
  ASSERT_EQ(log.size(), 10u);
  EXPECT_NE(log[0].what.find("no reference held"), std::string::npos) << log[0].what;
  EXPECT_NE(log[5].what.find("reserved"), std::string::npos) << log[5].what;
  EXPECT_NE(log[7].what.find("refcount-0"), std::string::npos) << log[7].what;
  EXPECT_NE(log[9].what.find("freed"), std::string::npos) << log[9].what;
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

TEST(SimHostAccounting, Invariant18_DirtyAndAccessedMarksOnHeldPages) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonShared);
  Page page;
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  EXPECT_FALSE(mm.page_reserved(page));
  mm.set_page_dirty(page);
  mm.mark_page_accessed(page);
  FrameInfo f = mm.frame(page.pfn);
  EXPECT_TRUE(f.dirty);
  EXPECT_TRUE(f.accessed);
  mm.put_page(page);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostAccounting, Invariants06And07_CountersShowWhichPathRan) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  mm.put_page(page);
  ASSERT_TRUE(mm.get_user_page_fast_only(h, kFollWrite, &page));
  mm.put_page(page);
  mm.mmap_read_lock();
  (void)mm.vma_lookup(h);
  mm.mmap_read_unlock();
  SimCounters c = mm.counters();
  EXPECT_EQ(c.slow_gups, 1u);
  EXPECT_EQ(c.slow_gup_pages, 1u);
  EXPECT_EQ(c.fast_lookups, 1u);
  EXPECT_EQ(c.fast_hits, 1u);
  EXPECT_EQ(c.vma_lookups, 1u);
  EXPECT_EQ(c.faults, 1u);
  EXPECT_EQ(c.puts, 2u);
  EXPECT_EQ(c.last_gup_flags, kFollWrite | kFollHwpoison | kFollHonorNumaFault);
  mm.reset_counters();
  EXPECT_EQ(mm.counters().slow_gups, 0u);
  EXPECT_EQ(mm.counters().last_gup_flags, 0u);
}

TEST(SimHostAccounting, PageAddressGivesStableZeroedData) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  Pfn pfn = mm.pte(h).pfn;
  std::byte* p = mm.page_address(pfn, h);
  ASSERT_NE(p, nullptr);
  for (uint64_t i = 0; i < kPageSize; ++i) ASSERT_EQ(p[i], std::byte{0});
  p[100] = std::byte{42};
  EXPECT_EQ(mm.page_address(pfn, h), p);
  EXPECT_EQ(mm.page_address(pfn, h)[100], std::byte{42});
  std::byte* z = mm.page_address(mm.zero_pfn(), h);
  ASSERT_NE(z, nullptr);
  EXPECT_EQ(z[0], std::byte{0});
  EXPECT_EQ(mm.page_address(Pfn(0x5), h), nullptr);
  EXPECT_EQ(mm.page_address(Pfn(0xfffffff), h), nullptr);
}

TEST(SimHostAccounting, DescribeAndDumpNameEveryPiece) {
  SimHost mm;
  MmapOptions o;
  o.vm_io = true;
  o.pfnmap_backing = PfnmapBacking::kReserved;
  o.ptes_writable = false;
  Hva d = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, o);
  std::string s = mm.describe(d);
  EXPECT_NE(s.find("VM_IO|VM_PFNMAP"), std::string::npos) << s;
  EXPECT_NE(s.find("reserved"), std::string::npos) << s;
  EXPECT_NE(s.find("read-only"), std::string::npos) << s;
  Hva f = *mm.mmap(kPageSize, kProtRW, VmaKind::kFilePrivate);
  s = mm.describe(f);
  EXPECT_NE(s.find("on disk (needs I/O)"), std::string::npos) << s;
  GupInjection inj;
  ASSERT_TRUE(mm.inject_gup_result(f, inj));
  ASSERT_TRUE(mm.inject_fast_miss(f, 2));
  s = mm.describe(f);
  EXPECT_NE(s.find("injected GUP result -14"), std::string::npos) << s;
  EXPECT_NE(s.find("injected fast-path miss (2 more)"), std::string::npos) << s;
  EXPECT_NE(mm.describe(Hva(0x1000)).find("no vma"), std::string::npos);
  std::string dump = mm.dump();
  EXPECT_NE(dump.find("file-private"), std::string::npos) << dump;
  EXPECT_NE(dump.find("counters:"), std::string::npos) << dump;
}

TEST(SimHostAccounting, NamesRoundTripForTheCli) {
  for (VmaKind k : {VmaKind::kAnonPrivate, VmaKind::kAnonShared, VmaKind::kFilePrivate,
                    VmaKind::kFileShared, VmaKind::kPfnmap}) {
    EXPECT_EQ(parse_vma_kind(to_string(k)), k);
  }
  for (PageBacking b : {PageBacking::k4K, PageBacking::kThp, PageBacking::kHugetlb2M,
                        PageBacking::kHugetlb1G}) {
    EXPECT_EQ(parse_page_backing(to_string(b)), b);
  }
  for (PfnmapBacking b : {PfnmapBacking::kRefcounted, PfnmapBacking::kRefcountZero,
                          PfnmapBacking::kReserved, PfnmapBacking::kNoStructPage}) {
    EXPECT_EQ(parse_pfnmap_backing(to_string(b)), b);
  }
  for (SignalState s : {SignalState::kNone, SignalState::kPending, SignalState::kFatal,
                        SignalState::kFatalBeforeLock}) {
    EXPECT_EQ(parse_signal_state(to_string(s)), s);
  }
  EXPECT_EQ(parse_prot("rw"), kProtRW);
  EXPECT_EQ(parse_prot("r-x"), Prot::kRead | Prot::kExec);
  EXPECT_EQ(parse_prot("none"), Prot::kNone);
  EXPECT_EQ(parse_prot("---"), Prot::kNone);
  EXPECT_FALSE(parse_prot("rwq"));
  EXPECT_FALSE(parse_prot(""));
  EXPECT_EQ(prot_to_string(kProtRW), "rw-");
  EXPECT_FALSE(parse_vma_kind("anon"));
  EXPECT_FALSE(parse_signal_state("FATAL"));
}

}  // namespace
}  // namespace gfnmap
