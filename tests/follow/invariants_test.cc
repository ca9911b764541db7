// Invariants 1-15 of spec 10 (lookup/result contract), one named test each, plus a rapidcheck
// property over random host states, APIs and flags: balance and no protocol violation.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cerrno>

#include "follow_fixture.h"
#include "gfnmap/follow.h"
#include "pre_series_ref.h"

namespace gfnmap::test {
namespace {

std::unique_ptr<Env> env_or_fail(State state) {
  std::unique_ptr<Env> env = make_env(state);
  if (!env) ADD_FAILURE() << "cannot build " << to_string(state);
  return env;
}

#define ENV(name, state)                          \
  std::unique_ptr<Env> name = env_or_fail(state); \
  ASSERT_TRUE(name)

const FollFlags kMergedFlagSets[] = {
    0,
    kFollWrite,
    kFollNowait,
    kFollInterruptible,
    kFollWrite | kFollNowait,
    kFollWrite | kFollInterruptible,
    kFollNowait | kFollInterruptible,
    kFollWrite | kFollNowait | kFollInterruptible,
};

bool is_remapped_state(State s) {
  switch (s) {
    case State::kPfnmap:
    case State::kPfnmapVmIo:
    case State::kPfnmapMissing:
    case State::kPfnmapFixupFails:
    case State::kPfnmapFixupDropsLock:
    case State::kPfnmapVmaReplaced:
    case State::kPfnmapReadOnlyPte:
    case State::kPfnmapRefcountZero:
    case State::kPfnmapReserved:
    case State::kPfnmapNoStructPage:
      return true;
    default:
      return false;
  }
}

// Runs `check` on a fresh env of every state for every merged flag set.
template <class Check>
void for_every_state_and_flags(Check check) {
  for (State state : all_states()) {
    for (FollFlags flags : kMergedFlagSets) {
      SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags));
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      check(*env, state, flags);
      if (testing::Test::HasFailure()) return;
    }
  }
}

TEST(Invariants, Invariant01_OutputsAlwaysDefined) {
  for_every_state_and_flags([](Env& env, State, FollFlags flags) {
    Faultin f = faultin(env, flags);  // starts from garbage outputs
    if (is_error_noslot_pfn(f.pfn)) {
      EXPECT_FALSE(f.writable) << pfn_to_string(f.pfn);
      EXPECT_EQ(f.page, Page{}) << pfn_to_string(f.pfn);
    } else {
      EXPECT_NE(f.page.pfn, Pfn(0xbad));  // either the real page or a null Page
      if (!f.page) {
        EXPECT_EQ(f.page, Page{});
      }
    }
    release_installed(f);
    EXPECT_EQ(env.host.violations(), 0u);
  });
}

TEST(Invariants, Invariant02_BalanceAcrossEveryRow) {
  for_every_state_and_flags([](Env& env, State, FollFlags flags) {
    const SimCounters before = env.host.counters();
    Faultin f = faultin(env, flags);
    if (f.page) {
      EXPECT_EQ(f.page.pfn, f.pfn);
      EXPECT_EQ(env.host.outstanding_refs(), 1u) << trace_to_string(f.trace);
      EXPECT_EQ(env.host.frame(f.pfn).held_refs, 1u);
    } else {
      EXPECT_EQ(env.host.outstanding_refs(), 0u) << trace_to_string(f.trace);
    }
    if (has_row(f.trace, 8)) {
      // The upgrade took a second reference and dropped the read one.
      const SimCounters after = env.host.counters();
      EXPECT_EQ(after.slow_gup_pages - before.slow_gup_pages, 1u);
      EXPECT_GE(after.puts - before.puts, 1u);
    }
    release_installed(f);
    EXPECT_EQ(env.host.outstanding_refs(), 0u);
    EXPECT_EQ(env.host.violations(), 0u);
  });
}

