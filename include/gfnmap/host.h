// gfnmap host interface: exactly what KVM asks of the host (primary) MMU (spec section 12).
// Implemented by SimHost (deterministic model, host/sim) and LinuxHost (real memory, host/linux).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "gfnmap/types.h"

namespace gfnmap {

class HostMm;

// VMA flags, as vma_lookup reports them.
inline constexpr uint32_t kVmRead = 1u << 0;     // VM_READ
inline constexpr uint32_t kVmWrite = 1u << 1;    // VM_WRITE
inline constexpr uint32_t kVmExec = 1u << 2;     // VM_EXEC
inline constexpr uint32_t kVmShared = 1u << 3;   // VM_SHARED
inline constexpr uint32_t kVmIo = 1u << 4;       // VM_IO
inline constexpr uint32_t kVmPfnmap = 1u << 5;   // VM_PFNMAP
inline constexpr uint32_t kVmHugetlb = 1u << 6;  // VM_HUGETLB

struct Vma {
  Hva start;  // inclusive
  Hva end;    // exclusive
  uint32_t vm_flags = 0;
};

// Host mapping levels (x86 PG_LEVEL_*).
enum class PgLevel : int { k4K = 1, k2M = 2, k1G = 3 };
constexpr uint64_t pg_level_pages(PgLevel level) {
  return uint64_t{1} << (9 * (static_cast<int>(level) - 1));
}

// A struct page on which the holder owns exactly one reference (or one pin). A null Page
// (mm == nullptr) holds nothing; KVM's `refcounted_page == NULL`. Every non-null Page handed out
// by a HostMm must be given back exactly once through HostMm::put_page (the release helpers in
// follow.h do that).
struct Page {
  HostMm* mm = nullptr;
  Pfn pfn;
  Hva hva;             // the address it was looked up through
  bool pinned = false;  // FOLL_PIN rather than FOLL_GET

  explicit operator bool() const { return mm != nullptr; }
  friend bool operator==(const Page&, const Page&) = default;
};

// The leaf PTE of a VM_IO / VM_PFNMAP mapping (follow_pfnmap_start).
struct PfnmapPte {
  Pfn pfn;
  bool writable = false;
};

// A subscriber to host MM events (struct mmu_notifier_ops). Ranges are page aligned, half open.
// Callbacks run on the thread that changed the mapping; start..end brackets the change, and the
// old translation must not be used after start returns.
class MmuNotifier {
 public:
  virtual ~MmuNotifier() = default;
  virtual void invalidate_range_start(Hva start, Hva end) = 0;
  virtual void invalidate_range_end(Hva start, Hva end) = 0;
  // Aging. Return whether any mapping in the range was young.
  virtual bool clear_flush_young(Hva start, Hva end);
  virtual bool clear_young(Hva start, Hva end);
  virtual bool test_young(Hva start, Hva end);
  // The mm is going away: drop every mapping.
  virtual void release();
};

// What KVM's follow-pfn path asks of the host MM. Return conventions follow the kernel:
// 0 or a page count on success, a negative errno on failure.
//
// Thread safety: every method may be called concurrently from any thread, except that the
// mmap lock methods pair up on one thread.
class HostMm {
 public:
  virtual ~HostMm() = default;

  // get_user_page_fast_only(hva, FOLL_WRITE [| FOLL_PIN]): lockless, never faults, never
  // sleeps. Succeeds only when a present PTE is already writable and needs no fault handling
  // (not CoW-shared, not the zero page, not poisoned, not VM_IO/VM_PFNMAP). On success *page
  // holds one new reference (one pin with kFollPin).
  virtual bool get_user_page_fast_only(Hva hva, FollFlags gup_flags, Page* page) = 0;

  // get_user_pages_unlocked(hva, 1, page, gup_flags) with gup_flags from kFollWrite,
  // kFollNowait, kFollInterruptible, kFollHwpoison, kFollHonorNumaFault, kFollPin. May fault
  // the page in (a write breaks CoW) and may sleep. Returns
  //   1            the page, with one reference (or pin) in *page;
  //   0            kFollNowait and the page needs I/O (or would otherwise wait);
  //   -EINTR       a fatal signal, or kFollInterruptible and any pending signal;
  //   -EAGAIN      a fatal signal before the mmap lock was taken;
  //   -EHWPOISON   the page is poisoned (kFollHwpoison);
  //   -EFAULT      no VMA, a VMA forbidding the access, VM_IO/VM_PFNMAP, or a failed fault;
  //   -ENOMEM      out of memory while faulting.
  virtual long get_user_pages_unlocked(Hva hva, FollFlags gup_flags, Page* page) = 0;

  // The mmap read lock, held around vma_lookup / follow_pfnmap / fixup_user_fault.
  virtual void mmap_read_lock() = 0;
  virtual void mmap_read_unlock() = 0;
  // vma_lookup: the VMA containing hva, if any. Requires the mmap lock.
  virtual std::optional<Vma> vma_lookup(Hva hva) = 0;
  // follow_pfnmap_start/end on a VM_IO/VM_PFNMAP VMA: 0 and *pte when a leaf PTE is present,
  // -ENOENT when it is not, -EINVAL for a VMA of another kind. Requires the mmap lock.
  virtual int follow_pfnmap(Hva hva, PfnmapPte* pte) = 0;
  // fixup_user_fault(hva, write ? FAULT_FLAG_WRITE : 0): faults the PTE in. May drop and
  // retake the mmap lock, reporting it in *unlocked; any Vma read before is then stale.
  // Returns 0 or -EFAULT / -ENOMEM / -EHWPOISON / -EINTR. Requires the mmap lock.
  virtual int fixup_user_fault(Hva hva, bool write, bool* unlocked) = 0;

  // struct page operations on a Page this mm handed out.
  virtual void put_page(const Page& page) = 0;           // put_page / unpin_user_page
  virtual void set_page_dirty(const Page& page) = 0;     // folio_mark_dirty (under lock)
  virtual void mark_page_accessed(const Page& page) = 0;
  virtual bool page_reserved(const Page& page) = 0;      // PageReserved

  // [v7] pfn-based struct page helpers (kvm_pfn_to_refcounted_page, kvm_try_get_pfn): the page
  // behind pfn (looked up through hva) when it "looks refcounted", without taking a reference;
  // and get_page_unless_zero on it. Used only by the v7 remapped path and v7 release helpers.
  virtual std::optional<Page> pfn_to_refcounted_page(Pfn pfn, Hva hva) = 0;
  virtual bool get_page_unless_zero(const Page& page) = 0;

  // Signal state of the calling thread.
  virtual bool signal_pending() = 0;
  virtual bool fatal_signal_pending() = 0;

  // The host page-table level that maps hva (4K, 2M for THP/hugetlb, 1G).
  virtual PgLevel host_mapping_level(Hva hva) = 0;

  // The bytes of the 4K page that pfn (found through hva) is, for the MMU's guest accesses
  // (kmap). Valid until an invalidation of hva begins. nullptr if it cannot be mapped.
  virtual std::byte* page_address(Pfn pfn, Hva hva) = 0;

  // MMU notifier subscription (mmu_notifier_register). Events for changes made through this
  // HostMm (and, for LinuxHost, seen through userfaultfd) reach every subscriber.
  virtual void register_notifier(MmuNotifier* notifier) = 0;
  virtual void unregister_notifier(MmuNotifier* notifier) = 0;

  // References (and pins) handed out and not yet put: 0 whenever nobody holds a Page.
  virtual uint64_t outstanding_refs() const = 0;
};

}  // namespace gfnmap
