// gfnmap tests, host: SimHost's MMU-notifier driver: every change that replaces or removes a
// translation is bracketed (start before it, end after it, page-aligned ranges); aging; release.
#include <cerrno>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

using K = test::RecordingNotifier::Kind;
using State = PteInfo::State;
constexpr uint64_t k2M = uint64_t{2} << 20;

// Runs `change` with a notifier that checks, inside start, that the page's PTE is still what
// it was before the change and, inside end, that it is what it is after the change.
template <class Change>
void expect_bracket(SimHost& mm, Hva probe, Hva want_start, Hva want_end, Change&& change) {
  test::RecordingNotifier n;
  const PteInfo before = mm.pte(probe);
  PteInfo at_start, at_end;
  n.on_start = [&](Hva, Hva) { at_start = mm.pte(probe); };
  n.on_end = [&](Hva, Hva) { at_end = mm.pte(probe); };
  mm.register_notifier(&n);
  change();
  mm.unregister_notifier(&n);
  const PteInfo after = mm.pte(probe);
  auto events = n.take();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, K::kStart);
  EXPECT_EQ(events[1].kind, K::kEnd);
  EXPECT_EQ(events[0].start, want_start);
  EXPECT_EQ(events[0].end, want_end);
  test::expect_bracketed(events);
  EXPECT_EQ(at_start.state, before.state);
  EXPECT_EQ(at_start.pfn, before.pfn);
  EXPECT_EQ(at_start.writable, before.writable);
  EXPECT_EQ(at_end.state, after.state);
  EXPECT_EQ(at_end.pfn, after.pfn);
  EXPECT_EQ(at_end.writable, after.writable);
}

TEST(SimHostNotifier, Invariant16_EveryChangeIsBracketed) {
  SimHost mm;
  Hva h = *mm.mmap(8 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, 8 * kPageSize, true));
  const Hva p1 = h + kPageSize;
  expect_bracket(mm, p1, p1, p1 + kPageSize, [&] { ASSERT_TRUE(mm.write_protect(p1)); });
  EXPECT_FALSE(mm.pte(p1).writable);
  expect_bracket(mm, h, h, h + 2 * kPageSize,
                 [&] { ASSERT_TRUE(mm.mprotect(h, 2 * kPageSize, Prot::kRead)); });
  expect_bracket(mm, h + 2 * kPageSize, h + 2 * kPageSize, h + 3 * kPageSize,
                 [&] { ASSERT_TRUE(mm.make_cow_shared(h + 2 * kPageSize)); });
  EXPECT_TRUE(mm.pte(h + 2 * kPageSize).cow_shared);
  expect_bracket(mm, h + 3 * kPageSize, h + 3 * kPageSize, h + 4 * kPageSize,
                 [&] { ASSERT_TRUE(mm.discard(h + 3 * kPageSize, kPageSize)); });
  EXPECT_EQ(mm.pte(h + 3 * kPageSize).state, State::kNone);
  expect_bracket(mm, h + 4 * kPageSize, h + 4 * kPageSize, h + 5 * kPageSize,
                 [&] { ASSERT_EQ(*mm.swap_out(h + 4 * kPageSize), 1u); });
  EXPECT_EQ(mm.pte(h + 4 * kPageSize).state, State::kSwapped);
  expect_bracket(mm, h + 5 * kPageSize, h + 5 * kPageSize, h + 6 * kPageSize,
                 [&] { ASSERT_TRUE(mm.poison(h + 5 * kPageSize)); });
  EXPECT_EQ(mm.pte(h + 5 * kPageSize).state, State::kHwpoison);
  // A write GUP on the CoW-shared page replaces its frame inside a bracket.
  expect_bracket(mm, h + 2 * kPageSize, h + 2 * kPageSize, h + 3 * kPageSize,
                 [&] { (void)test::gup_pfn(mm, h + 2 * kPageSize, kFollWrite); });
  EXPECT_TRUE(mm.pte(h + 2 * kPageSize).writable);
  // mremap: the old range.
  Hva moved;
  expect_bracket(mm, h + 6 * kPageSize, h + 6 * kPageSize, h + 8 * kPageSize, [&] {
    moved = *mm.mremap(h + 6 * kPageSize, 2 * kPageSize, 4 * kPageSize);
  });
  EXPECT_EQ(mm.pte(moved).state, State::kPresent);
  expect_bracket(mm, h, h, h + 6 * kPageSize, [&] { ASSERT_TRUE(mm.munmap(h, 6 * kPageSize)); });
  EXPECT_EQ(mm.pte(h).state, State::kNone);
  // PFNMAP zap.
  Hva p = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kPfnmap);
  expect_bracket(mm, p, p, p + 2 * kPageSize, [&] { ASSERT_TRUE(mm.zap_pfnmap(p, 2 * kPageSize)); });
  EXPECT_EQ(mm.pte(p).state, State::kNone);
  // Page-cache eviction of a file page mapped twice: one bracket per mapping.
  FileId f = *mm.create_file(kPageSize, /*resident=*/true);
  MmapOptions fo;
  fo.file = f;
  Hva a = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, fo);
  Hva b = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared, fo);
  ASSERT_TRUE(mm.populate(a, kPageSize, false));
  ASSERT_TRUE(mm.populate(b, kPageSize, false));
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  ASSERT_EQ(*mm.evict_from_page_cache(a), 1u);
  mm.unregister_notifier(&n);
  auto events = n.take();
  EXPECT_EQ(events.size(), 4u);
  test::expect_bracketed(events);
  EXPECT_EQ(mm.pte(b).state, State::kNone);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostNotifier, FillingAnEmptyPteIsNotAnInvalidation) {
  SimHost mm;
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  (void)test::gup_pfn(mm, h + kPageSize, 0);  // zero page
  Hva f = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared);
  (void)test::gup_pfn(mm, f, kFollWrite);  // page-in
  MmapOptions o;
  o.ptes_present = false;
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, o);
  mm.mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(p, true, &unlocked), 0);
  mm.mmap_read_unlock();
  // munmap of an unmapped range changes nothing; neither does making a read-only PTE of an
  // exclusive page writable in place (do_wp_page reuse).
  ASSERT_TRUE(mm.munmap(Hva(0x100000), kPageSize));
  ASSERT_TRUE(mm.mprotect(h, kPageSize, Prot::kRead));
  ASSERT_TRUE(mm.mprotect(h, kPageSize, kProtRW));
  n.take();
  mm.reset_counters();
  (void)test::gup_pfn(mm, h, kFollWrite);
  EXPECT_TRUE(mm.pte(h).writable);
  EXPECT_TRUE(n.take().empty());
  EXPECT_EQ(mm.counters().invalidations, 0u);
  mm.unregister_notifier(&n);
}

