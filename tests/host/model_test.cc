// gfnmap tests, host: SimHost's memory model: placement, anonymous, shared, file, PFNMAP VMAs, CoW,
// page cache and swap, hugepages, mprotect/munmap/mremap/discard.
#include <cerrno>
#include <cstring>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

using test::gup;
using test::gup_pfn;
using State = PteInfo::State;

constexpr uint64_t k2M = uint64_t{2} << 20;

TEST(SimHostModel, PlacementIsDeterministicAndGuarded) {
  SimHost a, b;
  Hva a1 = *a.mmap(3 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Hva a2 = *a.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Hva b1 = *b.mmap(3 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Hva b2 = *b.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  EXPECT_EQ(a1, Hva(0x7f0000000000));
  EXPECT_EQ(a1, b1);
  EXPECT_EQ(a2, b2);
  EXPECT_EQ(a2, a1 + 4 * kPageSize);  // one unmapped guard page between VMAs
  a.mmap_read_lock();
  EXPECT_FALSE(a.vma_lookup(a1 + 3 * kPageSize).has_value());
  a.mmap_read_unlock();
  Hva t = *a.mmap(k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kThp});
  EXPECT_EQ(t.value % k2M, 0u);

  SimHost c(SimHostConfig{.hva_base = Hva(0x10000000), .first_pfn = 0x200});
  EXPECT_EQ(*c.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate), Hva(0x10000000));
  EXPECT_EQ(c.zero_pfn(), Pfn(0x200));
}

TEST(SimHostModel, MmapRejectsBadInput) {
  SimHost mm;
  EXPECT_EQ(mm.mmap(0, kProtRW, VmaKind::kAnonPrivate).code(), EINVAL);
  EXPECT_EQ(mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate, {.fixed = Hva(0x1234)}).code(),
            EINVAL);
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  EXPECT_EQ(mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate, {.fixed = h + kPageSize}).code(),
            EEXIST);
  EXPECT_EQ(mm.mmap(k2M, kProtRW, VmaKind::kAnonShared, {.backing = PageBacking::kThp}).code(),
            EINVAL);
  EXPECT_EQ(mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, {.file = 99}).code(), ENOENT);
  EXPECT_EQ(mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, {.file_offset = 5}).code(), EINVAL);
  EXPECT_EQ(mm.munmap(h + 1, kPageSize).code(), EINVAL);
  EXPECT_EQ(mm.munmap(h, 0).code(), EINVAL);
  EXPECT_EQ(mm.mprotect(h, 64 * kPageSize, Prot::kRead).code(), ENOMEM);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, AnonReadMapsZeroPageReadOnly) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, 0, &page), 1);
  EXPECT_EQ(page.pfn, mm.zero_pfn());
  PteInfo pte = mm.pte(h);
  EXPECT_EQ(pte.state, State::kPresent);
  EXPECT_TRUE(pte.zero_page);
  EXPECT_FALSE(pte.writable);
  EXPECT_TRUE(mm.page_reserved(page));
  EXPECT_TRUE(mm.frame(mm.zero_pfn()).reserved);
  mm.put_page(page);
  EXPECT_EQ(mm.counters().zero_page_maps, 1u);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

