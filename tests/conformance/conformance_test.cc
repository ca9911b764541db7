// gfnmap conformance: the same resolver scenarios (faultin_pfn / kvm_follow_pfn, spec 4) on the
// host model and on real memory; both must give the same answers and leave no reference held.
#include <sys/mman.h>

#include <gtest/gtest.h>

#include "conformance/adapters.h"
#include "gfnmap/follow.h"

namespace gfnmap::conformance {
namespace {

constexpr uint64_t kPages = 8;

// What a resolution gave, in host-independent terms.
struct Outcome {
  Pfn pfn;
  bool writable = false;
  bool has_ref = false;
  FollowPath path = FollowPath::kNone;
  std::vector<int> rows;
};

template <class Adapter>
class Conformance : public ::testing::Test {
 protected:
  void TearDown() override {
    EXPECT_EQ(a.mm().outstanding_refs(), 0u) << Adapter::kName << ": references left held";
    a.check_clean();
  }

  Memslot slot_for(Hva hva, uint64_t pages = kPages, uint32_t flags = 0) {
    Memslot s;
    s.id = 1;
    s.base_gfn = Gfn(0x100);
    s.npages = pages;
    s.userspace_addr = hva;
    s.flags = flags;
    return s;
  }

  // faultin_pfn of page `index` of `slot`; the page reference (if any) is kept in *page.
  Outcome faultin(const Memslot& slot, uint64_t index, FollFlags flags, Page* page) {
    Outcome o;
    FollowTrace trace;
    o.pfn = faultin_pfn(a.mm(), &slot, slot.base_gfn + index, flags, &o.writable, page, &trace);
    o.has_ref = static_cast<bool>(*page);
    o.path = trace.path;
    o.rows = trace.rows;
    return o;
  }
  // The same, releasing the reference right away (a retried fault: unused).
  Outcome faultin_release(const Memslot& slot, uint64_t index, FollFlags flags) {
    Page page;
    Outcome o = faultin(slot, index, flags, &page);
    release_page_unused(page);
    return o;
  }
  static bool has_row(const Outcome& o, int row) {
    return std::find(o.rows.begin(), o.rows.end(), row) != o.rows.end();
  }

  Adapter a;
};

using Hosts = ::testing::Types<SimAdapter, SimAdapterNoZeroPage, LinuxAdapter>;
struct HostNames {
  template <class T>
  static std::string GetName(int) {
    return T::kName;
  }
};
TYPED_TEST_SUITE(Conformance, Hosts, HostNames);

TYPED_TEST(Conformance, Row07_SlowFaultInOfUntouchedPage) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  Memslot slot = this->slot_for(hva);
  Page page;
  Outcome o = this->faultin(slot, 2, kFollWrite, &page);
  EXPECT_FALSE(is_error_noslot_pfn(o.pfn)) << pfn_to_string(o.pfn);
  EXPECT_TRUE(o.writable);
  EXPECT_TRUE(o.has_ref);
  EXPECT_EQ(o.path, FollowPath::kSlow);
  EXPECT_TRUE(this->has_row(o, 7));
  EXPECT_EQ(page.pfn, o.pfn);
  EXPECT_EQ(page.hva, hva + 2 * kPageSize);
  release_page_dirty(page);
}

TYPED_TEST(Conformance, Row05_FastHitAfterFaultIn) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  Memslot slot = this->slot_for(hva);
  Outcome first = this->faultin_release(slot, 1, kFollWrite);
  Page page;
  Outcome o = this->faultin(slot, 1, kFollWrite, &page);
  EXPECT_EQ(o.pfn, first.pfn);
  EXPECT_TRUE(o.writable);
  EXPECT_TRUE(o.has_ref);
  EXPECT_EQ(o.path, FollowPath::kFast);
  EXPECT_TRUE(this->has_row(o, 5));
  release_page_clean(page);
  // A read fault with map_writable also takes the fast path (spec 3.2 step 2).
  Outcome r = this->faultin_release(slot, 1, 0);
  EXPECT_EQ(r.path, FollowPath::kFast);
  EXPECT_TRUE(r.writable);
}

TYPED_TEST(Conformance, Row08_WriteUpgradeOfAReadFault) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  this->a.host_write(hva + 3 * kPageSize);
  Memslot slot = this->slot_for(hva);
  Page page;
  Outcome o = this->faultin(slot, 3, 0, &page);
  EXPECT_FALSE(is_error_noslot_pfn(o.pfn));
  EXPECT_TRUE(o.writable) << "a read of a host-writable page is mapped writable";
  EXPECT_TRUE(o.has_ref);
  EXPECT_EQ(o.path, FollowPath::kSlow);
  EXPECT_TRUE(this->has_row(o, 8));
  release_page_dirty(page);
}