TEST(Invariants, Invariant03_NullPageMeansRemappedAndNoReference) {
  for_every_state_and_flags([](Env& env, State state, FollFlags flags) {
    Faultin f = faultin(env, flags);
    if (!is_error_noslot_pfn(f.pfn) && !f.page) {
      EXPECT_EQ(f.trace.path, FollowPath::kRemapped);
      EXPECT_TRUE(is_remapped_state(state));
      EXPECT_EQ(env.host.outstanding_refs(), 0u);
      std::optional<VmaInfo> vma = env.host.vma_info(env.hva);
      ASSERT_TRUE(vma);
      EXPECT_TRUE(vma->vma.vm_flags & (kVmIo | kVmPfnmap));
    }
    (void)flags;
    release_installed(f);
  });
  // Never handed to a pin (direct-access) caller unless allow_unsafe_mappings.
  for (State state : all_states()) {
    if (!is_remapped_state(state)) continue;
    for (bool unsafe : {false, true}) {
      SCOPED_TRACE(std::string(to_string(state)) + (unsafe ? " allow_unsafe" : ""));
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      Page page;
      KvmFollowPfn kfp;
      kfp.slot = env->slot_ptr();
      kfp.gfn = env->gfn;
      kfp.pin = true;
      kfp.refcounted_page = &page;
      FollowTrace trace;
      Pfn pfn = kvm_follow_pfn(env->host, kfp, FollowSemantics{false, unsafe}, &trace);
      if (!unsafe) {
        EXPECT_EQ(pfn, kPfnErrFault) << trace_to_string(trace);
        EXPECT_TRUE(has_row(trace, 17)) << trace_to_string(trace);
      }
      EXPECT_FALSE(page);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
  }
}

TEST(Invariants, Invariant04_RefcountZeroPfnmapMapsUntouched) {
  for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollNowait | kFollInterruptible}) {
    ENV(env, State::kPfnmapRefcountZero);
    const Pfn device = Pfn(env->host.vma_info(env->hva)->device_pfn.value + kPageIndex);
    ASSERT_EQ(env->host.frame(device).refcount, 0);
    Faultin f = faultin(*env, flags);
    EXPECT_EQ(f.pfn, device) << trace_to_string(f.trace);
    EXPECT_FALSE(f.page);
    EXPECT_EQ(env->host.frame(device).refcount, 0);
    EXPECT_EQ(env->host.counters().get_page_unless_zero, 0u);
    release_installed(f);
    EXPECT_EQ(env->host.frame(device).refcount, 0);
    EXPECT_FALSE(env->host.frame(device).dirty);
    EXPECT_FALSE(env->host.frame(device).accessed);
    EXPECT_EQ(env->host.violations(), 0u);
  }
}

TEST(Invariants, Invariant05_WritableOnlyForHostWritableMappings) {
  for_every_state_and_flags([](Env& env, State state, FollFlags flags) {
    Faultin f = faultin(env, flags);
    if (!is_error_noslot_pfn(f.pfn)) {
      if (flags & kFollWrite) {
        EXPECT_TRUE(f.writable) << "[merged] a write fault is writable";
      }
      if (state == State::kReadonlySlot || state == State::kReadonlySlotNotPresent) {
        EXPECT_FALSE(f.writable);
      }
      if (f.writable) {
        // The host PTE that produced it is writable now.
        if (f.trace.path == FollowPath::kRemapped) {
          PfnmapPte pte;
          env.host.mmap_read_lock();
          EXPECT_EQ(env.host.follow_pfnmap(env.hva, &pte), 0);
          env.host.mmap_read_unlock();
          EXPECT_TRUE(pte.writable);
        } else {
          PteInfo pte = env.host.pte(env.hva);
          EXPECT_EQ(pte.state, PteInfo::State::kPresent);
          EXPECT_TRUE(pte.writable);
          EXPECT_EQ(pte.pfn, f.pfn);
        }
      }
    }
    release_installed(f);
  });
}

TEST(Invariants, Invariant06_UpgradeNeverBreaksCow) {
  for (State state : {State::kCowShared, State::kZeroPage, State::kFileSharedWritenotify,
                      State::kWriteProtected}) {
    SCOPED_TRACE(to_string(state));
    ENV(env, state);
    const PteInfo before = env->host.pte(env->hva);
    Faultin f = faultin(*env, 0);
    ASSERT_TRUE(f.page) << trace_to_string(f.trace);
    EXPECT_FALSE(f.writable);
    EXPECT_EQ(f.pfn, before.pfn);
    const SimCounters c = env->host.counters();
    EXPECT_EQ(c.cow_breaks, 0u);
    EXPECT_EQ(c.faults, 0u);  // present already: no fault at all, in particular no write fault
    const PteInfo after = env->host.pte(env->hva);
    EXPECT_FALSE(after.writable);
    EXPECT_EQ(after.pfn, before.pfn);
    EXPECT_EQ(after.cow_shared, before.cow_shared);
    EXPECT_EQ(after.zero_page, before.zero_page);
    if (state == State::kZeroPage) {
      EXPECT_EQ(f.pfn, env->host.zero_pfn());
    }
    release_installed(f);
    EXPECT_EQ(env->host.outstanding_refs(), 0u);
    EXPECT_EQ(env->host.violations(), 0u);
  }
}

