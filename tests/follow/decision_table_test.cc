// The decision table of spec 4, one test per row (RowNN_<what>): host state built with SimHost,
// the API the row names, return value, writable, reference held, trace row, and balance after
// the release rules of spec 6.
#include <gtest/gtest.h>

#include <cerrno>

#include "follow_fixture.h"
#include "gfnmap/follow.h"

namespace gfnmap::test {
namespace {

// After the release: nothing held, nothing misused.
void expect_balanced(SimHost& host) {
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(host.violations(), 0u) << (host.violations() ? host.violation_log()[0].what : "");
}

// A merged error row: return value, nothing reported, nothing held, trace row.
void expect_error_row(Env& env, FollFlags flags, Pfn want, int row) {
  Faultin f = faultin(env, flags);
  EXPECT_EQ(f.pfn, want) << pfn_to_string(f.pfn) << "\n" << trace_to_string(f.trace);
  EXPECT_FALSE(f.writable);
  EXPECT_FALSE(f.page);
  EXPECT_EQ(f.page, Page{});
  EXPECT_TRUE(has_row(f.trace, row)) << trace_to_string(f.trace);
  EXPECT_EQ(env.host.outstanding_refs(), 0u);
  release_installed(f);  // a null page: no-op
  expect_balanced(env.host);
}

// A merged success row with a reference: pfn is the page's, exactly one reference held on it.
void expect_held(Env& env, const Faultin& f) {
  ASSERT_FALSE(is_error_noslot_pfn(f.pfn)) << pfn_to_string(f.pfn) << "\n"
                                            << trace_to_string(f.trace);
  ASSERT_TRUE(f.page) << trace_to_string(f.trace);
  EXPECT_EQ(f.page.pfn, f.pfn);
  EXPECT_EQ(f.page.mm, &env.host);
  EXPECT_FALSE(f.page.pinned);
  EXPECT_EQ(env.host.outstanding_refs(), 1u);
  FrameInfo frame = env.host.frame(f.pfn);
  EXPECT_EQ(frame.held_refs, 1u);
  EXPECT_EQ(frame.held_pins, 0u);
}

// Releases a merged result by spec 6 (installed: dirty iff writable) and checks that exactly
// the reference the call reported goes away: the frame's refcount drops by one for a held page
// (so it was +1 while held) and is untouched for a null Page; then nothing is outstanding.
void release_checked(Env& env, const Faultin& f) {
  const bool frame_known = !is_error_noslot_pfn(f.pfn) && env.host.frame(f.pfn).valid;
  const int64_t held = frame_known ? env.host.frame(f.pfn).refcount : 0;
  release_installed(f);
  if (frame_known) {
    EXPECT_EQ(env.host.frame(f.pfn).refcount, f.page ? held - 1 : held)
        << "refcount while held " << held;
  }
  expect_balanced(env.host);
}

std::unique_ptr<Env> env_or_fail(State state) {
  std::unique_ptr<Env> env = make_env(state);
  if (!env) ADD_FAILURE() << "cannot build " << to_string(state);
  return env;
}

#define ENV(name, state)                          \
  std::unique_ptr<Env> name = env_or_fail(state); \
  ASSERT_TRUE(name)

TEST(DecisionTable, Row01_NoSlotIsNoslot) {
  ENV(env, State::kNoSlot);
  expect_error_row(*env, 0, kPfnNoslot, 1);
  expect_error_row(*env, kFollWrite, kPfnNoslot, 1);
  EXPECT_EQ(env->host.counters().fast_lookups + env->host.counters().slow_gups, 0u);
}

TEST(DecisionTable, Row02_InvalidSlotIsNoslot) {
  ENV(env, State::kInvalidSlot);
  expect_error_row(*env, 0, kPfnNoslot, 2);
  expect_error_row(*env, kFollWrite | kFollNowait, kPfnNoslot, 2);
  EXPECT_EQ(env->host.counters().fast_lookups + env->host.counters().slow_gups, 0u);
}

TEST(DecisionTable, Row03_ReadonlySlotWriteIsRoFault) {
  ENV(env, State::kReadonlySlot);
  expect_error_row(*env, kFollWrite, kPfnErrRoFault, 3);
  EXPECT_EQ(env->host.counters().fast_lookups + env->host.counters().slow_gups, 0u);
}

TEST(DecisionTable, Row04_ReadonlySlotReadNeverWritable) {
  // The page is present and host-writable, yet a READONLY slot never reports writable and
  // never looks for the upgrade.
  ENV(env, State::kReadonlySlot);
  Faultin f = faultin(*env, 0);
  expect_held(*env, f);
  EXPECT_FALSE(f.writable);
  EXPECT_TRUE(has_row(f.trace, 4)) << trace_to_string(f.trace);
  EXPECT_TRUE(has_row(f.trace, 9)) << trace_to_string(f.trace);
  EXPECT_EQ(f.pfn, env->host.pte(env->hva).pfn);
  EXPECT_EQ(env->host.counters().fast_lookups, 0u);
  release_checked(*env, f);

  // The same through the raw request: map_writable is written false even though the caller
  // preset it true.
  bool map_writable = true;
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.map_writable = &map_writable;
  kfp.refcounted_page = &page;
  Pfn pfn = kvm_follow_pfn(env->host, kfp);
  EXPECT_FALSE(is_error_noslot_pfn(pfn));
  EXPECT_FALSE(map_writable);
  release_faultin_page(page, false, map_writable);
  expect_balanced(env->host);
}

TEST(DecisionTable, Row05_FastPathPresentWritable) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollWrite | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kPresentWritable);
    const Pfn mapped = env->host.pte(env->hva).pfn;
    const int64_t refcount_before = env->host.frame(mapped).refcount;
    Faultin f = faultin(*env, flags);
    expect_held(*env, f);
    EXPECT_EQ(f.pfn, mapped);
    EXPECT_TRUE(f.writable);
    EXPECT_EQ(f.trace.path, FollowPath::kFast);
    EXPECT_TRUE(has_row(f.trace, 5)) << trace_to_string(f.trace);
    EXPECT_EQ(env->host.frame(mapped).refcount, refcount_before + 1);
    EXPECT_EQ(env->host.counters().slow_gups, 0u);
    release_checked(*env, f);
    EXPECT_EQ(env->host.frame(mapped).refcount, refcount_before);
    EXPECT_TRUE(env->host.frame(mapped).dirty);  // released dirty: host mapping writable
    EXPECT_TRUE(env->host.frame(mapped).accessed);
  }
}

