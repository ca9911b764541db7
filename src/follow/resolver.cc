// gfnmap follow: the resolver core, gfn -> hva -> pfn (spec 3, decision table 4).
// Written from the spec; every decision records its decision-table row when traced.
#include "resolver.h"

#include <cerrno>
#include <cstdio>
#include <string>

namespace gfnmap::detail {
namespace {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Records a decision (row of spec 4, 0 for none) and its explanation. Called only through
// GFNMAP_NOTE, so that nothing is formatted when nobody traces (the fast path stays cheap).
template <class... Parts>
void note_traced(Request& req, int row, const Parts&... parts) {
  if (row) req.trace->rows.push_back(row);
  std::string line;
  if (row) line = "row " + std::to_string(row) + ": ";
  ((line += parts), ...);
  req.trace->steps.push_back(std::move(line));
}

#define GFNMAP_NOTE(req, row, ...)                           \
  do {                                                       \
    if ((req).trace) note_traced((req), (row), __VA_ARGS__); \
  } while (0)

void set_path(Request& req, FollowPath path) {
  if (req.trace) req.trace->path = path;
}

bool is_write(const Request& req) { return req.flags & kFollWrite; }

// kvm_resolve_pfn: exactly one of (page, pte) produced the result. A held page gives its own
// pfn; a remapped result (no page, or a [v7] page not held) gives the PTE's pfn.
Pfn resolve(Request& req, const Page& page, bool writable) {
  req.writable = writable;
  req.writable_resolved = true;
  req.page = page;
  return page.pfn;
}
Pfn resolve_pte(Request& req, Pfn pte_pfn, bool writable) {
  resolve(req, Page{}, writable);
  return pte_pfn;
}

// Gives up a reference we took but must not hand out ([v7] without kFollGet).
void drop_if_unwanted(HostMm& mm, Request& req) {
  if (req.page && !req.keep_ref) {
    mm.put_page(req.page);
    req.page = Page{};
  }
}

// hva_to_pfn_fast: only for writes or when the caller wants the writable upgrade, because a
// pure read through a write lookup could race a CoW break (spec 3.2 step 2).
bool hva_to_pfn_fast(HostMm& mm, Request& req, Pfn* pfn) {
  if (!is_write(req) && !req.try_writable) {
    GFNMAP_NOTE(req, 6, "read without map_writable: fast path skipped");
    return false;
  }
  Page page;
  if (!mm.get_user_page_fast_only(req.hva, kFollWrite | (req.pin ? kFollPin : 0), &page)) {
    GFNMAP_NOTE(req, 0, "fast path: no present writable PTE");
    return false;
  }
  // [v7] writable reports the upgrade permission, not the mapping (Sean's objection).
  bool writable = req.sem.v7 ? req.try_writable : true;
  *pfn = resolve(req, page, writable);
  req.is_refcounted_page = true;
  drop_if_unwanted(mm, req);
  set_path(req, FollowPath::kFast);
  GFNMAP_NOTE(req, 5, "fast path: present writable PTE, pfn ", hex(pfn->value));
  return true;
}

// hva_to_pfn_slow: GUP of one page. Returns GUP's result; on 1, *pfn is resolved.
long hva_to_pfn_slow(HostMm& mm, Request& req, Pfn* pfn) {
  FollFlags gup = kFollHwpoison | (req.flags & (kFollWrite | kFollNowait | kFollInterruptible));
  if (!req.sem.v7) gup |= kFollHonorNumaFault;
  if (req.pin) gup |= kFollPin;
  Page page;
  long npages = mm.get_user_pages_unlocked(req.hva, gup, &page);
  GFNMAP_NOTE(req, 0, "slow path: GUP(", foll_flags_to_string(gup), ") = ", std::to_string(npages));
  if (npages != 1) return npages;

  bool writable;
  bool upgraded = false;
  if (req.sem.v7) {
    // v7 computes writable first and tests !writable: identical to testing !FOLL_WRITE, since
    // !(w && a) && a == !w && a (the seed's review question).
    writable = is_write(req) && req.try_writable;
    if (!writable && req.try_writable) {
      Page wpage;
      if (mm.get_user_page_fast_only(req.hva, kFollWrite, &wpage)) {
        mm.put_page(page);
        page = wpage;
        writable = upgraded = true;
      }
    }
  } else {
    if (req.pin && req.try_writable) {
      GFNMAP_NOTE(req, 0, "WARN: pin with map_writable, no upgrade (invariant 8)");
    } else if (!is_write(req) && req.try_writable) {
      Page wpage;
      if (mm.get_user_page_fast_only(req.hva, kFollWrite, &wpage)) {
        mm.put_page(page);
        page = wpage;
        upgraded = true;
      }
    }
    writable = is_write(req) || upgraded;
  }
  *pfn = resolve(req, page, writable);
  req.is_refcounted_page = true;
  drop_if_unwanted(mm, req);
  set_path(req, FollowPath::kSlow);
  if (is_write(req)) {
    GFNMAP_NOTE(req, 7, "slow path: write fault resolved, pfn ", hex(pfn->value));
  } else if (upgraded) {
    GFNMAP_NOTE(req, 8, "slow path: read fault upgraded by a fast write lookup, pfn ", hex(pfn->value));
  } else {
    GFNMAP_NOTE(req, 9, "slow path: read fault, upgrade ",
         req.try_writable ? "impossible (PTE read-only, CoW or zero page, or pin)"
                          : "not requested",
         ", pfn ", hex(pfn->value));
  }
  return 1;
}

// hva_to_pfn_remapped: a VM_IO/VM_PFNMAP VMA. Returns 0 with *pfn set (possibly to
// KVM_PFN_ERR_RO_FAULT), -EAGAIN when fixup dropped the mmap lock, or another -errno.
int hva_to_pfn_remapped(HostMm& mm, Request& req, Pfn* pfn) {
  const bool write = is_write(req);
  if (!req.sem.v7 && req.pin && !req.sem.allow_unsafe_mappings) {
    GFNMAP_NOTE(req, 17, "remapped: pinning VM_IO/VM_PFNMAP memory refused (allow_unsafe_mappings off)");
    return -EINVAL;
  }
  PfnmapPte pte;
  int r = mm.follow_pfnmap(req.hva, &pte);
  if (r) {
    bool unlocked = false;
    r = mm.fixup_user_fault(req.hva, write, &unlocked);
    if (unlocked) {
      GFNMAP_NOTE(req, 19, "remapped: fixup_user_fault dropped the mmap lock, VMA looked up again");
      return -EAGAIN;
    }
    if (r) {
      GFNMAP_NOTE(req, 18, "remapped: PTE missing and fixup_user_fault failed (", std::to_string(r),
           ")");
      return r;
    }
    r = mm.follow_pfnmap(req.hva, &pte);
    if (r) {
      GFNMAP_NOTE(req, 18, "remapped: PTE still missing after fixup (", std::to_string(r), ")");
      return r;
    }
  }
  if (write && !pte.writable) {
    GFNMAP_NOTE(req, 20, "remapped: write to a read-only PTE");
    *pfn = kPfnErrRoFault;
    return 0;
  }
  set_path(req, FollowPath::kRemapped);
  if (!req.sem.v7) {
    // [merged] never a reference: valid only under MMU-notifier protection.
    *pfn = resolve_pte(req, pte.pfn, pte.writable);
    GFNMAP_NOTE(req, 21, "remapped: PTE pfn ", hex(pfn->value), pte.writable ? " writable" : " read-only",
         ", no reference");
    return 0;
  }
  // [v7] pfns that "look refcounted" get a reference with FOLL_GET; refcount 0 fails.
  bool writable = pte.writable && req.try_writable;
  std::optional<Page> page = mm.pfn_to_refcounted_page(pte.pfn, req.hva);
  if (!page) {
    *pfn = resolve_pte(req, pte.pfn, writable);
    GFNMAP_NOTE(req, 21, "remapped: PTE pfn ", hex(pfn->value), ", no refcounted page");
    return 0;
  }
  if (req.keep_ref) {
    if (!mm.get_page_unless_zero(*page)) {
      GFNMAP_NOTE(req, 22, "remapped [v7]: page looks refcounted but its refcount is 0");
      return -EFAULT;
    }
    *pfn = resolve(req, *page, writable);
    req.is_refcounted_page = true;
    GFNMAP_NOTE(req, 23, "remapped [v7]: reference taken on pfn ", hex(pfn->value));
    return 0;
  }
  // Guarded and without FOLL_GET: report whether a reference could have been taken.
  bool could_get = mm.get_page_unless_zero(*page);
  if (could_get) mm.put_page(*page);
  *pfn = resolve_pte(req, pte.pfn, writable);
  req.is_refcounted_page = could_get;
  GFNMAP_NOTE(req, 24, "remapped [v7]: no FOLL_GET, guarded; is_refcounted_page = ",
       could_get ? "true" : "false");
  return 0;
}

// vma_is_valid: the VMA permits the access.
bool vma_permits(const Vma& vma, bool write) {
  if (!(vma.vm_flags & kVmRead)) return false;
  return !write || (vma.vm_flags & kVmWrite);
}

// The VMA classification after a failed GUP (spec 3.2 step 6). Holds the mmap read lock.
Pfn classify_failure_locked(HostMm& mm, Request& req) {
  for (;;) {
    std::optional<Vma> vma = mm.vma_lookup(req.hva);
    if (!vma) {
      GFNMAP_NOTE(req, 13, "no VMA covers hva ", hex(req.hva.value));
      return kPfnErrFault;
    }
    if (vma->vm_flags & (kVmIo | kVmPfnmap)) {
      Pfn pfn;
      int r = hva_to_pfn_remapped(mm, req, &pfn);
      if (r == -EAGAIN) continue;  // the VMA may have changed while unlocked (invariant 15)
      if (r < 0) return kPfnErrFault;
      return pfn;
    }
    const bool valid = vma_permits(*vma, is_write(req));
    if ((req.flags & kFollNowait) && valid) {
      GFNMAP_NOTE(req, 14, "NOWAIT and the VMA permits the access: needs I/O");
      return kPfnErrNeedsIo;
    }
    if (!valid) {
      GFNMAP_NOTE(req, 15, "the VMA forbids the ", is_write(req) ? "write" : "read");
    } else {
      GFNMAP_NOTE(req, 16, "GUP failed on an ordinary VMA");
    }
    return kPfnErrFault;
  }
}

Pfn hva_to_pfn(HostMm& mm, Request& req) {
  if (!req.sem.v7 && !req.need_page_out) {
    GFNMAP_NOTE(req, 27, "WARN: refcounted_page out-parameter missing");
    return kPfnErrFault;
  }
  if (req.sem.v7 && !req.keep_ref && !req.guarded) {
    GFNMAP_NOTE(req, 26, "WARN: neither FOLL_GET nor guarded_by_mmu_notifier");
    return kPfnErrFault;
  }
  if (req.atomic && (req.flags & kFollNowait)) {
    GFNMAP_NOTE(req, 0, "WARN: atomic with FOLL_NOWAIT (a BUG in v7)");
    return kPfnErrFault;
  }

  Pfn pfn;
  if (hva_to_pfn_fast(mm, req, &pfn)) return pfn;
  if (req.atomic) {
    GFNMAP_NOTE(req, 25, "atomic: fast path missed, no sleeping");
    return kPfnErrFault;
  }
  long npages = hva_to_pfn_slow(mm, req, &pfn);
  if (npages == 1) return pfn;

  if (npages == -EINTR || (!req.sem.v7 && npages == -EAGAIN)) {
    GFNMAP_NOTE(req, npages == -EINTR ? 10 : 11, "GUP interrupted by a signal");
    return kPfnErrSigpending;
  }
  if (npages == -EAGAIN) GFNMAP_NOTE(req, 11, "[v7] GUP -EAGAIN: classified through the VMA");
  if (npages == -EHWPOISON && !req.sem.v7) {
    GFNMAP_NOTE(req, 12, "GUP: the page is poisoned");
    return kPfnErrHwpoison;
  }

  mm.mmap_read_lock();
  Pfn result;
  if (req.sem.v7 && (npages == -EHWPOISON ||
                     (!(req.flags & kFollNowait) && [&] {
                       // check_user_page_hwpoison: a write GUP that reports poison.
                       Page probe;
                       long r = mm.get_user_pages_unlocked(req.hva, kFollHwpoison | kFollWrite,
                                                           &probe);
                       if (r == 1) mm.put_page(probe);
                       return r == -EHWPOISON;
                     }()))) {
    GFNMAP_NOTE(req, 12, "the page is poisoned");
    result = kPfnErrHwpoison;
  } else {
    result = classify_failure_locked(mm, req);
  }
  mm.mmap_read_unlock();
  return result;
}

}  // namespace

Pfn follow(HostMm& mm, Request& req) {
  if (req.flags & ~kFollCallerFlags || (!req.sem.v7 && (req.flags & kFollGet))) {
    req.hva = kHvaErrBad;
    GFNMAP_NOTE(req, 0, "WARN: flags ", foll_flags_to_string(req.flags), " not allowed here");
    return kPfnErrFault;
  }
  req.hva = gfn_to_hva_many(req.slot, req.gfn, nullptr, is_write(req));
  if (req.hva == kHvaErrRoBad) {
    GFNMAP_NOTE(req, 3, "write to READONLY slot ", std::to_string(req.slot->id));
    return kPfnErrRoFault;
  }
  if (kvm_is_error_hva(req.hva)) {
    if (req.slot == nullptr) {
      GFNMAP_NOTE(req, 1, "no memslot holds gfn ", hex(req.gfn.value));
    } else {
      GFNMAP_NOTE(req, 2, "memslot ", std::to_string(req.slot->id), " is INVALID (being moved/deleted)");
    }
    return kPfnNoslot;
  }
  GFNMAP_NOTE(req, 0, "gfn ", hex(req.gfn.value), " -> hva ", hex(req.hva.value), " in slot ",
       std::to_string(req.slot->id));
  if (req.slot->readonly()) {
    GFNMAP_NOTE(req, 4, "READONLY slot, read: writable upgrade disabled");
    if (req.try_writable) req.readonly_slot_cleared = true;
    req.try_writable = false;
  }
  return hva_to_pfn(mm, req);
}

}  // namespace gfnmap::detail