TEST(Invariants, Invariant07_ReadWithoutMapWritableNeverUsesFastPath) {
  for (State state : all_states()) {
    for (FollFlags flags : {FollFlags{0}, kFollNowait, kFollInterruptible}) {
      SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags));
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      Page page;
      KvmFollowPfn kfp;
      kfp.slot = env->slot_ptr();
      kfp.gfn = env->gfn;
      kfp.flags = flags;
      kfp.refcounted_page = &page;
      FollowTrace trace;
      Pfn pfn = kvm_follow_pfn(env->host, kfp, {}, &trace);
      EXPECT_EQ(env->host.counters().fast_lookups, 0u) << trace_to_string(trace);
      EXPECT_FALSE(has_row(trace, 5));
      EXPECT_FALSE(has_row(trace, 8));
      if (!is_error_noslot_pfn(pfn)) release_page_clean(page);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
  }
  // gfn_to_page-shaped v7 read without allow_write_mapping: no fast path either, and writable
  // reported false.
  ENV(env, State::kPresentWritable);
  FollowPfn foll;
  foll.slot = env->slot_ptr();
  foll.gfn = env->gfn;
  foll.flags = kFollGet;
  Pfn pfn = follow_pfn(env->host, foll);
  EXPECT_EQ(env->host.counters().fast_lookups, 0u);
  EXPECT_FALSE(foll.writable);
  release_pfn_clean(env->host, pfn, foll.hva);
  EXPECT_EQ(env->host.outstanding_refs(), 0u);
}

TEST(Invariants, Invariant08_PinWithMapWritableNeverUpgrades) {
  // The slow path reads the page (the fast pin misses once), the page is host-writable: without
  // pin this is row 8; with pin it must stay read-only (WARN, no upgrade).
  ENV(env, State::kFastMissOnce);
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
  ASSERT_FALSE(is_error_noslot_pfn(pfn)) << trace_to_string(trace);
  EXPECT_FALSE(map_writable) << trace_to_string(trace);
  EXPECT_FALSE(has_row(trace, 8));
  EXPECT_TRUE(has_row(trace, 9));
  ASSERT_TRUE(page);
  EXPECT_TRUE(page.pinned);
  EXPECT_EQ(env->host.frame(pfn).held_pins, 1u);
  EXPECT_EQ(env->host.frame(pfn).held_refs, 0u);
  release_faultin_page(page, false, map_writable);
  EXPECT_EQ(env->host.outstanding_refs(), 0u);
  EXPECT_EQ(env->host.violations(), 0u);
}

TEST(Invariants, Invariant09_NeedsIoOnlyWithNowaitAndPermittingVma) {
  for_every_state_and_flags([](Env& env, State, FollFlags flags) {
    Faultin f = faultin(env, flags);
    if (f.pfn == kPfnErrNeedsIo) {
      EXPECT_TRUE(flags & kFollNowait);
      std::optional<VmaInfo> vma = env.host.vma_info(env.hva);
      ASSERT_TRUE(vma);
      EXPECT_TRUE(vma->vma.vm_flags & kVmRead);
      if (flags & kFollWrite) {
        EXPECT_TRUE(vma->vma.vm_flags & kVmWrite);
      }
    }
    release_installed(f);
    // The synchronous retry never yields it.
    if (f.pfn == kPfnErrNeedsIo) {
      Faultin g = faultin(env, (flags & ~kFollNowait) | kFollInterruptible);
      EXPECT_NE(g.pfn, kPfnErrNeedsIo);
      release_installed(g);
    }
    EXPECT_EQ(env.host.outstanding_refs(), 0u);
  });
}