TEST(DecisionTable, Row06_ReadWithoutMapWritableSkipsFastPath) {
  ENV(env, State::kPresentWritable);
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.refcounted_page = &page;  // map_writable == nullptr: gfn_to_page(read)-like
  FollowTrace trace;
  Pfn pfn = kvm_follow_pfn(env->host, kfp, {}, &trace);
  EXPECT_TRUE(has_row(trace, 6)) << trace_to_string(trace);
  EXPECT_EQ(trace.path, FollowPath::kSlow);
  EXPECT_EQ(env->host.counters().fast_lookups, 0u);
  EXPECT_EQ(env->host.counters().slow_gups, 1u);
  ASSERT_TRUE(page);
  EXPECT_EQ(page.pfn, pfn);
  EXPECT_EQ(env->host.outstanding_refs(), 1u);
  release_page_clean(page);
  expect_balanced(env->host);
}

TEST(DecisionTable, Row07_SlowGupWriteBreaksCow) {
  ENV(env, State::kCowShared);
  const Pfn shared = env->host.pte(env->hva).pfn;
  Faultin f = faultin(*env, kFollWrite);
  expect_held(*env, f);
  EXPECT_TRUE(f.writable);
  EXPECT_TRUE(has_row(f.trace, 7)) << trace_to_string(f.trace);
  EXPECT_EQ(f.trace.path, FollowPath::kSlow);
  EXPECT_NE(f.pfn, shared);  // a private copy
  EXPECT_EQ(env->host.counters().cow_breaks, 1u);
  EXPECT_EQ(env->host.pte(env->hva).pfn, f.pfn);
  EXPECT_TRUE(env->host.pte(env->hva).writable);
  release_checked(*env, f);

  // Not present at all: the write fault allocates, also row 7.
  ENV(fresh, State::kNotPresentAnon);
  Faultin g = faultin(*fresh, kFollWrite);
  expect_held(*fresh, g);
  EXPECT_TRUE(g.writable);
  EXPECT_TRUE(has_row(g.trace, 7)) << trace_to_string(g.trace);
  release_checked(*fresh, g);
}