// SimHostConfig::zero_page = false models a kernel without the zero page: the read allocates a
// fresh exclusive page, writable at once and clean (THP-eligible ranges get a huge page).
TEST(SimHostModel, AnonReadWithoutZeroPageMapsAFreshWritablePage) {
  SimHost mm(SimHostConfig{.zero_page = false});
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, 0, &page), 1);
  EXPECT_NE(page.pfn, mm.zero_pfn());
  PteInfo pte = mm.pte(h);
  EXPECT_EQ(pte.state, State::kPresent);
  EXPECT_FALSE(pte.zero_page);
  EXPECT_TRUE(pte.writable);
  EXPECT_FALSE(pte.dirty) << "a read does not dirty the page";
  EXPECT_FALSE(mm.page_reserved(page));
  Page fast;
  ASSERT_TRUE(mm.get_user_page_fast_only(h, kFollWrite, &fast)) << "writable in place";
  EXPECT_EQ(fast.pfn, page.pfn);
  mm.put_page(fast);
  mm.put_page(page);
  EXPECT_EQ(mm.counters().zero_page_maps, 0u);
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
  // A read-only mapping still reads a fresh page, not writable.
  Hva ro = *mm.mmap(kPageSize, Prot::kRead, VmaKind::kAnonPrivate);
  ASSERT_EQ(gup(mm, ro, 0, &page), 1);
  EXPECT_FALSE(mm.pte(ro).writable);
  mm.put_page(page);
  Hva t = *mm.mmap(2 * k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kThp});
  const Hva t2((t.value + k2M - 1) & ~(k2M - 1));
  (void)gup_pfn(mm, t2, 0);
  EXPECT_EQ(mm.host_mapping_level(t2), PgLevel::k2M) << "a read allocates the huge page";
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, AnonWriteAllocatesFrameWithOneReference) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  EXPECT_NE(page.pfn, mm.zero_pfn());
  EXPECT_EQ(page.hva, h);
  EXPECT_FALSE(page.pinned);
  FrameInfo f = mm.frame(page.pfn);
  EXPECT_EQ(f.kind, FrameKind::kAnon);
  EXPECT_EQ(f.refcount, 2);  // the PTE's reference and ours
  EXPECT_EQ(f.held_refs, 1u);
  EXPECT_EQ(mm.outstanding_refs(), 1u);
  mm.put_page(page);
  EXPECT_EQ(mm.frame(page.pfn).refcount, 1);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  PteInfo pte = mm.pte(h);
  EXPECT_TRUE(pte.writable);
  EXPECT_TRUE(pte.dirty);
}

TEST(SimHostModel, Row07_WriteAfterZeroPageReplacesItInsideAnInvalidation) {
  SimHost mm;
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, false));
  EXPECT_TRUE(n.take().empty());  // filling an empty PTE changes no translation
  n.on_start = [&](Hva, Hva) { EXPECT_TRUE(mm.pte(h).zero_page); };
  Pfn pfn = gup_pfn(mm, h, kFollWrite);
  EXPECT_NE(pfn, mm.zero_pfn());
  auto events = n.take();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].start, h);
  EXPECT_EQ(events[0].end, h + kPageSize);
  test::expect_bracketed(events);
  EXPECT_EQ(mm.counters().cow_breaks, 1u);
  mm.unregister_notifier(&n);
}