TEST(Invariants, Invariant10_SignalsAbortOnlyAsSpecified) {
  for (FollFlags flags : kMergedFlagSets) {
    SCOPED_TRACE(foll_flags_to_string(flags));
    {
      ENV(env, State::kSignalPending);
      Faultin f = faultin(*env, flags);
      if (flags & kFollInterruptible) {
        EXPECT_EQ(f.pfn, kPfnErrSigpending);
      } else {
        EXPECT_NE(f.pfn, kPfnErrSigpending);
      }
      if (f.pfn == kPfnErrSigpending) {
        EXPECT_EQ(env->host.outstanding_refs(), 0u);
      }
      release_installed(f);
    }
    for (State fatal : {State::kSignalFatal, State::kFatalBeforeLock}) {
      ENV(env, fatal);
      Faultin f = faultin(*env, flags);
      EXPECT_EQ(f.pfn, kPfnErrSigpending);
      EXPECT_FALSE(f.page);
      EXPECT_FALSE(f.writable);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
  }
}

TEST(Invariants, Invariant11_HwpoisonOnlyFromPoisonedPage) {
  for_every_state_and_flags([](Env& env, State state, FollFlags flags) {
    Faultin f = faultin(env, flags);
    EXPECT_EQ(f.pfn == kPfnErrHwpoison, state == State::kPoisoned) << pfn_to_string(f.pfn);
    if (f.pfn == kPfnErrHwpoison) {
      EXPECT_EQ(env.host.outstanding_refs(), 0u);
    }
    release_installed(f);
  });
}

TEST(Invariants, Invariant12_RoFaultExactly) {
  for_every_state_and_flags([](Env& env, State state, FollFlags flags) {
    Faultin f = faultin(env, flags);
    const bool write = flags & kFollWrite;
    const bool want = write && (state == State::kReadonlySlot ||
                                state == State::kReadonlySlotNotPresent ||
                                state == State::kPfnmapReadOnlyPte);
    EXPECT_EQ(f.pfn == kPfnErrRoFault, want) << pfn_to_string(f.pfn);
    release_installed(f);
  });
}

TEST(Invariants, Invariant13_NoslotExactlyForNullOrInvalidSlot) {
  for_every_state_and_flags([](Env& env, State state, FollFlags flags) {
    Faultin f = faultin(env, flags);
    const bool want = state == State::kNoSlot || state == State::kInvalidSlot;
    EXPECT_EQ(f.pfn == kPfnNoslot, want) << pfn_to_string(f.pfn);
    if (want) {
      EXPECT_FALSE(is_error_pfn(f.pfn));
      EXPECT_TRUE(is_error_noslot_pfn(f.pfn));
    }
    release_installed(f);
  });
}

TEST(Invariants, Invariant14_V7AtomicNeverSleepsAndRejectsNowait) {
  for (State state : all_states()) {
    for (FollFlags flags : {kFollGet, kFollGet | kFollWrite, kFollGet | kFollInterruptible}) {
      SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags));
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      FollowPfn foll;
      foll.slot = env->slot_ptr();
      foll.gfn = env->gfn;
      foll.flags = flags;
      foll.atomic = true;
      foll.allow_write_mapping = true;
      Pfn pfn = follow_pfn(env->host, foll);
      const SimCounters c = env->host.counters();
      EXPECT_EQ(c.slow_gups, 0u);
      EXPECT_EQ(c.vma_lookups, 0u);
      EXPECT_EQ(c.fixups, 0u);
      EXPECT_EQ(c.faults, 0u);
      EXPECT_TRUE(!is_error_noslot_pfn(pfn) || pfn == kPfnErrFault || pfn == kPfnNoslot ||
                  pfn == kPfnErrRoFault)
          << pfn_to_string(pfn);
      release_pfn_clean(env->host, pfn, foll.hva);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
  }
  // atomic + NOWAIT is rejected before the host is asked anything.
  ENV(env, State::kPresentWritable);
  FollowPfn foll;
  foll.slot = env->slot_ptr();
  foll.gfn = env->gfn;
  foll.flags = kFollGet | kFollNowait;
  foll.atomic = true;
  EXPECT_EQ(follow_pfn(env->host, foll), kPfnErrFault);
  EXPECT_EQ(env->host.counters().fast_lookups, 0u);
  EXPECT_EQ(env->host.outstanding_refs(), 0u);
}