// Row 8 also covers a read of untouched private anonymous memory on a host without the zero page
// (docs/spec.md 12): the read maps a fresh exclusive page, which the fast write lookup finds.
TEST(DecisionTable, Row08_ReadUpgradedByFastWriteLookup) {
  for (State state :
       {State::kSharedNotPresent, State::kFastMissOnce, State::kNotPresentAnonNoZeroPage}) {
    SCOPED_TRACE(to_string(state));
    ENV(env, state);
    Faultin f = faultin(*env, 0);
    expect_held(*env, f);  // one reference: the read reference was dropped
    EXPECT_TRUE(f.writable);
    EXPECT_TRUE(has_row(f.trace, 8)) << trace_to_string(f.trace);
    EXPECT_EQ(f.pfn, env->host.pte(env->hva).pfn);
    EXPECT_EQ(env->host.counters().slow_gup_pages, 1u);
    EXPECT_GE(env->host.counters().fast_hits, 1u);
    EXPECT_EQ(env->host.counters().cow_breaks, 0u);
    release_checked(*env, f);
  }
}

TEST(DecisionTable, Row09_ReadUpgradeImpossible) {
  for (State state : {State::kNotPresentAnon, State::kZeroPage, State::kCowShared,
                      State::kWriteProtected, State::kFileSharedWritenotify, State::kReadOnlyVma,
                      State::kReadonlySlotNotPresent}) {
    SCOPED_TRACE(to_string(state));
    ENV(env, state);
    Faultin f = faultin(*env, 0);
    expect_held(*env, f);
    EXPECT_FALSE(f.writable);
    EXPECT_TRUE(has_row(f.trace, 9)) << trace_to_string(f.trace);
    EXPECT_EQ(env->host.counters().cow_breaks, 0u);
    EXPECT_FALSE(env->host.pte(env->hva).writable);
    release_checked(*env, f);
  }
}

TEST(DecisionTable, Row10_SignalInterruptsGup) {
  {
    ENV(env, State::kSignalPending);
    expect_error_row(*env, kFollInterruptible, kPfnErrSigpending, 10);
  }
  {
    // A non-fatal signal does not interrupt a non-interruptible GUP.
    ENV(env, State::kSignalPending);
    Faultin f = faultin(*env, kFollWrite);
    expect_held(*env, f);
    release_checked(*env, f);
  }
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollInterruptible | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kSignalFatal);
    expect_error_row(*env, flags, kPfnErrSigpending, 10);
  }
}

TEST(DecisionTable, Row11_FatalBeforeLockIsSigpending) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kFatalBeforeLock);
    expect_error_row(*env, flags, kPfnErrSigpending, 11);
    EXPECT_EQ(env->host.counters().vma_lookups, 0u);  // [merged] no VMA classification
  }
}

TEST(DecisionTable, Row12_PoisonedPageIsHwpoison) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kPoisoned);
    expect_error_row(*env, flags, kPfnErrHwpoison, 12);
  }
}

TEST(DecisionTable, Row13_NoVmaIsFault) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kNoVma);
    expect_error_row(*env, flags, kPfnErrFault, 13);
  }
}

TEST(DecisionTable, Row14_NowaitNeedsIo) {
  for (State state : {State::kFileNotResident, State::kSwappedOut}) {
    for (FollFlags flags : {kFollNowait, kFollNowait | kFollWrite}) {
      SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags));
      ENV(env, state);
      expect_error_row(*env, flags, kPfnErrNeedsIo, 14);
      EXPECT_EQ(env->host.counters().page_ins, 0u);  // nothing waited for I/O
      // The synchronous retry (spec 9 step 5) resolves it.
      Faultin f = faultin(*env, (flags & ~kFollNowait) | kFollInterruptible);
      expect_held(*env, f);
      EXPECT_EQ(env->host.counters().page_ins, 1u);
      release_checked(*env, f);
    }
  }
}

TEST(DecisionTable, Row15_VmaForbidsAccessIsFault) {
  for (FollFlags flags : {FollFlags{0}, kFollNowait, kFollWrite | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kProtNone);
    expect_error_row(*env, flags, kPfnErrFault, 15);
  }
  // A write to a read-only VMA, NOWAIT or not: FAULT, never NEEDS_IO.
  for (FollFlags flags : {kFollWrite, kFollWrite | kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kReadOnlyVma);
    expect_error_row(*env, flags, kPfnErrFault, 15);
  }
}