TEST(SimHostModel, Row07_SlowGupWriteBreaksCowAndCopiesData) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  Pfn orig = mm.pte(h).pfn;
  std::memcpy(mm.page_address(orig, h), "hello", 5);
  ASSERT_TRUE(mm.make_cow_shared(h));
  EXPECT_TRUE(mm.pte(h).cow_shared);
  EXPECT_FALSE(mm.pte(h).writable);
  EXPECT_EQ(mm.frame(orig).refcount, 2);  // ours and the simulated child's

  EXPECT_EQ(gup_pfn(mm, h, 0), orig);  // a read maps the shared frame read-only
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
  Pfn copy = gup_pfn(mm, h, kFollWrite);
  EXPECT_NE(copy, orig);
  EXPECT_EQ(mm.counters().cow_breaks, 1u);
  EXPECT_EQ(std::memcmp(mm.page_address(copy, h), "hello", 5), 0);
  EXPECT_EQ(mm.frame(orig).refcount, 1);  // only the child keeps it
  EXPECT_TRUE(mm.pte(h).writable);
  EXPECT_FALSE(mm.pte(h).cow_shared);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, PinForReadUnsharesCowPage) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  Pfn orig = mm.pte(h).pfn;
  ASSERT_TRUE(mm.make_cow_shared(h));
  Page page;
  ASSERT_EQ(gup(mm, h, kFollPin, &page), 1);
  EXPECT_TRUE(page.pinned);
  EXPECT_NE(page.pfn, orig);          // FOLL_PIN unshared the page
  EXPECT_FALSE(mm.pte(h).writable);   // ... and mapped the copy read-only
  EXPECT_EQ(mm.frame(page.pfn).held_pins, 1u);
  mm.put_page(page);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, Invariant06_FastPathOnlyForPresentWritableNoFaultPtes) {
  SimHost mm;
  Hva h = *mm.mmap(8 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, &page));  // no PTE
  ASSERT_TRUE(mm.populate(h, kPageSize, false));
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, &page));  // zero page
  ASSERT_TRUE(mm.populate(h + kPageSize, kPageSize, true));
  ASSERT_TRUE(mm.make_cow_shared(h + kPageSize));
  EXPECT_FALSE(mm.get_user_page_fast_only(h + kPageSize, kFollWrite, &page));  // CoW
  ASSERT_TRUE(mm.populate(h + 2 * kPageSize, kPageSize, true));
  ASSERT_TRUE(mm.write_protect(h + 2 * kPageSize));
  EXPECT_FALSE(mm.get_user_page_fast_only(h + 2 * kPageSize, kFollWrite, &page));  // RO PTE
  ASSERT_TRUE(mm.poison(h + 3 * kPageSize));
  EXPECT_FALSE(mm.get_user_page_fast_only(h + 3 * kPageSize, kFollWrite, &page));  // poisoned
  EXPECT_EQ(mm.counters().fast_hits, 0u);

  ASSERT_TRUE(mm.populate(h + 4 * kPageSize, kPageSize, true));
  ASSERT_TRUE(mm.get_user_page_fast_only(h + 4 * kPageSize, kFollWrite, &page));
  EXPECT_EQ(page.pfn, mm.pte(h + 4 * kPageSize).pfn);
  EXPECT_EQ(mm.outstanding_refs(), 1u);
  mm.put_page(page);
  ASSERT_TRUE(mm.get_user_page_fast_only(h + 4 * kPageSize, kFollWrite | kFollPin, &page));
  EXPECT_TRUE(page.pinned);
  EXPECT_EQ(mm.frame(page.pfn).held_pins, 1u);
  mm.put_page(page);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.counters().fast_lookups, 7u);
  EXPECT_EQ(mm.counters().fast_hits, 2u);

  ASSERT_TRUE(mm.inject_fast_miss(h + 4 * kPageSize, 1));
  EXPECT_FALSE(mm.get_user_page_fast_only(h + 4 * kPageSize, kFollWrite, &page));
  ASSERT_TRUE(mm.get_user_page_fast_only(h + 4 * kPageSize, kFollWrite, &page));
  mm.put_page(page);

  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  EXPECT_FALSE(mm.get_user_page_fast_only(p, kFollWrite, &page));  // VM_PFNMAP
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, AnonSharedMemfdFramesAreSharedAndReadFaultMapsWritable) {
  SimHost mm;
  FileId fd = *mm.create_memfd(4 * kPageSize);
  Hva a = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonShared, {.file = fd});
  Hva b = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonShared, {.file = fd});
  Pfn wa = gup_pfn(mm, a, kFollWrite);
  Pfn rb = gup_pfn(mm, b, 0);
  EXPECT_EQ(wa, rb);
  EXPECT_EQ(mm.frame(wa).kind, FrameKind::kPageCache);
  // shmem needs no dirty tracking: a read fault maps the page writable, so a fast write
  // lookup after a read GUP succeeds (row 8).
  Pfn r2 = gup_pfn(mm, a + kPageSize, 0);
  EXPECT_TRUE(mm.pte(a + kPageSize).writable);
  Page page;
  ASSERT_TRUE(mm.get_user_page_fast_only(a + kPageSize, kFollWrite, &page));
  EXPECT_EQ(page.pfn, r2);
  mm.put_page(page);
  EXPECT_EQ(mm.counters().page_ins, 0u);  // a memfd needs no I/O
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
}