// A read of untouched private anonymous memory follows the zero-page fact (docs/spec.md 12):
// the zero page, read-only (row 9), which a write then replaces with a new frame (row 7); or,
// without it, a fresh exclusive page mapped writable at once (row 8), which a write then finds
// on the fast path (row 5).
TYPED_TEST(Conformance, Row08or09ThenRow07or05_ReadThenWriteOfUntouchedAnonPage) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  Memslot slot = this->slot_for(hva);
  const bool zero_page = this->a.zero_page();
  Page rd;
  Outcome r = this->faultin(slot, 0, 0, &rd);
  EXPECT_FALSE(is_error_noslot_pfn(r.pfn));
  EXPECT_TRUE(r.has_ref);
  EXPECT_EQ(r.writable, !zero_page)
      << (zero_page ? "a read maps the zero page read-only (invariant 6)"
                    : "without the zero page a read maps a fresh writable page");
  EXPECT_TRUE(this->has_row(r, zero_page ? 9 : 8));
  Page wr;
  Outcome w = this->faultin(slot, 0, kFollWrite, &wr);
  EXPECT_TRUE(w.writable);
  EXPECT_TRUE(this->has_row(w, zero_page ? 7 : 5));
  if (this->a.distinct_frames() && !this->a.zero_page_emulated()) {
    EXPECT_EQ(w.pfn != r.pfn, zero_page) << "only replacing the zero page gives a new frame";
  }
  release_page_clean(rd);
  release_page_dirty(wr);
}

TYPED_TEST(Conformance, Row09ThenRow07_CowOfPrivateFilePage) {
  Hva hva = this->a.map(Mem::kFilePrivate, kPages);
  Memslot slot = this->slot_for(hva);
  Page rd;
  Outcome r = this->faultin(slot, 4, 0, &rd);
  EXPECT_FALSE(is_error_noslot_pfn(r.pfn));
  EXPECT_FALSE(r.writable) << "the page cache page is mapped read-only";
  EXPECT_TRUE(this->has_row(r, 9));
  Page wr;
  Outcome w = this->faultin(slot, 4, kFollWrite, &wr);
  EXPECT_TRUE(w.writable);
  if (this->a.distinct_frames()) {
    EXPECT_NE(w.pfn, r.pfn);
  }
  release_page_clean(rd);
  release_page_dirty(wr);
}

TYPED_TEST(Conformance, Row03Row04_ReadOnlySlot) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  this->a.host_write(hva);
  Memslot slot = this->slot_for(hva, kPages, kMemReadonly);
  Outcome w = this->faultin_release(slot, 0, kFollWrite);
  EXPECT_EQ(w.pfn, kPfnErrRoFault);
  EXPECT_FALSE(w.writable);
  EXPECT_FALSE(w.has_ref);
  EXPECT_TRUE(this->has_row(w, 3));
  Page page;
  Outcome r = this->faultin(slot, 0, 0, &page);
  EXPECT_FALSE(is_error_noslot_pfn(r.pfn));
  EXPECT_FALSE(r.writable) << "never writable through a READONLY slot (invariant 5)";
  EXPECT_TRUE(this->has_row(r, 4));
  release_page_clean(page);
}

TYPED_TEST(Conformance, Row15_ProtReadMapping) {
  Hva hva = this->a.map(Mem::kAnon, kPages, PROT_READ);
  Memslot slot = this->slot_for(hva);
  Outcome w = this->faultin_release(slot, 0, kFollWrite);
  EXPECT_EQ(w.pfn, kPfnErrFault);
  EXPECT_FALSE(w.has_ref);
  EXPECT_TRUE(this->has_row(w, 15));
  Outcome nw = this->faultin_release(slot, 0, kFollWrite | kFollNowait);
  EXPECT_EQ(nw.pfn, kPfnErrFault) << "NOWAIT gives NEEDS_IO only when the VMA allows (row 14)";
  Outcome r = this->faultin_release(slot, 0, 0);
  EXPECT_FALSE(is_error_noslot_pfn(r.pfn));
  EXPECT_FALSE(r.writable);
  // mprotect(PROT_NONE) afterwards: reads fail too.
  this->a.protect(hva, kPages, PROT_NONE);
  Outcome none = this->faultin_release(slot, 0, 0);
  EXPECT_EQ(none.pfn, kPfnErrFault);
}

TYPED_TEST(Conformance, Row13_NoMapping) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  this->a.unmap(hva, kPages);
  Memslot slot = this->slot_for(hva);
  for (FollFlags f : {FollFlags{0}, kFollWrite, kFollNowait, kFollWrite | kFollInterruptible}) {
    Outcome o = this->faultin_release(slot, 1, f);
    EXPECT_EQ(o.pfn, kPfnErrFault) << foll_flags_to_string(f);
    EXPECT_FALSE(o.has_ref);
    EXPECT_FALSE(o.writable);
    EXPECT_TRUE(this->has_row(o, 13));
  }
}

TYPED_TEST(Conformance, Row14_NowaitOnUnservedPageThenSynchronousRetry) {
  Hva hva = this->a.map(Mem::kUnserved, kPages);
  Memslot slot = this->slot_for(hva);
  Outcome o = this->faultin_release(slot, 5, kFollNowait);
  EXPECT_EQ(o.pfn, kPfnErrNeedsIo);
  EXPECT_FALSE(o.has_ref);
  EXPECT_TRUE(this->has_row(o, 14));
  Outcome ow = this->faultin_release(slot, 6, kFollNowait | kFollWrite);
  EXPECT_EQ(ow.pfn, kPfnErrNeedsIo);
  this->a.serve();
  Page page;
  Outcome sync = this->faultin(slot, 5, 0, &page);
  EXPECT_FALSE(is_error_noslot_pfn(sync.pfn)) << pfn_to_string(sync.pfn);
  EXPECT_TRUE(sync.has_ref);
  release_page_clean(page);
}

