// Bad input to every public function of follow.h: a clear error (KVM's convention: an error
// pfn, a null Page, -1/0), never a crash, never a reference left behind.
#include <gtest/gtest.h>

#include "follow_fixture.h"
#include "gfnmap/follow.h"

namespace gfnmap::test {
namespace {

void expect_clean(SimHost& host) {
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(host.violations(), 0u) << (host.violations() ? host.violation_log()[0].what : "");
}

// A memslot set with the fixture's slot, for the set-based wrappers.
struct WithSet {
  std::unique_ptr<Env> env;
  Memslots memslots;
  WithSet() : env(make_env(State::kPresentWritable)) {
    if (!env) return;
    UserspaceMemoryRegion r;
    r.slot = env->slot.id;
    r.guest_phys_addr = gfn_to_gpa(env->slot.base_gfn).value;
    r.memory_size = env->slot.npages * kPageSize;
    r.userspace_addr = env->slot.userspace_addr.value;
    auto res = memslots.set_memory_region(r);
    EXPECT_TRUE(res.ok()) << error_to_string(res.error());
  }
};

TEST(BadInput, NullSlotEverywhere) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  SimHost& h = env->host;
  const Gfn gfn = env->gfn;

  FollowPfn foll;
  foll.gfn = gfn;
  foll.flags = kFollGet | kFollWrite;
  EXPECT_EQ(follow_pfn(h, foll), kPfnNoslot);
  EXPECT_EQ(foll.hva, kHvaErrBad);

  bool async = false, writable = true;
  Hva hva;
  EXPECT_EQ(gfn_to_pfn_memslot(h, nullptr, gfn, false, true, &async, true, &writable, &hva),
            kPfnNoslot);
  EXPECT_FALSE(async);
  EXPECT_FALSE(writable);
  EXPECT_EQ(hva, kHvaErrBad);
  EXPECT_EQ(gfn_to_pfn_memslot(h, nullptr, gfn), kPfnNoslot);
  EXPECT_EQ(gfn_to_pfn_memslot_atomic(h, nullptr, gfn), kPfnNoslot);

  KvmFollowPfn kfp;
  Page page;
  kfp.gfn = gfn;
  kfp.refcounted_page = &page;
  EXPECT_EQ(kvm_follow_pfn(h, kfp), kPfnNoslot);
  EXPECT_FALSE(page);

  writable = true;
  EXPECT_EQ(faultin_pfn(h, nullptr, gfn, kFollWrite, &writable, &page), kPfnNoslot);
  EXPECT_FALSE(writable);
  EXPECT_FALSE(page);