TEST(SimHostModel, FileSharedWritenotifyReadMapsReadOnly) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, {.page_cache_resident = true});
  Pfn r = gup_pfn(mm, h, 0);
  EXPECT_FALSE(mm.pte(h).writable);
  Page page;
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, &page));
  EXPECT_EQ(gup_pfn(mm, h, kFollWrite), r);  // made writable in place, no copy
  EXPECT_TRUE(mm.pte(h).writable);
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
  Hva n = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared,
                   {.page_cache_resident = true, .writenotify = false});
  (void)gup_pfn(mm, n, 0);
  EXPECT_TRUE(mm.pte(n).writable);
}

TEST(SimHostModel, Row14_FilePageNotInPageCacheNeedsIo) {
  SimHost mm;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kFileShared);
  EXPECT_FALSE(mm.page_cache_resident(h));
  Page page;
  EXPECT_EQ(gup(mm, h, kFollNowait, &page), 0);
  EXPECT_EQ(gup(mm, h, kFollNowait | kFollWrite, &page), 0);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.pte(h).state, State::kNone);
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);  // read in synchronously
  EXPECT_EQ(mm.counters().page_ins, 1u);
  EXPECT_TRUE(mm.page_cache_resident(h));
  std::memcpy(mm.page_address(page.pfn, h), "disk", 4);
  mm.put_page(page);
  ASSERT_EQ(gup(mm, h, kFollNowait, &page), 1);  // resident now: no I/O
  mm.put_page(page);

  EXPECT_EQ(*mm.evict_from_page_cache(h), 1u);
  EXPECT_FALSE(mm.page_cache_resident(h));
  EXPECT_EQ(mm.pte(h).state, State::kNone);
  EXPECT_EQ(gup(mm, h, kFollNowait, &page), 0);
  ASSERT_EQ(gup(mm, h, 0, &page), 1);
  EXPECT_EQ(std::memcmp(mm.page_address(page.pfn, h), "disk", 4), 0);  // data survived
  // A page with a reference held cannot be evicted.
  EXPECT_EQ(*mm.evict_from_page_cache(h), 0u);
  mm.put_page(page);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, FilePrivateWriteCopiesThePageCachePage) {
  SimHost mm;
  FileId f = *mm.create_file(kPageSize, /*resident=*/true);
  Hva s = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, {.file = f});
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kFilePrivate, {.file = f});
  Pfn cache = gup_pfn(mm, s, kFollWrite);
  EXPECT_EQ(gup_pfn(mm, p, 0), cache);  // read maps the cache page read-only
  EXPECT_FALSE(mm.pte(p).writable);
  Pfn copy = gup_pfn(mm, p, kFollWrite);
  EXPECT_NE(copy, cache);
  EXPECT_EQ(mm.frame(copy).kind, FrameKind::kAnon);
  EXPECT_EQ(mm.counters().cow_breaks, 1u);
}

TEST(SimHostModel, BeyondEndOfFileFaultsWithEfault) {
  SimHost mm;
  FileId f = *mm.create_file(kPageSize, true);
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kFileShared, {.file = f});
  long r;
  gup_pfn(mm, h + kPageSize, 0, &r);
  EXPECT_EQ(r, -EFAULT);  // SIGBUS
  gup_pfn(mm, h, 0, &r);
  EXPECT_EQ(r, 1);
}

TEST(SimHostModel, SwapOutAnonNeedsIoAndKeepsData) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  Pfn old = mm.pte(h).pfn;
  std::memcpy(mm.page_address(old, h), "swap", 4);
  EXPECT_EQ(*mm.swap_out(h), 1u);
  EXPECT_EQ(mm.pte(h).state, State::kSwapped);
  EXPECT_TRUE(mm.frame(old).freed);
  Page page;
  EXPECT_EQ(gup(mm, h, kFollNowait, &page), 0);
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  EXPECT_EQ(std::memcmp(mm.page_address(page.pfn, h), "swap", 4), 0);
  mm.put_page(page);
  EXPECT_EQ(mm.counters().page_ins, 1u);
  // A memfd page "evicted" is swapped out the same way.
  Hva s = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonShared);
  ASSERT_TRUE(mm.populate(s, kPageSize, true));
  EXPECT_EQ(*mm.evict_from_page_cache(s), 1u);
  EXPECT_EQ(gup(mm, s, kFollNowait, &page), 0);
  EXPECT_EQ(mm.swap_out(s).code(), EINVAL);
}