TYPED_TEST(Conformance, Row12_Poison) {
  Hva hva = this->a.map(Mem::kUnserved, kPages);
  this->a.poison(hva + 2 * kPageSize);
  Memslot slot = this->slot_for(hva);
  for (FollFlags f : {FollFlags{0}, kFollWrite, kFollInterruptible}) {
    Outcome o = this->faultin_release(slot, 2, f);
    EXPECT_EQ(o.pfn, kPfnErrHwpoison) << foll_flags_to_string(f) << " " << pfn_to_string(o.pfn);
    EXPECT_FALSE(o.has_ref);
    EXPECT_FALSE(o.writable);
    EXPECT_TRUE(this->has_row(o, 12));
  }
  Outcome ok = this->faultin_release(slot, 3, kFollWrite);
  EXPECT_FALSE(is_error_noslot_pfn(ok.pfn)) << "only the poisoned page fails";
}

TYPED_TEST(Conformance, Row10_InterruptionWhileWaiting) {
  Hva hva = this->a.map(Mem::kUnserved, kPages);
  Memslot slot = this->slot_for(hva);
  this->a.set_pending_signal();
  Outcome o = this->faultin_release(slot, 1, kFollInterruptible | kFollWrite);
  EXPECT_EQ(o.pfn, kPfnErrSigpending) << pfn_to_string(o.pfn);
  EXPECT_FALSE(o.has_ref);
  EXPECT_FALSE(o.writable);
  EXPECT_TRUE(this->has_row(o, 10));
  // Without INTERRUPTIBLE the same fault waits for the page and succeeds (invariant 10).
  this->a.serve();
  Page page;
  Outcome w = this->faultin(slot, 1, kFollWrite, &page);
  EXPECT_FALSE(is_error_noslot_pfn(w.pfn)) << pfn_to_string(w.pfn);
  EXPECT_TRUE(w.writable);
  release_page_dirty(page);
  this->a.clear_pending_signal();
}

TYPED_TEST(Conformance, Row21_DeviceMemoryIsNeverRefcounted) {
  Hva hva = this->a.map(Mem::kDevice, kPages);
  Memslot slot = this->slot_for(hva);
  for (FollFlags f : {FollFlags{0}, kFollWrite}) {
    Page page;
    Outcome o = this->faultin(slot, 1, f, &page);
    EXPECT_FALSE(is_error_noslot_pfn(o.pfn)) << pfn_to_string(o.pfn);
    EXPECT_NE(o.pfn.value, 0u) << "the PTE's pfn";
    EXPECT_TRUE(o.writable) << "the PTE's write bit, also for reads";
    EXPECT_FALSE(o.has_ref) << "remapped pfns never get a reference (invariant 3)";
    EXPECT_EQ(o.path, FollowPath::kRemapped);
    EXPECT_TRUE(this->has_row(o, 21));
  }
  // Pinning device memory is refused (row 17).
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = &slot;
  kfp.gfn = slot.base_gfn;
  kfp.pin = true;
  kfp.refcounted_page = &page;
  EXPECT_EQ(kvm_follow_pfn(this->a.mm(), kfp), kPfnErrFault);
  EXPECT_FALSE(page);
}

TYPED_TEST(Conformance, Row20_ReadOnlyDevicePte) {
  Hva hva = this->a.map(Mem::kDevice, kPages, PROT_READ);
  Memslot slot = this->slot_for(hva);
  Outcome w = this->faultin_release(slot, 0, kFollWrite);
  EXPECT_EQ(w.pfn, kPfnErrRoFault);
  EXPECT_TRUE(this->has_row(w, 20));
  Outcome r = this->faultin_release(slot, 0, 0);
  EXPECT_FALSE(is_error_noslot_pfn(r.pfn));
  EXPECT_FALSE(r.writable);
  EXPECT_FALSE(r.has_ref);
}

TYPED_TEST(Conformance, Rows01_NoSlotAndBadHostInput) {
  Hva hva = this->a.map(Mem::kAnon, kPages);
  (void)hva;
  bool writable = true;
  Page page;
  EXPECT_EQ(faultin_pfn(this->a.mm(), nullptr, Gfn(1), 0, &writable, &page), kPfnNoslot);
  EXPECT_FALSE(writable);
  EXPECT_NE(this->a.bad_unaligned(), 0) << "an unaligned range is refused";
  EXPECT_EQ(this->a.bad_overlap(), EEXIST) << "overlapping registrations are refused";
  EXPECT_NE(this->a.bad_closed_file(), 0) << "a closed/unknown file is refused";
}

}  // namespace
}  // namespace gfnmap::conformance
