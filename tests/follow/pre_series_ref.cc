// Reference model for the follow tests: the pre-series resolver with its bool arguments,
// written independently of src/follow (own gfn -> hva, own paths) so that it can judge it.
#include "pre_series_ref.h"

#include <cerrno>
#include <optional>

namespace gfnmap::ref {
namespace {

// __gfn_to_hva_many, with the gfn inside the slot (the callers here guarantee it).
Hva gfn_to_hva(const Memslot* slot, Gfn gfn, bool write) {
  if (slot == nullptr || (slot->flags & kMemslotInvalid)) return kHvaErrBad;
  if ((slot->flags & kMemReadonly) && write) return kHvaErrRoBad;
  return slot->userspace_addr + (gfn - slot->base_gfn) * kPageSize;
}

// hva_to_pfn_fast: a write lookup that never faults, tried for write faults and for read
// faults whose caller can take a writable mapping.
bool hva_to_pfn_fast(HostMm& mm, Hva hva, bool write_fault, bool* writable, Pfn* pfn) {
  if (!(write_fault || writable)) return false;
  Page page;
  if (!mm.get_user_page_fast_only(hva, kFollWrite, &page)) return false;
  *pfn = page.pfn;
  if (writable) *writable = true;
  return true;  // the reference stays with the caller (always FOLL_GET before the series)
}

// hva_to_pfn_slow: *writable preset to write_fault before GUP; a read fault upgraded by a fast
// write lookup when the caller takes writable mappings.
long hva_to_pfn_slow(HostMm& mm, Hva hva, bool* async, bool write_fault, bool interruptible,
                     bool* writable, Pfn* pfn) {
  FollFlags flags = kFollHwpoison;
  if (writable) *writable = write_fault;
  if (write_fault) flags |= kFollWrite;
  if (async) flags |= kFollNowait;
  if (interruptible) flags |= kFollInterruptible;

  Page page;
  long npages = mm.get_user_pages_unlocked(hva, flags, &page);
  if (npages != 1) return npages;

  if (!write_fault && writable) {
    Page wpage;
    if (mm.get_user_page_fast_only(hva, kFollWrite, &wpage)) {
      *writable = true;
      mm.put_page(page);
      page = wpage;
    }
  }
  *pfn = page.pfn;
  return npages;
}

// kvm_try_get_pfn: true when the pfn has no refcounted page (nothing to take) or a reference
// could be taken; false for a page that looks refcounted but has refcount 0.
bool try_get_pfn(HostMm& mm, Pfn pfn, Hva hva) {
  std::optional<Page> page = mm.pfn_to_refcounted_page(pfn, hva);
  if (!page) return true;
  return mm.get_page_unless_zero(*page);
}

// hva_to_pfn_remapped: 0 with *out set (possibly RO_FAULT), -EAGAIN after the lock was dropped,
// another -errno on failure.
int hva_to_pfn_remapped(HostMm& mm, Hva hva, bool write_fault, bool* writable, Pfn* out) {
  PfnmapPte pte;
  int r = mm.follow_pfnmap(hva, &pte);
  if (r) {
    bool unlocked = false;
    r = mm.fixup_user_fault(hva, write_fault, &unlocked);
    if (unlocked) return -EAGAIN;
    if (r) return r;
    r = mm.follow_pfnmap(hva, &pte);
    if (r) return r;
  }
  if (write_fault && !pte.writable) {
    *out = kPfnErrRoFault;
    return 0;
  }
  if (writable) *writable = pte.writable;  // written before the reference is tried
  *out = pte.pfn;
  return try_get_pfn(mm, pte.pfn, hva) ? 0 : -EFAULT;
}

// vma_is_valid.
bool vma_permits(const Vma& vma, bool write_fault) {
  if (!(vma.vm_flags & kVmRead)) return false;
  return !write_fault || (vma.vm_flags & kVmWrite);
}

// check_user_page_hwpoison: a write GUP of the page (no reference kept) that reports poison.
bool check_user_page_hwpoison(HostMm& mm, Hva hva) {
  Page probe;
  long rc = mm.get_user_pages_unlocked(hva, kFollHwpoison | kFollWrite, &probe);
  if (rc == 1) mm.put_page(probe);
  return rc == -EHWPOISON;
}

Pfn hva_to_pfn(HostMm& mm, Hva hva, bool atomic, bool interruptible, bool* async,
               bool write_fault, bool* writable, PreSeriesStats* stats) {
  if (atomic && async) {  // BUG_ON: atomically or asynchronously, never both
    if (stats) stats->bug = true;
    return kPfnErrFault;
  }
  Pfn pfn;
  if (hva_to_pfn_fast(mm, hva, write_fault, writable, &pfn)) return pfn;
  if (atomic) return kPfnErrFault;

  long npages = hva_to_pfn_slow(mm, hva, async, write_fault, interruptible, writable, &pfn);
  if (npages == 1) return pfn;
  if (npages == -EINTR) return kPfnErrSigpending;

  mm.mmap_read_lock();
  if (npages == -EHWPOISON || (!async && check_user_page_hwpoison(mm, hva))) {
    mm.mmap_read_unlock();
    return kPfnErrHwpoison;
  }
  for (;;) {
    std::optional<Vma> vma = mm.vma_lookup(hva);
    if (!vma) {
      pfn = kPfnErrFault;
    } else if (vma->vm_flags & (kVmIo | kVmPfnmap)) {
      int r = hva_to_pfn_remapped(mm, hva, write_fault, writable, &pfn);
      if (r == -EAGAIN) continue;
      if (r < 0) pfn = kPfnErrFault;
    } else {
      if (async && vma_permits(*vma, write_fault)) *async = true;
      pfn = kPfnErrFault;
    }
    break;
  }
  mm.mmap_read_unlock();
  return pfn;
}

// kvm_release_page_clean / _dirty on the page found by the heuristic.
void release_page(HostMm& mm, Pfn pfn, Hva hva, bool dirty) {
  if (is_error_noslot_pfn(pfn)) return;
  std::optional<Page> page = mm.pfn_to_refcounted_page(pfn, hva);
  if (!page) return;
  const bool tracked = !mm.page_reserved(*page);  // kvm_is_ad_tracked_page
  if (dirty && tracked) mm.set_page_dirty(*page);
  if (tracked) mm.mark_page_accessed(*page);
  mm.put_page(*page);
}

}  // namespace

Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn, bool atomic, bool interruptible,
                       bool* async, bool write_fault, bool* writable, Hva* hva,
                       PreSeriesStats* stats) {
  Hva addr = gfn_to_hva(slot, gfn, write_fault);
  if (hva) *hva = addr;
  if (addr == kHvaErrRoBad) {
    if (writable) *writable = false;
    return kPfnErrRoFault;
  }
  if (kvm_is_error_hva(addr)) {
    if (writable) *writable = false;
    return kPfnNoslot;
  }
  if (writable && (slot->flags & kMemReadonly)) {  // never a writable pfn in a READONLY slot
    *writable = false;
    writable = nullptr;
  }
  return hva_to_pfn(mm, addr, atomic, interruptible, async, write_fault, writable, stats);
}

void release_pfn_clean(HostMm& mm, Pfn pfn, Hva hva) { release_page(mm, pfn, hva, false); }
void release_pfn_dirty(HostMm& mm, Pfn pfn, Hva hva) { release_page(mm, pfn, hva, true); }

bool pre_series_writable_on_error(const Memslot* slot, bool atomic, bool write_fault,
                                  bool before, std::optional<bool> refcount_zero_pte_writable) {
  if (slot == nullptr || (slot->flags & kMemslotInvalid)) return false;  // NOSLOT
  if (slot->flags & kMemReadonly) return false;  // RO_BAD, or cleared for the READONLY slot
  if (atomic) return before;                     // fast miss: never written
  if (refcount_zero_pte_writable) return *refcount_zero_pte_writable;  // row 22
  return write_fault;                            // slow-path preset survives every error
}

}  // namespace gfnmap::ref
