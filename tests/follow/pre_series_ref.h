// Reference model for the follow tests: the PRE-SERIES resolver (before struct kvm_follow_pfn),
// written from spec 2.1, 2.4, 3.5 and the pre-6.13 notes of 6, over the HostMm interface.
#pragma once

#include <optional>

#include "gfnmap/host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap::ref {

// What the pre-series code did that has no return value to show for it.
struct PreSeriesStats {
  bool bug = false;  // BUG_ON(atomic && async) would have fired
};

// __gfn_to_pfn_memslot(slot, gfn, atomic, interruptible, async, write_fault, writable, hva) as it
// was before the series: separate bools, an async pointer, a writable pointer.
//   * *hva is written first, always (it may be an error hva).
//   * RO_BAD -> *writable = false, KVM_PFN_ERR_RO_FAULT; other error hva -> *writable = false,
//     KVM_PFN_NOSLOT.
//   * READONLY slot: *writable = false, then the pointer is forgotten (no upgrade).
//   * hva_to_pfn: fast path iff write_fault or writable != null; atomic stops after it
//     (*writable untouched on that miss); the slow path presets *writable = write_fault BEFORE
//     GUP (so on a later error *writable is write_fault, not false), upgrades a read fault by a
//     fast write lookup when writable != null; -EINTR -> SIGPENDING; -EAGAIN falls through;
//     under the mmap lock: -EHWPOISON, or (async == null and a write GUP probe reports poison)
//     -> HWPOISON; else the VMA classification, where NOWAIT + a VMA permitting the access sets
//     *async = true and returns KVM_PFN_ERR_FAULT; VM_IO/VM_PFNMAP goes the remapped way with
//     kvm_try_get_pfn (a pfn that looks refcounted gets a reference; refcount 0 -> FAULT).
Pfn gfn_to_pfn_memslot(HostMm& mm, const Memslot* slot, Gfn gfn, bool atomic, bool interruptible,
                       bool* async, bool write_fault, bool* writable, Hva* hva,
                       PreSeriesStats* stats = nullptr);

// kvm_release_pfn_clean / _dirty before 6.13: error and noslot pfns are ignored; the page behind
// the pfn is found by the "looks refcounted" heuristic; accessed (and dirty) are marked unless
// the page is reserved; then it is put. hva is the one the pfn was resolved through.
void release_pfn_clean(HostMm& mm, Pfn pfn, Hva hva);
void release_pfn_dirty(HostMm& mm, Pfn pfn, Hva hva);

// The pre-series value of *writable after an ERROR return, given the caller's value before the
// call (`before`). It is not meaningful to callers (v7 and the legacy wrapper write false), so
// the equivalence test asserts exactly this documented difference:
//   * RO_BAD, error hva (NOSLOT), READONLY slot     -> false (written before anything else);
//   * atomic and the fast path missed               -> `before` (never written);
//   * the remapped path read a usable PTE and then kvm_try_get_pfn failed on a page that looks
//     refcounted with refcount 0 (row 22)           -> the PTE's write bit (hva_to_pfn_remapped
//     stores pte_write before it tries the reference); pass it as `refcount_zero_pte_writable`;
//   * otherwise the slow path ran (every later error) -> write_fault (the preset).
// Precondition: the call returned an error or NOSLOT, writable != null, !(atomic && async).
bool pre_series_writable_on_error(const Memslot* slot, bool atomic, bool write_fault,
                                  bool before,
                                  std::optional<bool> refcount_zero_pte_writable = std::nullopt);

}  // namespace gfnmap::ref
