// Release helpers of spec 6: unused / clean / dirty / faultin_page rules, null no-ops, reserved
// pages never marked (invariant 18, helper part), v7 release_pfn_* ignoring error/noslot pfns.
#include <gtest/gtest.h>

#include "follow_fixture.h"
#include "gfnmap/follow.h"

namespace gfnmap::test {
namespace {

// A page with one reference held, from a write fault on a fresh anonymous page.
struct Held {
  std::unique_ptr<Env> env;
  Faultin f;
};

Held hold(State state, FollFlags flags) {
  Held h{make_env(state), {}};
  if (!h.env) {
    ADD_FAILURE() << "cannot build " << to_string(state);
    return h;
  }
  h.f = faultin(*h.env, flags);
  if (!h.f.page) ADD_FAILURE() << "no page held: " << trace_to_string(h.f.trace);
  return h;
}

void expect_marks(SimHost& host, Pfn pfn, bool dirty, bool accessed) {
  FrameInfo frame = host.frame(pfn);
  EXPECT_EQ(frame.dirty, dirty);
  EXPECT_EQ(frame.accessed, accessed);
  EXPECT_EQ(frame.held_refs, 0u);
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(host.violations(), 0u) << (host.violations() ? host.violation_log()[0].what : "");
}

TEST(Release, UnusedPutsWithoutMarking) {
  Held h = hold(State::kPresentWritable, kFollWrite);
  ASSERT_TRUE(h.f.page);
  const uint64_t puts = h.env->host.counters().puts;
  release_page_unused(h.f.page);
  EXPECT_EQ(h.env->host.counters().puts, puts + 1);
  expect_marks(h.env->host, h.f.pfn, false, false);
}

TEST(Release, CleanMarksAccessedOnly) {
  Held h = hold(State::kPresentWritable, kFollWrite);
  ASSERT_TRUE(h.f.page);
  release_page_clean(h.f.page);
  expect_marks(h.env->host, h.f.pfn, false, true);
}

TEST(Release, DirtyMarksDirtyAndAccessed) {
  Held h = hold(State::kPresentWritable, kFollWrite);
  ASSERT_TRUE(h.f.page);
  release_page_dirty(h.f.page);
  expect_marks(h.env->host, h.f.pfn, true, true);
}

TEST(Release, FaultinPageRules) {
  struct Case {
    bool unused, dirty, want_dirty, want_accessed;
  };
  for (Case c : {Case{true, false, false, false}, Case{true, true, false, false},
                 Case{false, true, true, true}, Case{false, false, false, true}}) {
    SCOPED_TRACE(testing::Message() << "unused=" << c.unused << " dirty=" << c.dirty);
    Held h = hold(State::kPresentWritable, kFollWrite);
    ASSERT_TRUE(h.f.page);
    release_faultin_page(h.f.page, c.unused, c.dirty);
    expect_marks(h.env->host, h.f.pfn, c.want_dirty, c.want_accessed);
  }
}

TEST(Release, PinnedPageIsUnpinned) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.flags = kFollWrite;
  kfp.pin = true;
  kfp.refcounted_page = &page;
  Pfn pfn = kvm_follow_pfn(env->host, kfp);
  ASSERT_TRUE(page);
  EXPECT_TRUE(page.pinned);
  EXPECT_EQ(env->host.frame(pfn).held_pins, 1u);
  release_faultin_page(page, false, true);
  EXPECT_EQ(env->host.frame(pfn).held_pins, 0u);
  expect_marks(env->host, pfn, true, true);
}

TEST(Release, NullPageIsANoOp) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  release_page_unused(Page{});
  release_page_clean(Page{});
  release_page_dirty(Page{});
  for (bool unused : {false, true}) {
    for (bool dirty : {false, true}) release_faultin_page(Page{}, unused, dirty);
  }
  EXPECT_EQ(env->host.counters().puts, 0u);
  EXPECT_EQ(env->host.violations(), 0u);
}