TEST(SimHostModel, PfnmapPtesFollowFixupAndZap) {
  SimHost mm;
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kPfnmap, {.vm_io = true});
  mm.mmap_read_lock();
  std::optional<Vma> vma = mm.vma_lookup(h);
  ASSERT_TRUE(vma);
  EXPECT_EQ(vma->vm_flags & (kVmIo | kVmPfnmap | kVmRead | kVmWrite),
            kVmIo | kVmPfnmap | kVmRead | kVmWrite);
  PfnmapPte pte;
  ASSERT_EQ(mm.follow_pfnmap(h + kPageSize, &pte), 0);
  EXPECT_EQ(pte.pfn, Pfn(mm.vma_info(h)->device_pfn.value + 1));
  EXPECT_TRUE(pte.writable);
  mm.mmap_read_unlock();

  ASSERT_TRUE(mm.zap_pfnmap(h + kPageSize));
  mm.mmap_read_lock();
  EXPECT_EQ(mm.follow_pfnmap(h + kPageSize, &pte), -ENOENT);
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h + kPageSize, true, &unlocked), 0);
  EXPECT_FALSE(unlocked);
  ASSERT_EQ(mm.follow_pfnmap(h + kPageSize, &pte), 0);
  EXPECT_EQ(pte.pfn, Pfn(mm.vma_info(h)->device_pfn.value + 1));  // the same device page again
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.frame(pte.pfn).kind, FrameKind::kDevice);
  EXPECT_EQ(mm.frame(pte.pfn).refcount, 1);  // PFNMAP PTEs hold no references
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, PfnmapMissingAndReadOnlyPtes) {
  SimHost mm;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kPfnmap,
                   {.ptes_present = false, .ptes_writable = false});
  mm.mmap_read_lock();
  PfnmapPte pte;
  EXPECT_EQ(mm.follow_pfnmap(h, &pte), -ENOENT);
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, false, &unlocked), 0);
  ASSERT_EQ(mm.follow_pfnmap(h, &pte), 0);
  EXPECT_FALSE(pte.writable);
  // follow_pfnmap on an ordinary VMA is -EINVAL.
  mm.mmap_read_unlock();
  Hva a = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  mm.mmap_read_lock();
  EXPECT_EQ(mm.follow_pfnmap(a, &pte), -EINVAL);
  mm.mmap_read_unlock();
  // A read-only VMA refuses a write fixup.
  Hva ro = *mm.mmap(kPageSize, Prot::kRead, VmaKind::kPfnmap, {.ptes_present = false});
  mm.mmap_read_lock();
  EXPECT_EQ(mm.fixup_user_fault(ro, true, &unlocked), -EFAULT);
  EXPECT_EQ(mm.fixup_user_fault(ro, false, &unlocked), 0);
  ASSERT_EQ(mm.follow_pfnmap(ro, &pte), 0);
  EXPECT_FALSE(pte.writable);
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, HugepagesGiveMappingLevels) {
  SimHost mm;
  Hva t = *mm.mmap(2 * k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kThp});
  EXPECT_EQ(mm.host_mapping_level(t), PgLevel::k4K);  // nothing mapped yet
  Pfn pfn = gup_pfn(mm, t + 5 * kPageSize, kFollWrite);
  EXPECT_EQ(mm.host_mapping_level(t), PgLevel::k2M);
  EXPECT_EQ(mm.host_mapping_level(t + k2M - kPageSize), PgLevel::k2M);
  EXPECT_EQ(mm.pte(t).pfn.value % 512, 0u);  // naturally aligned folio
  EXPECT_EQ(pfn, Pfn(mm.pte(t).pfn.value + 5));
  EXPECT_EQ(mm.pte(t + 5 * kPageSize).level, PgLevel::k2M);
  // A read of the untouched second 2M maps the 4K zero page.
  EXPECT_EQ(gup_pfn(mm, t + k2M, 0), mm.zero_pfn());
  EXPECT_EQ(mm.host_mapping_level(t + k2M), PgLevel::k4K);
  // A partial munmap splits the huge mapping; the notification covers the whole 2M.
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  ASSERT_TRUE(mm.munmap(t + kPageSize, kPageSize));
  auto ev = n.take();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].start, t);
  EXPECT_EQ(ev[0].end, t + k2M);
  EXPECT_EQ(mm.host_mapping_level(t), PgLevel::k4K);
  mm.unregister_notifier(&n);

  Hva h2 = *mm.mmap(k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kHugetlb2M});
  EXPECT_EQ(h2.value % k2M, 0u);
  (void)gup_pfn(mm, h2 + kPageSize, 0);
  EXPECT_EQ(mm.host_mapping_level(h2), PgLevel::k2M);
  mm.mmap_read_lock();
  EXPECT_TRUE(mm.vma_lookup(h2)->vm_flags & kVmHugetlb);
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.munmap(h2, kPageSize).code(), EINVAL);  // cuts a hugetlb page
  EXPECT_EQ(mm.mprotect(h2, kPageSize, Prot::kRead).code(), EINVAL);
  ASSERT_TRUE(mm.munmap(h2, k2M));

  constexpr uint64_t k1G = uint64_t{1} << 30;
  Hva g = *mm.mmap(k1G, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kHugetlb1G});
  EXPECT_EQ(g.value % k1G, 0u);
  (void)gup_pfn(mm, g + 7 * kPageSize, kFollWrite);
  EXPECT_EQ(mm.host_mapping_level(g + k2M), PgLevel::k1G);
  ASSERT_TRUE(mm.munmap(g, k1G));
  EXPECT_EQ(mm.violations(), 0u);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

