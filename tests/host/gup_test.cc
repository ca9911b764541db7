// gfnmap tests, host: the exact HostMm return codes of SimHost (host.h): slow GUP per flag and
// state, signals, poison, injections, fixup_user_fault and its lock drop, the v7 heuristics.
#include <cerrno>

#include "host/sim_test_util.h"

namespace gfnmap {
namespace {

using test::gup;
using State = PteInfo::State;

TEST(SimHostGup, Row13_NoVmaIsEfault) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  EXPECT_EQ(gup(mm, h + kPageSize, 0, &page), -EFAULT);  // the guard page
  EXPECT_EQ(gup(mm, Hva(0x1000), kFollWrite, &page), -EFAULT);
  EXPECT_EQ(gup(mm, kHvaErrBad, 0, &page), -EFAULT);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_FALSE(page);
}

TEST(SimHostGup, Row15_PermissionsAreChecked) {
  SimHost mm;
  Hva none = *mm.mmap(kPageSize, Prot::kNone, VmaKind::kAnonPrivate);
  Hva ro = *mm.mmap(kPageSize, Prot::kRead, VmaKind::kAnonPrivate);
  Hva wo = *mm.mmap(kPageSize, Prot::kWrite, VmaKind::kAnonPrivate);
  Page page;
  for (FollFlags f : {FollFlags{0}, kFollWrite, kFollNowait, kFollWrite | kFollNowait}) {
    EXPECT_EQ(gup(mm, none, f, &page), -EFAULT);
  }
  EXPECT_EQ(gup(mm, ro, kFollWrite, &page), -EFAULT);
  ASSERT_EQ(gup(mm, ro, 0, &page), 1);
  mm.put_page(page);
  EXPECT_EQ(gup(mm, wo, 0, &page), -EFAULT);  // no VM_READ
  ASSERT_EQ(gup(mm, wo, kFollWrite, &page), 1);
  mm.put_page(page);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, Row17_PfnmapIsNeverGupped) {
  SimHost mm;
  MmapOptions io;
  io.vm_io = true;
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  Hva q = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, io);
  Page page;
  for (Hva h : {p, q}) {
    EXPECT_EQ(gup(mm, h, 0, &page), -EFAULT);
    EXPECT_EQ(gup(mm, h, kFollWrite | kFollPin, &page), -EFAULT);
    EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, &page));
  }
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

TEST(SimHostGup, Rows10And11_SignalRules) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  mm.set_signal(SignalState::kPending);
  EXPECT_TRUE(mm.signal_pending());
  EXPECT_FALSE(mm.fatal_signal_pending());
  EXPECT_EQ(gup(mm, h, kFollInterruptible, &page), -EINTR);
  EXPECT_EQ(gup(mm, h, kFollInterruptible | kFollWrite | kFollNowait, &page), -EINTR);
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);  // not interruptible: the signal waits
  mm.put_page(page);

  mm.set_signal(SignalState::kFatal);
  EXPECT_TRUE(mm.fatal_signal_pending());
  for (FollFlags f : {FollFlags{0}, kFollWrite, kFollNowait, kFollInterruptible}) {
    EXPECT_EQ(gup(mm, h, f, &page), -EINTR);
  }
  mm.set_signal(SignalState::kFatalBeforeLock);
  EXPECT_TRUE(mm.fatal_signal_pending());
  EXPECT_TRUE(mm.signal_pending());
  for (FollFlags f : {FollFlags{0}, kFollWrite, kFollNowait, kFollInterruptible}) {
    EXPECT_EQ(gup(mm, h, f, &page), -EAGAIN);
  }
  // A thread override wins over the process-wide state.
  mm.set_thread_signal(std::this_thread::get_id(), SignalState::kNone);
  EXPECT_FALSE(mm.signal_pending());
  ASSERT_EQ(gup(mm, h, kFollWrite, &page), 1);
  mm.put_page(page);
  mm.clear_thread_signals();
  EXPECT_TRUE(mm.fatal_signal_pending());
  mm.set_signal(SignalState::kNone);
  EXPECT_FALSE(mm.signal_pending());
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, Row12_PoisonNeedsHwpoisonFlag) {
  SimHost mm;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(h, kPageSize, true));
  Pfn pfn = mm.pte(h).pfn;
  ASSERT_TRUE(mm.poison(h));
  EXPECT_EQ(mm.pte(h).state, State::kHwpoison);
  EXPECT_TRUE(mm.frame(pfn).poisoned);
  EXPECT_EQ(mm.page_address(pfn, h), nullptr);
  Page page;
  EXPECT_EQ(mm.get_user_pages_unlocked(h, kFollHwpoison, &page), -EHWPOISON);
  EXPECT_EQ(mm.get_user_pages_unlocked(h, kFollHwpoison | kFollWrite | kFollNowait, &page),
            -EHWPOISON);
  EXPECT_EQ(mm.get_user_pages_unlocked(h, 0, &page), -EFAULT);
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, &page));
  EXPECT_EQ(mm.populate(h, kPageSize, false).code(), EHWPOISON);
  // Poisoning an untouched page faults it in first; a second poison is a no-op.
  ASSERT_TRUE(mm.poison(h + kPageSize));
  EXPECT_TRUE(mm.poison(h + kPageSize));
  EXPECT_EQ(mm.get_user_pages_unlocked(h + kPageSize, kFollHwpoison, &page), -EHWPOISON);
  // munmap of the poisoned range is fine; the frame stays poisoned (never reused).
  ASSERT_TRUE(mm.munmap(h, 2 * kPageSize));
  EXPECT_TRUE(mm.frame(pfn).poisoned);
  EXPECT_EQ(mm.poison(Hva(0x1000)).code(), ENOMEM);
  Hva p = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  EXPECT_EQ(mm.poison(p).code(), EINVAL);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, Rows14And16_InjectedResults) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  Page page;
  GupInjection inj;
  inj.result = -ENOMEM;
  inj.times = 2;
  ASSERT_TRUE(mm.inject_gup_result(h, inj));
  mm.set_signal(SignalState::kFatal);  // an injection wins over signals
  EXPECT_EQ(gup(mm, h, kFollWrite, &page), -ENOMEM);
  mm.set_signal(SignalState::kNone);
  EXPECT_EQ(gup(mm, h, 0, &page), -ENOMEM);
  ASSERT_EQ(gup(mm, h, 0, &page), 1);  // used up
  mm.put_page(page);
  inj.result = 0;
  inj.times = -1;
  ASSERT_TRUE(mm.inject_gup_result(h + 7, inj));  // any hva inside the page
  EXPECT_EQ(gup(mm, h, kFollNowait, &page), 0);
  EXPECT_EQ(gup(mm, h, kFollNowait, &page), 0);
  mm.clear_injections();
  ASSERT_EQ(gup(mm, h, kFollNowait, &page), 1);
  mm.put_page(page);

  inj.result = 1;
  EXPECT_EQ(mm.inject_gup_result(h, inj).code(), EINVAL);
  inj.result = -EFAULT;
  inj.times = 0;
  EXPECT_EQ(mm.inject_gup_result(h, inj).code(), EINVAL);
  EXPECT_EQ(mm.inject_fast_miss(h, 0).code(), EINVAL);
  FixupInjection fi;
  fi.error = EFAULT;
  EXPECT_EQ(mm.inject_fixup(h, fi).code(), EINVAL);
  fi.error = 0;
  fi.drop_lock_times = -1;
  EXPECT_EQ(mm.inject_fixup(h, fi).code(), EINVAL);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