// Invariant 18 (helper part): PageReserved pages are never marked accessed or dirty. The zero
// page is reserved and refcounted: a read fault of a never-written anonymous page holds it.
TEST(Release, Invariant18_ReservedPagesNeverMarked) {
  for (bool unused : {false, true}) {
    for (bool dirty : {false, true}) {
      SCOPED_TRACE(testing::Message() << "unused=" << unused << " dirty=" << dirty);
      Held h = hold(State::kZeroPage, 0);
      ASSERT_TRUE(h.f.page);
      ASSERT_EQ(h.f.pfn, h.env->host.zero_pfn());
      ASSERT_TRUE(h.env->host.page_reserved(h.f.page));
      release_faultin_page(h.f.page, unused, dirty);
      expect_marks(h.env->host, h.f.pfn, false, false);
    }
  }
  // The explicit helpers too.
  for (int helper = 0; helper < 3; ++helper) {
    Held h = hold(State::kZeroPage, 0);
    ASSERT_TRUE(h.f.page);
    if (helper == 0) release_page_unused(h.f.page);
    if (helper == 1) release_page_clean(h.f.page);
    if (helper == 2) release_page_dirty(h.f.page);
    expect_marks(h.env->host, h.f.pfn, false, false);
  }
  // [v7] release_pfn_dirty of the zero page found by the heuristic: put, not marked.
  std::unique_ptr<Env> env = make_env(State::kZeroPage);
  ASSERT_TRUE(env);
  Hva hva;
  Pfn pfn = gfn_to_pfn_memslot(env->host, env->slot_ptr(), env->gfn, false, false, nullptr,
                               false, nullptr, &hva);
  ASSERT_EQ(pfn, env->host.zero_pfn());
  EXPECT_EQ(env->host.outstanding_refs(), 1u);
  release_pfn_dirty(env->host, pfn, hva);
  expect_marks(env->host, pfn, false, false);
}

TEST(Release, V7ReleasePfnIgnoresErrorAndNoslotPfns) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  for (Pfn pfn : {kPfnErrFault, kPfnErrHwpoison, kPfnErrRoFault, kPfnErrSigpending,
                  kPfnErrNeedsIo, kPfnNoslot, Pfn(kPfnErrMask | 0x1234)}) {
    SCOPED_TRACE(pfn_to_string(pfn));
    release_pfn_clean(env->host, pfn, env->hva);
    release_pfn_dirty(env->host, pfn, env->hva);
    release_pfn_clean(env->host, pfn, kHvaErrBad);
  }
  EXPECT_EQ(env->host.counters().puts, 0u);
  EXPECT_EQ(env->host.violations(), 0u);
}

TEST(Release, V7ReleasePfnCleanAndDirty) {
  for (bool dirty : {false, true}) {
    std::unique_ptr<Env> env = make_env(State::kPresentWritable);
    ASSERT_TRUE(env);
    Hva hva;
    bool writable = false;
    Pfn pfn = gfn_to_pfn_memslot(env->host, env->slot_ptr(), env->gfn, false, false, nullptr,
                                 true, &writable, &hva);
    ASSERT_FALSE(is_error_noslot_pfn(pfn));
    EXPECT_TRUE(writable);
    EXPECT_EQ(env->host.outstanding_refs(), 1u);
    if (dirty) {
      release_pfn_dirty(env->host, pfn, hva);
    } else {
      release_pfn_clean(env->host, pfn, hva);
    }
    expect_marks(env->host, pfn, dirty, true);
  }
}

// [v7] pfns without a refcounted page (PFNMAP without struct page, reserved carve-outs) hold no
// reference and their release is a no-op.
TEST(Release, V7ReleasePfnOfNonRefcountedPfnIsNoOp) {
  for (State state : {State::kPfnmapNoStructPage, State::kPfnmapReserved}) {
    SCOPED_TRACE(to_string(state));
    std::unique_ptr<Env> env = make_env(state);
    ASSERT_TRUE(env);
    Hva hva;
    Pfn pfn = gfn_to_pfn_memslot(env->host, env->slot_ptr(), env->gfn, false, false, nullptr,
                                 true, nullptr, &hva);
    ASSERT_FALSE(is_error_noslot_pfn(pfn));
    EXPECT_EQ(env->host.outstanding_refs(), 0u);
    release_pfn_dirty(env->host, pfn, hva);
    EXPECT_EQ(env->host.counters().puts, 0u);
    EXPECT_EQ(env->host.violations(), 0u);
  }
}

// Releasing twice is a bug the host model sees (and reports as a violation, never a crash):
// that is what makes the balance assertions of the other tests meaningful.
TEST(Release, DoubleReleaseIsSeenAsAViolation) {
  Held h = hold(State::kPresentWritable, kFollWrite);
  ASSERT_TRUE(h.f.page);
  release_page_clean(h.f.page);
  EXPECT_EQ(h.env->host.violations(), 0u);
  release_page_clean(h.f.page);
  EXPECT_GE(h.env->host.violations(), 1u);
  EXPECT_EQ(h.env->host.outstanding_refs(), 0u);
}

}  // namespace
}  // namespace gfnmap::test