TEST(SimHostNotifier, HugeMappingsWidenTheRange) {
  SimHost mm;
  Hva t = *mm.mmap(k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kThp});
  ASSERT_TRUE(mm.populate(t, kPageSize, true));
  ASSERT_EQ(mm.host_mapping_level(t), PgLevel::k2M);
  expect_bracket(mm, t + 3 * kPageSize, t, t + k2M,
                 [&] { ASSERT_TRUE(mm.write_protect(t + 3 * kPageSize)); });
  Hva g = *mm.mmap(k2M, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kHugetlb2M});
  ASSERT_TRUE(mm.populate(g, kPageSize, false));
  expect_bracket(mm, g, g, g + k2M, [&] { ASSERT_TRUE(mm.poison(g + 5 * kPageSize)); });
  EXPECT_EQ(mm.pte(g + 100 * kPageSize).state, State::kHwpoison);  // the whole huge page
}

TEST(SimHostNotifier, Invariant19_AgingCallsYoungCallbacks) {
  SimHost mm;
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  Hva h = *mm.mmap(4 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  EXPECT_TRUE(mm.pte(h).young);

  AgeResult r = mm.test_young(h, h + 4 * kPageSize);
  EXPECT_TRUE(r.primary_young);
  EXPECT_FALSE(r.secondary_young);
  EXPECT_TRUE(mm.pte(h).young);  // test_young has no side effects

  n.young = true;
  r = mm.age_range(h + 1, h + 4 * kPageSize - 1, /*flush=*/false);  // rounded outward
  EXPECT_TRUE(r.primary_young);
  EXPECT_TRUE(r.secondary_young);
  EXPECT_FALSE(mm.pte(h).young);
  r = mm.age_range(h, h + 4 * kPageSize, /*flush=*/true);
  EXPECT_FALSE(r.primary_young);
  EXPECT_TRUE(r.secondary_young);
  auto events = n.take();
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].kind, K::kTestYoung);
  EXPECT_EQ(events[1].kind, K::kClearYoung);
  EXPECT_EQ(events[1].start, h);
  EXPECT_EQ(events[1].end, h + 4 * kPageSize);
  EXPECT_EQ(events[2].kind, K::kClearFlushYoung);
  // An access through GUP makes the PTE young again.
  (void)test::gup_pfn(mm, h, 0);
  EXPECT_TRUE(mm.pte(h).young);
  EXPECT_FALSE(mm.age_range(h + kPageSize, h, false).primary_young);  // empty range
  mm.unregister_notifier(&n);
  EXPECT_FALSE(mm.age_range(h, h + kPageSize, false).secondary_young);  // nobody subscribed
}

TEST(SimHostNotifier, ExitMmapReleasesAndDropsEverything) {
  SimHost mm;
  test::RecordingNotifier n;
  mm.register_notifier(&n);
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, 2 * kPageSize, true));
  Page page;
  ASSERT_EQ(test::gup(mm, h, kFollWrite, &page), 1);
  mm.exit_mmap();
  auto events = n.take();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, K::kRelease);
  EXPECT_FALSE(mm.vma_info(h));
  EXPECT_FALSE(mm.frame(page.pfn).freed);  // our reference keeps it
  mm.put_page(page);
  EXPECT_TRUE(mm.frame(page.pfn).freed);
  mm.unregister_notifier(&n);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostNotifier, UnregisterFromInsideACallbackDoesNotDeadlock) {
  SimHost mm;
  test::RecordingNotifier n;
  n.on_start = [&](Hva, Hva) { mm.unregister_notifier(&n); };
  mm.register_notifier(&n);
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  ASSERT_TRUE(mm.munmap(h, kPageSize));  // start unregisters; end still comes (same bracket)
  EXPECT_EQ(n.count(K::kStart), 1u);
  EXPECT_EQ(n.count(K::kEnd), 1u);
  Hva h2 = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h2, kPageSize, true));
  ASSERT_TRUE(mm.munmap(h2, kPageSize));
  EXPECT_EQ(n.count(K::kStart), 1u);  // gone now
}

}  // namespace
}  // namespace gfnmap