TEST(DecisionTable, Row16_GupFailsWithoutNowaitIsFault) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollInterruptible}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kGupFault);
    expect_error_row(*env, flags, kPfnErrFault, 16);
  }
  // The inference of row 14: with NOWAIT the same failure reads as NEEDS_IO.
  ENV(env, State::kGupFault);
  expect_error_row(*env, kFollNowait, kPfnErrNeedsIo, 14);
}

TEST(DecisionTable, Row17_PinOfPfnmapRefused) {
  ENV(env, State::kPfnmap);
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.flags = kFollWrite;
  kfp.pin = true;
  kfp.refcounted_page = &page;
  FollowTrace trace;
  Pfn pfn = kvm_follow_pfn(env->host, kfp, {}, &trace);
  EXPECT_EQ(pfn, kPfnErrFault);
  EXPECT_TRUE(has_row(trace, 17)) << trace_to_string(trace);
  EXPECT_FALSE(page);
  EXPECT_EQ(env->host.counters().follow_pfnmaps, 0u);
  expect_balanced(env->host);

  // allow_unsafe_mappings: mapped, still never refcounted.
  FollowTrace unsafe_trace;
  pfn = kvm_follow_pfn(env->host, kfp, FollowSemantics{false, true}, &unsafe_trace);
  EXPECT_FALSE(is_error_noslot_pfn(pfn)) << trace_to_string(unsafe_trace);
  EXPECT_TRUE(has_row(unsafe_trace, 21)) << trace_to_string(unsafe_trace);
  EXPECT_FALSE(page);
  expect_balanced(env->host);
}

TEST(DecisionTable, Row18_PfnmapFixupFailsIsFault) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollNowait}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kPfnmapFixupFails);
    expect_error_row(*env, flags, kPfnErrFault, 18);
    EXPECT_EQ(env->host.counters().fixups, 1u);
  }
}

TEST(DecisionTable, Row19_FixupDroppedLockUsesFreshVma) {
  {
    // Nothing changed while unlocked: the VMA is looked up again and the fault resolves.
    ENV(env, State::kPfnmapFixupDropsLock);
    const Pfn device = env->host.vma_info(env->hva)->device_pfn;
    Faultin f = faultin(*env, kFollWrite);
    EXPECT_EQ(f.pfn, Pfn(device.value + kPageIndex)) << trace_to_string(f.trace);
    EXPECT_TRUE(has_row(f.trace, 19)) << trace_to_string(f.trace);
    EXPECT_TRUE(has_row(f.trace, 21)) << trace_to_string(f.trace);
    EXPECT_EQ(env->host.counters().fixup_unlocks, 1u);
    EXPECT_GE(env->host.counters().vma_lookups, 2u);
    EXPECT_FALSE(f.page);
    expect_balanced(env->host);
  }
  {
    // Invariant 15: the VMA was replaced while unlocked; the result comes from the new one.
    ENV(env, State::kPfnmapVmaReplaced);
    const Pfn old_device = env->host.vma_info(env->hva)->device_pfn;
    Faultin f = faultin(*env, kFollWrite);
    ASSERT_NE(env->replaced_device_pfn, Pfn{}) << "the VMA was not replaced";
    EXPECT_NE(env->replaced_device_pfn, old_device);
    EXPECT_EQ(f.pfn, Pfn(env->replaced_device_pfn.value + kPageIndex))
        << pfn_to_string(f.pfn) << "\n" << trace_to_string(f.trace);
    EXPECT_TRUE(has_row(f.trace, 19)) << trace_to_string(f.trace);
    EXPECT_EQ(env->host.counters().vma_lookups, 2u);
    expect_balanced(env->host);
  }
}

TEST(DecisionTable, Row20_PfnmapWriteToReadOnlyPteIsRoFault) {
  ENV(env, State::kPfnmapReadOnlyPte);
  expect_error_row(*env, kFollWrite, kPfnErrRoFault, 20);
  // A read of the same PTE succeeds, not writable.
  Faultin f = faultin(*env, 0);
  EXPECT_FALSE(is_error_noslot_pfn(f.pfn));
  EXPECT_FALSE(f.writable);
  EXPECT_FALSE(f.page);
  EXPECT_TRUE(has_row(f.trace, 21));
  expect_balanced(env->host);
}