  Page pages[2];
  EXPECT_EQ(prefetch_pages(h, nullptr, gfn, pages, 2), -1);
  EXPECT_EQ(h.counters().fast_lookups + h.counters().slow_gups, 0u);
  expect_clean(h);
}

TEST(BadInput, GfnNotInTheSetGivesNoslotOrNullPage) {
  WithSet w;
  ASSERT_TRUE(w.env);
  MemslotsReadLock lock = w.memslots.read_lock();
  const MemslotSet& set = lock.set(0);
  const Gfn outside = kBaseGfn + kSlotPages + 100;
  bool writable = true;
  EXPECT_EQ(gfn_to_pfn_prot(w.env->host, set, outside, false, &writable), kPfnNoslot);
  EXPECT_FALSE(writable);
  EXPECT_EQ(gfn_to_pfn(w.env->host, set, outside), kPfnNoslot);
  EXPECT_FALSE(gfn_to_page(w.env->host, set, outside, true));
  EXPECT_FALSE(gfn_to_page(w.env->host, set, outside, false));
  expect_clean(w.env->host);

  // Inside the set they work, and balance.
  Page page = gfn_to_page(w.env->host, set, w.env->gfn, true);
  ASSERT_TRUE(page);
  EXPECT_EQ(page.pfn, w.env->host.pte(w.env->hva).pfn);
  release_page_dirty(page);
  Pfn pfn = gfn_to_pfn_prot(w.env->host, set, w.env->gfn, false, &writable);
  EXPECT_EQ(pfn, w.env->host.pte(w.env->hva).pfn);
  EXPECT_TRUE(writable);  // upgraded: the page is host-writable
  release_pfn_dirty(w.env->host, pfn, w.env->hva);
  pfn = gfn_to_pfn(w.env->host, set, w.env->gfn);
  EXPECT_EQ(pfn, w.env->host.pte(w.env->hva).pfn);
  release_pfn_dirty(w.env->host, pfn, w.env->hva);
  expect_clean(w.env->host);
}

// gfn_to_page of a non-refcounted pfn (PFNMAP) is a null Page, nothing held.
TEST(BadInput, GfnToPageOfPfnmapIsNull) {
  std::unique_ptr<Env> env = make_env(State::kPfnmap);
  ASSERT_TRUE(env);
  Memslots memslots;
  UserspaceMemoryRegion r;
  r.slot = 1;
  r.guest_phys_addr = gfn_to_gpa(kBaseGfn).value;
  r.memory_size = kSlotPages * kPageSize;
  r.userspace_addr = env->slot.userspace_addr.value;
  ASSERT_TRUE(memslots.set_memory_region(r).ok());
  MemslotsReadLock lock = memslots.read_lock();
  EXPECT_FALSE(gfn_to_page(env->host, lock.set(0), env->gfn, true));
  EXPECT_FALSE(gfn_to_page(env->host, lock.set(0), env->gfn, false));
  expect_clean(env->host);
}

// A gfn outside the slot passed directly (the callers' contract is gfn in slot): the hva is
// clamped like array_index_nospec does, to the slot's first page, never beyond the slot.
TEST(BadInput, GfnOutsideTheSlotResolvesTheSlotsFirstPage) {
  for (Gfn gfn : {kBaseGfn + kSlotPages, kBaseGfn + 1000, kBaseGfn - 1, Gfn(0), Gfn(~0ULL)}) {
    SCOPED_TRACE(gfn.value);
    std::unique_ptr<Env> env = make_env(State::kPresentWritable);
    ASSERT_TRUE(env);
    FollowPfn foll;
    foll.slot = env->slot_ptr();
    foll.gfn = gfn;
    foll.flags = kFollGet;
    Pfn pfn = follow_pfn(env->host, foll);
    EXPECT_EQ(foll.hva, env->slot.userspace_addr);
    release_pfn_clean(env->host, pfn, foll.hva);

    bool writable = false;
    Page page;
    pfn = faultin_pfn(env->host, env->slot_ptr(), gfn, kFollWrite, &writable, &page);
    EXPECT_FALSE(is_error_noslot_pfn(pfn));
    EXPECT_EQ(page.hva, env->slot.userspace_addr);
    release_faultin_page(page, false, writable);

    Page pages[kSlotPages];
    int got = prefetch_pages(env->host, env->slot_ptr(), gfn, pages, 1);
    EXPECT_GE(got, 0);
    for (int i = 0; i < got; ++i) release_page_unused(pages[i]);
    expect_clean(env->host);
  }
}

TEST(BadInput, FlagsOutsideTheAllowedSet) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  SimHost& h = env->host;
  for (FollFlags bad : {kFollPin, kFollHwpoison, kFollHonorNumaFault, FollFlags{1u << 20},
                        kFollWrite | kFollPin, ~FollFlags{0}}) {
    SCOPED_TRACE(foll_flags_to_string(bad));
    FollowPfn foll;
    foll.slot = env->slot_ptr();
    foll.gfn = env->gfn;
    foll.flags = bad | kFollGet;
    EXPECT_EQ(follow_pfn(h, foll), kPfnErrFault);
    EXPECT_EQ(foll.hva, kHvaErrBad);

    bool writable = true;
    Page page;
    EXPECT_EQ(faultin_pfn(h, env->slot_ptr(), env->gfn, bad, &writable, &page), kPfnErrFault);
    EXPECT_FALSE(writable);
    EXPECT_FALSE(page);
  }
  // kFollGet is a v7 flag: the merged API refuses it.
  bool writable = true;
  Page page;
  EXPECT_EQ(faultin_pfn(h, env->slot_ptr(), env->gfn, kFollGet, &writable, &page), kPfnErrFault);
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.flags = kFollGet | kFollWrite;
  kfp.refcounted_page = &page;
  EXPECT_EQ(kvm_follow_pfn(h, kfp), kPfnErrFault);
  EXPECT_EQ(h.counters().fast_lookups + h.counters().slow_gups, 0u);
  expect_clean(h);
}