TEST(SimHostGup, BadArgumentsAreRefusedNotCrashed) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  EXPECT_EQ(mm.get_user_pages_unlocked(h, kFollWrite, nullptr), -EINVAL);
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollWrite, nullptr));
  Page page;
  EXPECT_EQ(mm.get_user_pages_unlocked(h, 1u << 20, &page), -EINVAL);
  EXPECT_FALSE(mm.get_user_page_fast_only(h, kFollNowait | kFollWrite, &page));
  mm.mmap_read_lock();
  EXPECT_EQ(mm.follow_pfnmap(h, nullptr), -EINVAL);
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.violations(), 3u);  // two null Page*, one null PfnmapPte*
  EXPECT_EQ(mm.violation_log().size(), 3u);
}

TEST(SimHostGup, Row19_FixupDropsTheLockAndRunsTheCallback) {
  SimHost mm;
  MmapOptions o;
  o.ptes_present = false;
  Hva h = *mm.mmap(2 * kPageSize, kProtRW, VmaKind::kPfnmap, o);
  bool ran = false;
  FixupInjection inj;
  inj.drop_lock_times = 2;
  inj.while_unlocked = [&](SimHost& host) {
    ran = true;
    // The lock is really dropped: a setup call (exclusive) succeeds here.
    EXPECT_TRUE(host.mprotect(h, 2 * kPageSize, Prot::kRead));
    EXPECT_TRUE(host.mprotect(h, 2 * kPageSize, kProtRW));
  };
  ASSERT_TRUE(mm.inject_fixup(h, std::move(inj)));
  mm.mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, true, &unlocked), 0);
  EXPECT_TRUE(unlocked);
  EXPECT_TRUE(ran);
  PfnmapPte pte;
  EXPECT_EQ(mm.follow_pfnmap(h, &pte), -ENOENT);  // more drops to come: still missing
  unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, true, &unlocked), 0);
  EXPECT_TRUE(unlocked);
  ASSERT_EQ(mm.follow_pfnmap(h, &pte), 0);  // the last drop installs it
  EXPECT_TRUE(pte.writable);
  unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h + kPageSize, false, &unlocked), 0);
  EXPECT_FALSE(unlocked);  // another page: no injection
  mm.mmap_read_unlock();
  SimCounters c = mm.counters();
  EXPECT_EQ(c.fixups, 3u);
  EXPECT_EQ(c.fixup_unlocks, 2u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, Row18_FixupErrorAfterLockDrop) {
  SimHost mm;
  MmapOptions o;
  o.ptes_present = false;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, o);
  FixupInjection inj;
  inj.error = -ENOMEM;
  inj.drop_lock_times = 1;
  ASSERT_TRUE(mm.inject_fixup(h, inj));
  mm.mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, false, &unlocked), -ENOMEM);
  EXPECT_TRUE(unlocked);
  unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, false, &unlocked), -ENOMEM);  // the error stays
  EXPECT_FALSE(unlocked);
  PfnmapPte pte;
  EXPECT_EQ(mm.follow_pfnmap(h, &pte), -ENOENT);
  EXPECT_EQ(mm.fixup_user_fault(h + kPageSize, false, &unlocked), -EFAULT);  // no VMA
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, FixupOnOrdinaryVmaFaultsThePageIn) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kFileShared);
  mm.mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(mm.fixup_user_fault(h, true, &unlocked), 0);  // reads the page in, may block
  mm.mmap_read_unlock();
  EXPECT_EQ(mm.pte(h).state, State::kPresent);
  EXPECT_TRUE(mm.pte(h).writable);
  EXPECT_EQ(mm.counters().page_ins, 1u);
}