TEST(SimHostModel, Rows08And09_HugetlbPrivateReadMapsReadOnlySharedWritable) {
  SimHost mm;
  Hva p = *mm.mmap(k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kHugetlb2M});
  Pfn r = gup_pfn(mm, p + 3 * kPageSize, 0);
  EXPECT_NE(r, mm.zero_pfn());  // hugetlb has no zero page
  EXPECT_FALSE(mm.pte(p).writable);
  Page page;
  EXPECT_FALSE(mm.get_user_page_fast_only(p + 3 * kPageSize, kFollWrite, &page));  // row 9
  EXPECT_EQ(gup_pfn(mm, p + 3 * kPageSize, kFollWrite), r);  // exclusive: no copy
  EXPECT_TRUE(mm.pte(p + 100 * kPageSize).writable);  // the whole huge page
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
  Hva s = *mm.mmap(k2M, kProtRW, VmaKind::kAnonShared, {.backing = PageBacking::kHugetlb2M});
  (void)gup_pfn(mm, s, 0);
  ASSERT_TRUE(mm.get_user_page_fast_only(s, kFollWrite, &page));  // row 8
  mm.put_page(page);
  EXPECT_EQ(mm.make_cow_shared(p).code(), EINVAL);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, MprotectRemovesAndRestoresWrite) {
  SimHost mm;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, 2 * kPageSize, true));
  Pfn pfn = mm.pte(h).pfn;
  ASSERT_TRUE(mm.mprotect(h, kPageSize, Prot::kRead));
  EXPECT_FALSE(mm.pte(h).writable);
  EXPECT_TRUE(mm.pte(h + kPageSize).writable);
  mm.mmap_read_lock();
  EXPECT_EQ(mm.vma_lookup(h)->vm_flags & kVmWrite, 0u);
  EXPECT_EQ(mm.vma_lookup(h)->end, h + kPageSize);  // split
  mm.mmap_read_unlock();
  long r;
  gup_pfn(mm, h, kFollWrite, &r);
  EXPECT_EQ(r, -EFAULT);
  ASSERT_TRUE(mm.mprotect(h, kPageSize, kProtRW));
  EXPECT_FALSE(mm.pte(h).writable);  // adding write changes no PTE
  EXPECT_EQ(gup_pfn(mm, h, kFollWrite), pfn);  // exclusive page: made writable in place
  EXPECT_EQ(mm.counters().cow_breaks, 0u);
}