TEST(DecisionTable, Row21_PfnmapPteUsableNoReference) {
  for (State state : {State::kPfnmap, State::kPfnmapVmIo, State::kPfnmapMissing,
                      State::kPfnmapRefcountZero, State::kPfnmapReserved,
                      State::kPfnmapNoStructPage}) {
    for (FollFlags flags : {FollFlags{0}, kFollWrite}) {
      SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags));
      ENV(env, state);
      const Pfn device = Pfn(env->host.vma_info(env->hva)->device_pfn.value + kPageIndex);
      const FrameInfo before = env->host.frame(device);
      Faultin f = faultin(*env, flags);
      EXPECT_EQ(f.pfn, device) << pfn_to_string(f.pfn) << "\n" << trace_to_string(f.trace);
      EXPECT_TRUE(f.writable);  // the PTE's write bit, also for a read fault
      EXPECT_FALSE(f.page);
      EXPECT_EQ(f.trace.path, FollowPath::kRemapped);
      EXPECT_TRUE(has_row(f.trace, 21)) << trace_to_string(f.trace);
      EXPECT_EQ(env->host.frame(device).refcount, before.refcount);  // never touched
      EXPECT_EQ(env->host.counters().get_page_unless_zero, 0u);
      release_checked(*env, f);
    }
  }
}

// [v7] rows: follow_pfn with the seed's request struct.
FollowPfn v7_request(const Env& env, FollFlags flags, bool allow = true, bool guarded = false) {
  FollowPfn foll;
  foll.slot = env.slot_ptr();
  foll.gfn = env.gfn;
  foll.flags = flags;
  foll.allow_write_mapping = allow;
  foll.guarded_by_mmu_notifier = guarded;
  return foll;
}

TEST(DecisionTable, Row22_V7RefcountZeroPfnmapWithGetIsFault) {
  for (FollFlags flags : {kFollGet, kFollGet | kFollWrite}) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    ENV(env, State::kPfnmapRefcountZero);
    FollowPfn foll = v7_request(*env, flags);
    FollowTrace trace;
    Pfn pfn = follow_pfn(env->host, foll, &trace);
    EXPECT_EQ(pfn, kPfnErrFault) << trace_to_string(trace);
    EXPECT_TRUE(has_row(trace, 22)) << trace_to_string(trace);
    EXPECT_FALSE(foll.is_refcounted_page);
    release_pfn_clean(env->host, pfn, foll.hva);  // ignored: error pfn
    expect_balanced(env->host);
  }
}

TEST(DecisionTable, Row23_V7RefcountedPfnmapWithGetHoldsReference) {
  for (bool allow : {true, false}) {
    SCOPED_TRACE(allow ? "allow_write_mapping" : "no allow_write_mapping");
    ENV(env, State::kPfnmap);
    const Pfn device = Pfn(env->host.vma_info(env->hva)->device_pfn.value + kPageIndex);
    const int64_t refcount = env->host.frame(device).refcount;
    FollowPfn foll = v7_request(*env, kFollGet, allow);
    FollowTrace trace;
    Pfn pfn = follow_pfn(env->host, foll, &trace);
    EXPECT_EQ(pfn, device) << pfn_to_string(pfn) << "\n" << trace_to_string(trace);
    EXPECT_TRUE(has_row(trace, 23)) << trace_to_string(trace);
    EXPECT_EQ(foll.writable, allow);  // pte_write && allow
    EXPECT_TRUE(foll.is_refcounted_page);
    EXPECT_EQ(env->host.frame(device).refcount, refcount + 1);
    EXPECT_EQ(env->host.outstanding_refs(), 1u);
    if (foll.writable) {
      release_pfn_dirty(env->host, pfn, foll.hva);
    } else {
      release_pfn_clean(env->host, pfn, foll.hva);
    }
    expect_balanced(env->host);
    EXPECT_EQ(env->host.frame(device).refcount, refcount);
  }
}