TEST(BadInput, MissingOutPointersRow27) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  EXPECT_EQ(faultin_pfn(env->host, env->slot_ptr(), env->gfn, 0, nullptr, nullptr),
            kPfnErrFault);
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  EXPECT_EQ(kvm_follow_pfn(env->host, kfp), kPfnErrFault);
  // The legacy wrapper's pointers are all optional: none given is a plain write fault.
  Pfn pfn = gfn_to_pfn_memslot(env->host, env->slot_ptr(), env->gfn, false, false, nullptr, true,
                               nullptr, nullptr);
  EXPECT_FALSE(is_error_noslot_pfn(pfn));
  release_pfn_dirty(env->host, pfn, env->hva);
  expect_clean(env->host);
}

TEST(BadInput, PinWithMapWritableInvariant08) {
  // Fast path: a present writable page is pinned and reported writable (no upgrade involved).
  // Slow path: never upgraded (Invariant08 test); here: nothing leaks either way.
  for (State state : {State::kPresentWritable, State::kFastMissOnce, State::kZeroPage}) {
    SCOPED_TRACE(to_string(state));
    std::unique_ptr<Env> env = make_env(state);
    ASSERT_TRUE(env);
    bool map_writable = true;
    Page page;
    KvmFollowPfn kfp;
    kfp.slot = env->slot_ptr();
    kfp.gfn = env->gfn;
    kfp.pin = true;
    kfp.map_writable = &map_writable;
    kfp.refcounted_page = &page;
    FollowTrace trace;
    Pfn pfn = kvm_follow_pfn(env->host, kfp, {}, &trace);
    ASSERT_FALSE(is_error_noslot_pfn(pfn));
    EXPECT_FALSE(has_row(trace, 8)) << trace_to_string(trace);
    if (trace.path == FollowPath::kSlow) {
      EXPECT_FALSE(map_writable);
    }
    ASSERT_TRUE(page);
    EXPECT_TRUE(page.pinned);
    release_faultin_page(page, false, map_writable);
    expect_clean(env->host);
  }
}

TEST(BadInput, PrefetchPagesBadCounts) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  Page pages[kSlotPages + 1];
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, pages, -1), 0);
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, pages, 0), 0);
  // More pages than remain in the slot: 0, nothing taken.
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, pages,
                           int(kSlotPages - kPageIndex + 1)),
            0);
  // A READONLY slot: the write-intent hva is an error hva.
  Memslot ro = env->slot;
  ro.flags |= kMemReadonly;
  EXPECT_EQ(prefetch_pages(env->host, &ro, env->gfn, pages, 1), -1);
  // Only the present writable page is obtained; the lookup stops at the first miss.
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, pages, 2), 1);
  EXPECT_EQ(pages[0].pfn, env->host.pte(env->hva).pfn);
  release_page_unused(pages[0]);
  expect_clean(env->host);
}

TEST(BadInput, PrefetchPagesNullArrayIsAnErrorNotACrash) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, nullptr, 1), -1);
  EXPECT_EQ(prefetch_pages(env->host, env->slot_ptr(), env->gfn, nullptr, 0), 0);
  expect_clean(env->host);
}

TEST(BadInput, ReleaseOfAForeignOrForgedPageIsAViolationNotACrash) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  release_page_clean(Page{&env->host, Pfn(0x123456789), Hva(0x1000), false});
  release_faultin_page(Page{&env->host, kPfnErrFault, kHvaErrBad, true}, false, true);
  EXPECT_GE(env->host.violations(), 1u);
  EXPECT_EQ(env->host.outstanding_refs(), 0u);
}

}  // namespace
}  // namespace gfnmap::test