// [merged] half of invariant 14: atomic is gone; the non-sleeping user is prefetch_pages, which
// only ever makes fast-only lookups: on every state it never calls GUP, never takes the mmap
// lock for a VMA walk, never faults, and every page it returns holds one reference.
TEST(Invariants, Invariant14_MergedPrefetchIsFastOnly) {
  for (State state : all_states()) {
    for (int n : {1, 2}) {
      SCOPED_TRACE(std::string(to_string(state)) + " n=" + std::to_string(n));
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      Page pages[2];
      const int got = prefetch_pages(env->host, env->slot_ptr(), env->gfn, pages, n);
      const SimCounters c = env->host.counters();
      EXPECT_EQ(c.slow_gups, 0u);
      EXPECT_EQ(c.vma_lookups, 0u);
      EXPECT_EQ(c.fixups, 0u);
      EXPECT_EQ(c.faults, 0u);
      if (got > 0) {
        EXPECT_EQ(c.fast_hits, uint64_t(got));
        EXPECT_EQ(env->host.outstanding_refs(), uint64_t(got));
      } else {
        EXPECT_EQ(env->host.outstanding_refs(), 0u);
      }
      for (int i = 0; i < got; ++i) release_page_unused(pages[i]);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
      EXPECT_EQ(env->host.violations(), 0u);
    }
  }
}

TEST(Invariants, Invariant15_StaleVmaNeverUsedAfterFixupDropsLock) {
  // Replaced by new device memory: the new pfn (also checked in Row19).
  {
    ENV(env, State::kPfnmapVmaReplaced);
    Faultin f = faultin(*env, 0);
    EXPECT_EQ(f.pfn, Pfn(env->replaced_device_pfn.value + kPageIndex)) << trace_to_string(f.trace);
  }
  // Unmapped while unlocked: the fresh lookup finds no VMA (row 13), never the old PTE.
  {
    ENV(env, State::kPfnmapMissing);
    const Hva start = env->slot.userspace_addr;
    FixupInjection inj;
    inj.drop_lock_times = 1;
    inj.while_unlocked = [start](SimHost& host) {
      EXPECT_TRUE(host.munmap(start, kSlotPages * kPageSize).ok());
    };
    ASSERT_TRUE(env->host.inject_fixup(env->hva, std::move(inj)).ok());
    Faultin f = faultin(*env, kFollWrite);
    EXPECT_EQ(f.pfn, kPfnErrFault) << trace_to_string(f.trace);
    EXPECT_TRUE(has_row(f.trace, 19));
    EXPECT_TRUE(has_row(f.trace, 13)) << trace_to_string(f.trace);
  }
  // Replaced by an ordinary anonymous VMA: classified as one (here NEEDS_IO with NOWAIT).
  {
    ENV(env, State::kPfnmapMissing);
    const Hva start = env->slot.userspace_addr;
    FixupInjection inj;
    inj.drop_lock_times = 1;
    inj.while_unlocked = [start](SimHost& host) {
      EXPECT_TRUE(host.munmap(start, kSlotPages * kPageSize).ok());
      MmapOptions o;
      o.fixed = start;
      EXPECT_TRUE(host.mmap(kSlotPages * kPageSize, kProtRW, VmaKind::kAnonPrivate, o).ok());
    };
    ASSERT_TRUE(env->host.inject_fixup(env->hva, std::move(inj)).ok());
    // The first GUP fails (VM_PFNMAP), the remapped path drops the lock, the VMA is now
    // anonymous: with NOWAIT that is row 14.
    Faultin f = faultin(*env, kFollWrite | kFollNowait);
    EXPECT_EQ(f.pfn, kPfnErrNeedsIo) << trace_to_string(f.trace);
    EXPECT_TRUE(has_row(f.trace, 19));
    EXPECT_EQ(env->host.outstanding_refs(), 0u);
  }
}

// ---------------------------------------------------------------------------------------------
// Property: any state, any API, any flags; after the resolution and the release of that API,
// nothing is outstanding and the host saw no protocol violation.

enum class Api { kFaultin, kMergedNoMapWritable, kMergedPin, kV7, kLegacy, kPreSeries };