TEST(SimHostModel, MremapMovesFramesAndPtes) {
  SimHost mm;
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, 4 * kPageSize, true));
  Pfn p1 = mm.pte(h + kPageSize).pfn;
  Hva n = *mm.mremap(h, 4 * kPageSize, 8 * kPageSize);
  EXPECT_NE(n, h);
  EXPECT_EQ(mm.pte(n + kPageSize).pfn, p1);
  EXPECT_EQ(mm.pte(h + kPageSize).state, State::kNone);
  EXPECT_EQ(mm.pte(n + 5 * kPageSize).state, State::kNone);
  EXPECT_FALSE(mm.vma_info(h));
  EXPECT_EQ(mm.vma_info(n)->vma.end, n + 8 * kPageSize);
  // Shrink in place.
  EXPECT_EQ(*mm.mremap(n, 8 * kPageSize, 2 * kPageSize), n);
  EXPECT_EQ(mm.vma_info(n)->vma.end, n + 2 * kPageSize);
  EXPECT_EQ(mm.frame(mm.pte(n).pfn).refcount, 1);
  // Fixed destination.
  Hva dst = *mm.mremap(n, 2 * kPageSize, 2 * kPageSize, Hva(0x7f1000000000));
  EXPECT_EQ(dst, Hva(0x7f1000000000));
  EXPECT_EQ(mm.pte(dst + kPageSize).pfn, p1);
  EXPECT_EQ(mm.mremap(dst, 4 * kPageSize, kPageSize).code(), EFAULT);  // not inside one VMA
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  EXPECT_EQ(mm.mremap(p, kPageSize, 2 * kPageSize).code(), EFAULT);  // VM_DONTEXPAND
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, DiscardDropsAnonDataKeepsSharedData) {
  SimHost mm;
  Hva a = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Hva s = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonShared);
  ASSERT_TRUE(mm.populate(a, kPageSize, true));
  ASSERT_TRUE(mm.populate(s, kPageSize, true));
  Pfn ap = mm.pte(a).pfn;
  Pfn sp = mm.pte(s).pfn;
  std::memcpy(mm.page_address(sp, s), "keep", 4);
  ASSERT_TRUE(mm.discard(a, kPageSize));
  ASSERT_TRUE(mm.discard(s, kPageSize));
  EXPECT_TRUE(mm.frame(ap).freed);
  EXPECT_EQ(gup_pfn(mm, a, 0), mm.zero_pfn());
  EXPECT_EQ(gup_pfn(mm, s, 0), sp);
  EXPECT_EQ(std::memcmp(mm.page_address(sp, s), "keep", 4), 0);
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  EXPECT_EQ(mm.discard(p, kPageSize).code(), EINVAL);
}

TEST(SimHostModel, HeldReferenceKeepsUnmappedFrameAlive) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  ASSERT_TRUE(mm.munmap(h, kPageSize));
  EXPECT_FALSE(mm.frame(page.pfn).freed);
  EXPECT_EQ(mm.frame(page.pfn).refcount, 1);
  EXPECT_NE(mm.page_address(page.pfn, h), nullptr);
  mm.put_page(page);
  EXPECT_TRUE(mm.frame(page.pfn).freed);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostModel, SetupCallRefusedWhileHoldingMmapLockShared) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  mm.mmap_read_lock();
  EXPECT_EQ(mm.munmap(h, kPageSize).code(), EDEADLK);
  EXPECT_EQ(mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate).code(), EDEADLK);
  Page page;
  EXPECT_EQ(gup(mm, h, kFollWrite, &page), 1);  // GUP nests (the v7 hwpoison probe)
  mm.put_page(page);
  mm.mmap_read_unlock();
  EXPECT_TRUE(mm.munmap(h, kPageSize));
}

}  // namespace
}  // namespace gfnmap
