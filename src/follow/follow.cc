// gfnmap follow: the public entry points of both API generations and the release helpers,
// each a thin mapping onto the one resolver core (resolver.cc).
#include "gfnmap/follow.h"

#include "resolver.h"

namespace gfnmap {

std::string_view to_string(FollowPath path) {
  switch (path) {
    case FollowPath::kNone: return "none";
    case FollowPath::kFast: return "fast";
    case FollowPath::kSlow: return "slow";
    case FollowPath::kRemapped: return "remapped";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// [v7]

Pfn follow_pfn(HostMm& mm, FollowPfn& foll, FollowTrace* trace) {
  detail::Request req;
  req.slot = foll.slot;
  req.gfn = foll.gfn;
  req.flags = foll.flags;
  req.atomic = foll.atomic;
  req.try_writable = foll.allow_write_mapping;
  req.keep_ref = foll.flags & kFollGet;
  req.guarded = foll.guarded_by_mmu_notifier;
  req.sem.v7 = true;
  req.trace = trace;
  Pfn pfn = detail::follow(mm, req);
  foll.hva = req.hva;
  // v7 forces allow_write_mapping off for READONLY slots, visibly to the caller.
  if (req.readonly_slot_cleared) foll.allow_write_mapping = false;
  if (req.writable_resolved) foll.writable = req.writable;  // untouched on early exits
  foll.is_refcounted_page = req.is_refcounted_page;
  return pfn;
}

Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn, bool atomic, bool interruptible,
                       bool* async, bool write_fault, bool* writable, Hva* hva) {
  FollowPfn foll;
  foll.slot = slot;
  foll.gfn = gfn;
  foll.flags = kFollGet | (write_fault ? kFollWrite : 0) | (async ? kFollNowait : 0) |
               (interruptible ? kFollInterruptible : 0);
  foll.atomic = atomic;
  foll.allow_write_mapping = writable != nullptr;
  Pfn pfn = follow_pfn(mm, foll);
  if (pfn == kPfnErrNeedsIo) {
    *async = true;
    pfn = kPfnErrFault;
  }
  if (hva) *hva = foll.hva;
  if (writable) *writable = foll.writable;
  return pfn;
}

Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn) {
  return gfn_to_pfn_memslot(mm, slot, gfn, false, false, nullptr, true, nullptr, nullptr);
}

Pfn gfn_to_pfn_memslot_atomic(HostMm& mm, const Memslot* slot, Gfn gfn) {
  return gfn_to_pfn_memslot(mm, slot, gfn, true, false, nullptr, true, nullptr, nullptr);
}

Pfn gfn_to_pfn_prot(HostMm& mm, const MemslotSet& set, Gfn gfn, bool write_fault,
                    bool* writable) {
  return gfn_to_pfn_memslot(mm, set.gfn_to_memslot(gfn), gfn, false, false, nullptr, write_fault,
                            writable, nullptr);
}

Pfn gfn_to_pfn(HostMm& mm, const MemslotSet& set, Gfn gfn) {
  return gfn_to_pfn_memslot(mm, set.gfn_to_memslot(gfn), gfn);
}

void release_pfn_clean(HostMm& mm, Pfn pfn, Hva hva) {
  if (is_error_noslot_pfn(pfn)) return;
  if (std::optional<Page> page = mm.pfn_to_refcounted_page(pfn, hva)) release_page_clean(*page);
}

void release_pfn_dirty(HostMm& mm, Pfn pfn, Hva hva) {
  if (is_error_noslot_pfn(pfn)) return;
  if (std::optional<Page> page = mm.pfn_to_refcounted_page(pfn, hva)) release_page_dirty(*page);
}

// ---------------------------------------------------------------------------------------------
// [merged]

Pfn kvm_follow_pfn(HostMm& mm, KvmFollowPfn& kfp, FollowSemantics semantics, FollowTrace* trace) {
  detail::Request req;
  req.slot = kfp.slot;
  req.gfn = kfp.gfn;
  req.flags = kfp.flags;
  req.pin = kfp.pin;
  req.try_writable = kfp.map_writable != nullptr;
  req.need_page_out = kfp.refcounted_page != nullptr;
  req.sem = semantics;
  req.sem.v7 = false;
  req.trace = trace;
  Pfn pfn = detail::follow(mm, req);
  kfp.hva = req.hva;
  if (req.readonly_slot_cleared) {
    *kfp.map_writable = false;  // READONLY slot: reported false, then treated as absent
  } else if (kfp.map_writable && req.writable_resolved) {
    *kfp.map_writable = req.writable;
  }
  if (kfp.refcounted_page && req.writable_resolved) *kfp.refcounted_page = req.page;
  return pfn;
}

Pfn faultin_pfn(HostMm& mm, const Memslot* slot, Gfn gfn, FollFlags flags, bool* writable,
                Page* refcounted_page, FollowTrace* trace) {
  if (!writable || !refcounted_page) {
    if (trace) {
      trace->rows.push_back(27);
      trace->steps.push_back("row 27: WARN: writable and refcounted_page are both required");
    }
    return kPfnErrFault;
  }
  *writable = false;
  *refcounted_page = Page{};
  KvmFollowPfn kfp;
  kfp.slot = slot;
  kfp.gfn = gfn;
  kfp.flags = flags;
  kfp.map_writable = writable;
  kfp.refcounted_page = refcounted_page;
  return kvm_follow_pfn(mm, kfp, {}, trace);
}

Page gfn_to_page(HostMm& mm, const MemslotSet& set, Gfn gfn, bool write) {
  Page page;
  KvmFollowPfn kfp;
  kfp.slot = set.gfn_to_memslot(gfn);
  kfp.gfn = gfn;
  kfp.flags = write ? kFollWrite : 0;
  kfp.refcounted_page = &page;
  Pfn pfn = kvm_follow_pfn(mm, kfp);
  return is_error_noslot_pfn(pfn) ? Page{} : page;
}

int prefetch_pages(HostMm& mm, const Memslot* slot, Gfn gfn, Page* pages, int n) {
  uint64_t nr_pages = 0;
  Hva hva = gfn_to_hva_many(slot, gfn, &nr_pages, true);
  if (kvm_is_error_hva(hva)) return -1;
  if (n < 0 || nr_pages < static_cast<uint64_t>(n)) return 0;
  if (n > 0 && pages == nullptr) return -1;  // bad input: nowhere to put the references
  int got = 0;
  while (got < n && mm.get_user_page_fast_only(hva + got * kPageSize, kFollWrite, &pages[got])) {
    ++got;
  }
  return got;
}

void release_page_unused(Page page) {
  if (page) page.mm->put_page(page);
}

void release_page_clean(Page page) {
  if (!page) return;
  if (!page.mm->page_reserved(page)) page.mm->mark_page_accessed(page);
  page.mm->put_page(page);
}

void release_page_dirty(Page page) {
  if (!page) return;
  if (!page.mm->page_reserved(page)) page.mm->set_page_dirty(page);
  release_page_clean(page);
}

void release_faultin_page(Page page, bool unused, bool dirty) {
  if (unused) {
    release_page_unused(page);
  } else if (dirty) {
    release_page_dirty(page);
  } else {
    release_page_clean(page);
  }
}

}  // namespace gfnmap