RC_GTEST_PROP(Invariants, Invariant02_PropertyBalanceAndNoViolation, ()) {
  const State state = *rc::gen::elementOf(all_states());
  const Api api = *rc::gen::element(Api::kFaultin, Api::kMergedNoMapWritable, Api::kMergedPin,
                                    Api::kV7, Api::kLegacy, Api::kPreSeries);
  const bool write = *rc::gen::arbitrary<bool>();
  const bool nowait = *rc::gen::arbitrary<bool>();
  const bool interruptible = *rc::gen::arbitrary<bool>();
  const bool retried = *rc::gen::arbitrary<bool>();  // released as "unused"
  std::unique_ptr<Env> env = make_env(state);
  RC_ASSERT(env != nullptr);
  const FollFlags flags = (write ? kFollWrite : 0) | (nowait ? kFollNowait : 0) |
                          (interruptible ? kFollInterruptible : 0);
  SimHost& host = env->host;

  switch (api) {
    case Api::kFaultin: {
      Faultin f = faultin(*env, flags);
      RC_ASSERT(bool(f.page) == (host.outstanding_refs() == 1));
      release_faultin_page(f.page, retried, f.writable);
      break;
    }
    case Api::kMergedNoMapWritable:
    case Api::kMergedPin: {
      Page page;
      bool map_writable = false;
      KvmFollowPfn kfp;
      kfp.slot = env->slot_ptr();
      kfp.gfn = env->gfn;
      kfp.flags = flags;
      kfp.pin = api == Api::kMergedPin;
      kfp.map_writable = api == Api::kMergedPin && *rc::gen::arbitrary<bool>() ? &map_writable
                                                                               : nullptr;
      kfp.refcounted_page = &page;
      Pfn pfn = kvm_follow_pfn(host, kfp, FollowSemantics{false, *rc::gen::arbitrary<bool>()});
      if (is_error_noslot_pfn(pfn)) RC_ASSERT(host.outstanding_refs() == 0u);
      if (page) RC_ASSERT(page.pinned == kfp.pin);
      release_faultin_page(page, retried, map_writable);
      break;
    }
    case Api::kV7: {
      FollowPfn foll;
      foll.slot = env->slot_ptr();
      foll.gfn = env->gfn;
      const bool get = *rc::gen::arbitrary<bool>();
      foll.flags = flags | (get ? kFollGet : 0);
      foll.atomic = !nowait && *rc::gen::arbitrary<bool>();
      foll.allow_write_mapping = *rc::gen::arbitrary<bool>();
      foll.guarded_by_mmu_notifier = !get || *rc::gen::arbitrary<bool>();
      Pfn pfn = follow_pfn(host, foll);
      if (!get) RC_ASSERT(host.outstanding_refs() == 0u);
      if (get && foll.is_refcounted_page && !is_error_noslot_pfn(pfn)) {
        RC_ASSERT(host.outstanding_refs() == 1u);
      }
      if (get) {
        if (foll.writable) {
          release_pfn_dirty(host, pfn, foll.hva);
        } else {
          release_pfn_clean(host, pfn, foll.hva);
        }
      }
      break;
    }
    case Api::kLegacy:
    case Api::kPreSeries: {
      const bool atomic = !nowait && *rc::gen::arbitrary<bool>();
      bool async = false, writable = false;
      bool* writable_ptr = *rc::gen::arbitrary<bool>() ? &writable : nullptr;
      Hva hva;
      Pfn pfn = api == Api::kLegacy
                    ? gfn_to_pfn_memslot(host, env->slot_ptr(), env->gfn, atomic, interruptible,
                                         nowait ? &async : nullptr, write, writable_ptr, &hva)
                    : ref::gfn_to_pfn_memslot(host, env->slot_ptr(), env->gfn, atomic,
                                              interruptible, nowait ? &async : nullptr, write,
                                              writable_ptr, &hva);
      if (async) RC_ASSERT(pfn == kPfnErrFault);
      if (writable && !is_error_noslot_pfn(pfn)) {
        release_pfn_dirty(host, pfn, hva);
      } else {
        release_pfn_clean(host, pfn, hva);
      }
      break;
    }
  }
  RC_ASSERT(host.outstanding_refs() == 0u);
  RC_ASSERT(host.violations() == 0u);
}

}  // namespace
}  // namespace gfnmap::test