TEST(DecisionTable, Row24_V7NoGetGuardedReportsRefcountability) {
  for (State state : {State::kPfnmap, State::kPfnmapRefcountZero, State::kPfnmapNoStructPage}) {
    SCOPED_TRACE(to_string(state));
    ENV(env, state);
    const Pfn device = Pfn(env->host.vma_info(env->hva)->device_pfn.value + kPageIndex);
    const int64_t refcount = env->host.frame(device).refcount;
    FollowPfn foll = v7_request(*env, kFollWrite, true, /*guarded=*/true);
    FollowTrace trace;
    Pfn pfn = follow_pfn(env->host, foll, &trace);
    EXPECT_EQ(pfn, device) << pfn_to_string(pfn) << "\n" << trace_to_string(trace);
    EXPECT_TRUE(foll.writable);
    EXPECT_EQ(foll.is_refcounted_page, state == State::kPfnmap);
    if (state != State::kPfnmapNoStructPage) {
      EXPECT_TRUE(has_row(trace, 24)) << trace_to_string(trace);
    }
    EXPECT_EQ(env->host.frame(device).refcount, refcount);  // nothing kept
    expect_balanced(env->host);
  }
}

TEST(DecisionTable, Row25_V7AtomicFastMissIsFault) {
  for (State state : {State::kNotPresentAnon, State::kZeroPage, State::kFileNotResident}) {
    SCOPED_TRACE(to_string(state));
    ENV(env, state);
    FollowPfn foll = v7_request(*env, kFollGet | kFollWrite);
    foll.atomic = true;
    foll.writable = true;  // not written on this exit
    FollowTrace trace;
    Pfn pfn = follow_pfn(env->host, foll, &trace);
    EXPECT_EQ(pfn, kPfnErrFault);
    EXPECT_TRUE(has_row(trace, 25)) << trace_to_string(trace);
    EXPECT_EQ(env->host.counters().fast_lookups, 1u);
    EXPECT_EQ(env->host.counters().slow_gups, 0u);  // never sleeps
    EXPECT_TRUE(foll.writable);                     // unchanged
    expect_balanced(env->host);
  }
  // A hit is an ordinary fast-path success.
  ENV(env, State::kPresentWritable);
  FollowPfn foll = v7_request(*env, kFollGet | kFollWrite);
  foll.atomic = true;
  Pfn pfn = follow_pfn(env->host, foll);
  EXPECT_EQ(pfn, env->host.pte(env->hva).pfn);
  EXPECT_EQ(env->host.counters().slow_gups, 0u);
  release_pfn_dirty(env->host, pfn, foll.hva);
  expect_balanced(env->host);
}

TEST(DecisionTable, Row26_V7NeitherGetNorGuardedIsFault) {
  ENV(env, State::kPresentWritable);
  FollowPfn foll = v7_request(*env, kFollWrite, true, /*guarded=*/false);
  FollowTrace trace;
  Pfn pfn = follow_pfn(env->host, foll, &trace);
  EXPECT_EQ(pfn, kPfnErrFault);
  EXPECT_TRUE(has_row(trace, 26)) << trace_to_string(trace);
  EXPECT_EQ(env->host.counters().fast_lookups + env->host.counters().slow_gups, 0u);
  expect_balanced(env->host);
}

TEST(DecisionTable, Row27_MissingRefcountedPageOutIsFault) {
  ENV(env, State::kPresentWritable);
  bool writable = true;
  FollowTrace trace;
  EXPECT_EQ(faultin_pfn(env->host, env->slot_ptr(), env->gfn, kFollWrite, &writable, nullptr,
                        &trace),
            kPfnErrFault);
  EXPECT_TRUE(has_row(trace, 27));
  Page page;
  FollowTrace trace2;
  EXPECT_EQ(faultin_pfn(env->host, env->slot_ptr(), env->gfn, kFollWrite, nullptr, &page,
                        &trace2),
            kPfnErrFault);
  EXPECT_TRUE(has_row(trace2, 27));
  EXPECT_FALSE(page);

  KvmFollowPfn kfp;
  kfp.slot = env->slot_ptr();
  kfp.gfn = env->gfn;
  kfp.flags = kFollWrite;
  kfp.map_writable = &writable;
  FollowTrace trace3;
  EXPECT_EQ(kvm_follow_pfn(env->host, kfp, {}, &trace3), kPfnErrFault);
  EXPECT_TRUE(has_row(trace3, 27)) << trace_to_string(trace3);
  EXPECT_EQ(env->host.counters().fast_lookups + env->host.counters().slow_gups, 0u);
  expect_balanced(env->host);
}

}  // namespace
}  // namespace gfnmap::test