TEST(SimHostGup, LockRequiredCallsRecordViolationsWithoutTheLock) {
  SimHost mm;
  Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap);
  PfnmapPte pte;
  bool unlocked = false;
  EXPECT_TRUE(mm.vma_lookup(h));
  EXPECT_EQ(mm.follow_pfnmap(h, &pte), 0);
  EXPECT_EQ(mm.fixup_user_fault(h, false, &unlocked), 0);
  mm.mmap_read_unlock();  // unbalanced
  EXPECT_EQ(mm.violations(), 4u);
}

TEST(SimHostGup, Rows22To24_V7RefcountHeuristicInputs) {
  SimHost mm;
  auto device = [&](PfnmapBacking b) {
    MmapOptions o;
    o.pfnmap_backing = b;
    Hva h = *mm.mmap(kPageSize, kProtRW, VmaKind::kPfnmap, o);
    return std::pair{h, mm.vma_info(h)->device_pfn};
  };
  auto [rh, rpfn] = device(PfnmapBacking::kRefcounted);
  auto [zh, zpfn] = device(PfnmapBacking::kRefcountZero);
  auto [vh, vpfn] = device(PfnmapBacking::kReserved);
  auto [nh, npfn] = device(PfnmapBacking::kNoStructPage);

  std::optional<Page> p = mm.pfn_to_refcounted_page(rpfn, rh);
  ASSERT_TRUE(p);
  EXPECT_EQ(mm.outstanding_refs(), 0u);  // no reference taken by the lookup
  EXPECT_TRUE(mm.get_page_unless_zero(*p));
  EXPECT_EQ(mm.frame(rpfn).refcount, 2);
  EXPECT_EQ(mm.outstanding_refs(), 1u);
  mm.put_page(*p);
  EXPECT_EQ(mm.frame(rpfn).refcount, 1);

  p = mm.pfn_to_refcounted_page(zpfn, zh);
  ASSERT_TRUE(p);  // looks refcounted ...
  EXPECT_FALSE(mm.get_page_unless_zero(*p));  // ... but refcount 0 (row 22)
  EXPECT_EQ(mm.frame(zpfn).refcount, 0);
  EXPECT_FALSE(mm.pfn_to_refcounted_page(vpfn, vh));  // PG_reserved
  EXPECT_TRUE(mm.frame(vpfn).reserved);
  EXPECT_FALSE(mm.pfn_to_refcounted_page(npfn, nh));  // !pfn_valid
  EXPECT_FALSE(mm.frame(npfn).has_struct_page);
  EXPECT_FALSE(mm.pfn_to_refcounted_page(Pfn(0x12345678), rh));  // unknown pfn
  // The zero page is reserved but counts as refcounted.
  p = mm.pfn_to_refcounted_page(mm.zero_pfn(), rh);
  ASSERT_TRUE(p);
  EXPECT_TRUE(mm.page_reserved(*p));
  EXPECT_TRUE(mm.get_page_unless_zero(*p));
  mm.put_page(*p);
  EXPECT_EQ(mm.counters().get_page_unless_zero, 3u);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
}

TEST(SimHostGup, HostMappingLevelNeedsAPresentPte) {
  SimHost mm;
  Hva t = *mm.mmap(2 << 20, kProtRW, VmaKind::kAnonPrivate, {.backing = PageBacking::kThp});
  EXPECT_EQ(mm.host_mapping_level(t), PgLevel::k4K);
  ASSERT_TRUE(mm.populate(t, 2 << 20, true));
  EXPECT_EQ(mm.host_mapping_level(t + 12345), PgLevel::k2M);
  ASSERT_TRUE(mm.discard(t, kPageSize));  // splits the THP
  EXPECT_EQ(mm.host_mapping_level(t + kPageSize), PgLevel::k4K);
  EXPECT_EQ(mm.host_mapping_level(Hva(0x1000)), PgLevel::k4K);
}

}  // namespace
}  // namespace gfnmap
