// gfnmap follow: gfn -> hva -> pfn through the fast, slow and remapped paths (spec 2-6), in both
// the v7 seed's API (FollowPfn, gfn_to_pfn_*) and the merged API (faultin_pfn), over one core.
#pragma once

#include <string>
#include <vector>

#include "gfnmap/host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// Explaining a resolution: which rows of the decision table (spec 4) applied, in order, and
// the path that produced the result. Filled only when the caller passes one (tools, tests).

enum class FollowPath { kNone, kFast, kSlow, kRemapped };
std::string_view to_string(FollowPath path);

struct FollowTrace {
  std::vector<int> rows;           // e.g. {4, 9}: READONLY read, then slow GUP without upgrade
  FollowPath path = FollowPath::kNone;
  std::vector<std::string> steps;  // one line per decision, for people
};

// Semantics that differ between the v7 series and the merged code (spec 2.4); the public
// entry points below pick them, tests may pick others.
struct FollowSemantics {
  bool v7 = false;                     // v7 reference/writable/atomic/hwpoison-probe rules
  bool allow_unsafe_mappings = false;  // module param: allow pinning VM_IO/VM_PFNMAP memory
};

// ---------------------------------------------------------------------------------------------
// [v7] the seed's API: struct kvm_follow_pfn and __kvm_follow_pfn.

struct FollowPfn {
  // Inputs.
  const Memslot* slot = nullptr;
  Gfn gfn;
  FollFlags flags = 0;  // kFollWrite | kFollNowait | kFollInterruptible | kFollGet
  bool atomic = false;  // fast path only; a miss is KVM_PFN_ERR_FAULT. Never with kFollNowait.
  bool allow_write_mapping = false;      // a read fault may map a host-writable page writable
  bool guarded_by_mmu_notifier = false;  // required without kFollGet
  // Outputs.
  Hva hva;                   // always written, even on error (may be an error hva)
  bool writable = false;     // NOT written on the RO_BAD / error-hva exits (as in v7)
  bool is_refcounted_page = false;
};

// __kvm_follow_pfn. With kFollGet, a valid result holds one reference when is_refcounted_page;
// give it back with release_pfn_clean / release_pfn_dirty.
// Rejected with KVM_PFN_ERR_FAULT (a WARN in KVM): flags outside kFollCallerFlags, atomic with
// kFollNowait, neither kFollGet nor guarded_by_mmu_notifier.
Pfn follow_pfn(HostMm& mm, FollowPfn& foll, FollowTrace* trace = nullptr);

// The legacy entry, built on follow_pfn as in v7: kFollWrite iff write_fault, kFollNowait iff
// async != nullptr, kFollInterruptible iff interruptible, allow_write_mapping iff writable !=
// nullptr, kFollGet always. NEEDS_IO comes back as *async = true and KVM_PFN_ERR_FAULT.
// __gfn_to_pfn_memslot.
Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn, bool atomic, bool interruptible,
                       bool* async, bool write_fault, bool* writable, Hva* hva);
// gfn_to_pfn_memslot: write fault, no async, no upgrade.
Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn);
// gfn_to_pfn_memslot_atomic: the same, fast path only.
Pfn gfn_to_pfn_memslot_atomic(HostMm& mm, const Memslot* slot, Gfn gfn);
// gfn_to_pfn_prot: looks the slot up in `set`.
Pfn gfn_to_pfn_prot(HostMm& mm, const MemslotSet& set, Gfn gfn, bool write_fault,
                    bool* writable);
// gfn_to_pfn: write fault through `set`.
Pfn gfn_to_pfn(HostMm& mm, const MemslotSet& set, Gfn gfn);

// Pre-6.13 release of a pfn (kvm_release_pfn_clean/_dirty): ignores error and noslot pfns and
// pfns without a refcounted page; else marks the page (accessed; dirty too) and puts it.
// hva is the one the pfn was resolved through (foll.hva).
void release_pfn_clean(HostMm& mm, Pfn pfn, Hva hva);
void release_pfn_dirty(HostMm& mm, Pfn pfn, Hva hva);

// ---------------------------------------------------------------------------------------------
// [merged] the current API (Linux 6.13+): struct kvm_follow_pfn with pin, map_writable and the
// mandatory refcounted_page.

struct KvmFollowPfn {
  const Memslot* slot = nullptr;
  Gfn gfn;
  FollFlags flags = 0;             // kFollWrite | kFollNowait | kFollInterruptible
  bool pin = false;                // pin instead of get (direct access outside notifiers)
  bool* map_writable = nullptr;    // try the writable upgrade; written only on success
  Page* refcounted_page = nullptr;  // required: the page now held, or a null Page
  Hva hva;                         // scratch output
};

// kvm_follow_pfn. Invariants (spec 10): on success *refcounted_page holds exactly one reference
// (or pin) or is null (remapped pfn: usable only under MMU-notifier protection); on any error
// nothing is held.
Pfn kvm_follow_pfn(HostMm& mm, KvmFollowPfn& kfp, FollowSemantics semantics = {},
                   FollowTrace* trace = nullptr);

// __kvm_faultin_pfn: both out-pointers required (else KVM_PFN_ERR_FAULT). Pre-sets *writable =
// false and *refcounted_page = null; always tries the writable upgrade; never pins.
Pfn faultin_pfn(HostMm& mm, const Memslot* slot, Gfn gfn, FollFlags flags, bool* writable,
                Page* refcounted_page, FollowTrace* trace = nullptr);

// __gfn_to_page: the refcounted page behind gfn in `set`, or a null Page for every error and for
// non-refcounted pfns. No upgrade, no pin.
Page gfn_to_page(HostMm& mm, const MemslotSet& set, Gfn gfn, bool write);

// kvm_prefetch_pages: fast-only write lookups of n consecutive gfns (never sleeps). Returns -1
// for an error hva, 0 when fewer than n pages remain in the slot, else the count obtained (each
// with one reference in pages[i]). A null `pages` with n > 0 is bad input: -1, nothing taken.
int prefetch_pages(HostMm& mm, const Memslot* slot, Gfn gfn, Page* pages, int n);

// Release helpers (spec 6). A null Page is a no-op in all of them.
void release_page_unused(Page page);  // put, no accessed/dirty marking
void release_page_clean(Page page);   // mark accessed (unless reserved), put
void release_page_dirty(Page page);   // set dirty (unless reserved), then clean release
// kvm_release_faultin_page: unused ? unused : dirty ? dirty : clean. The caller holds the MMU
// lock unless `unused` (dirtying outside it races writeback).
void release_faultin_page(Page page, bool unused, bool dirty);

}  // namespace gfnmap
