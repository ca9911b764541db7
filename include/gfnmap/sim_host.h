// gfnmap SimHost: the deterministic host-MM model, the first HostMm (spec section 12). Tests and
// the CLI build host states with its setup API; the resolver and the MMU use the HostMm side.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gfnmap/host.h"
#include "gfnmap/types.h"

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// Vocabulary of the model.

// mmap/mprotect protection (PROT_*). Combine with |.
enum class Prot : uint32_t { kNone = 0, kRead = 1, kWrite = 2, kExec = 4 };
constexpr Prot operator|(Prot a, Prot b) {
  return static_cast<Prot>(static_cast<uint32_t>(a) | static_cast<uint32_t>(b));
}
constexpr bool has(Prot set, Prot bit) {
  return (static_cast<uint32_t>(set) & static_cast<uint32_t>(bit)) != 0;
}
inline constexpr Prot kProtRW = Prot::kRead | Prot::kWrite;

// What backs a VMA.
enum class VmaKind {
  kAnonPrivate,  // MAP_PRIVATE|MAP_ANONYMOUS: zero page on read, CoW, swap
  kAnonShared,   // MAP_SHARED of a memfd/shmem: one frame per file page, no I/O unless swapped
  kFilePrivate,  // MAP_PRIVATE of a disk file: page cache (may need I/O), CoW on write
  kFileShared,   // MAP_SHARED of a disk file: page cache (may need I/O), writes hit the cache
  kPfnmap,       // VM_PFNMAP (VM_IO too with MmapOptions::vm_io) device memory, raw PTEs
};

// Page size of a VMA (host_mapping_level).
enum class PageBacking {
  k4K,         // base pages only
  kThp,        // transparent huge pages: the first fault of a whole, empty 2M range maps 2M
  kHugetlb2M,  // hugetlbfs 2M: faults map whole 2M pages; ranges must be 2M aligned
  kHugetlb1G,  // hugetlbfs 1G: the same at 1G
};

// The struct pages behind a VM_PFNMAP VMA (the v7 "looks refcounted" heuristic inputs).
enum class PfnmapBacking {
  kRefcounted,    // pfn_valid, not reserved, refcount 1 (held by the "driver")
  kRefcountZero,  // pfn_valid, not reserved, refcount 0: TTM-style tail pages (row 22)
  kReserved,      // pfn_valid, PG_reserved (e.g. a carve-out): not "refcounted"
  kNoStructPage,  // !pfn_valid: MMIO without struct pages
};

// Signal state of a thread, as the slow path sees it (spec 4 rows 10-11).
enum class SignalState {
  kNone,
  kPending,          // a non-fatal signal: interrupts GUP only with kFollInterruptible
  kFatal,            // a fatal signal: GUP returns -EINTR
  kFatalBeforeLock,  // a fatal signal that arrived while GUP waited for the mmap lock: -EAGAIN
};

// The kind of a model frame.
enum class FrameKind { kZero, kAnon, kPageCache, kDevice, kHole };

using FileId = uint32_t;  // a memfd or disk file of the model; 0 means "none / create one"

struct MmapOptions {
  PageBacking backing = PageBacking::k4K;
  // MAP_FIXED_NOREPLACE: map exactly here (page aligned, huge aligned for hugetlb/THP) or fail
  // with EEXIST. Without it, VMAs are placed upward from SimHostConfig::hva_base, each aligned
  // to its page size and followed by one unmapped guard page.
  std::optional<Hva> fixed;

  // kAnonShared / kFile*: map this file (from create_memfd / create_file) at file_offset
  // (bytes, page aligned). 0 creates a fresh file of the VMA's size.
  FileId file = 0;
  uint64_t file_offset = 0;
  // A fresh disk file (kFile*) starts with all its pages in the page cache. By default they
  // are all on disk: the first fault needs I/O (NOWAIT GUP returns 0).
  bool page_cache_resident = false;
  // kFileShared: the file needs dirty tracking (vma_wants_writenotify), so a read fault maps
  // the page read-only and the first write fault makes it writable. kAnonShared never does.
  bool writenotify = true;

  // kPfnmap only.
  bool vm_io = false;                                  // VM_IO | VM_PFNMAP instead of VM_PFNMAP
  PfnmapBacking pfnmap_backing = PfnmapBacking::kRefcounted;
  bool ptes_present = true;   // PTEs start present; else each is installed by fixup_user_fault
  bool ptes_writable = true;  // PTEs are writable (also requires Prot::kWrite)
};

// One page-table entry of the model, as pte() reports it.
struct PteInfo {
  enum class State {
    kNone,      // no PTE: the next access faults
    kPresent,   // mapped
    kSwapped,   // anon page swapped out (swap_out): a fault needs I/O
    kHwpoison,  // hwpoison entry: the frame behind it is poisoned
  };
  State state = State::kNone;
  Pfn pfn;                  // kPresent / kHwpoison
  bool writable = false;    // the PTE allows writes now
  bool young = false;       // accessed since the last age_range
  bool dirty = false;       // written through the primary MMU
  bool cow_shared = false;  // shares its frame with a simulated fork child (make_cow_shared)
  bool zero_page = false;   // maps the shared zero page
  PgLevel level = PgLevel::k4K;  // the mapping level that maps it (host_mapping_level)
};

// A frame (struct page) of the model.
struct FrameInfo {
  bool valid = false;          // pfn is (or was) a frame of this model
  FrameKind kind = FrameKind::kHole;
  bool has_struct_page = true;  // pfn_valid
  int64_t refcount = 0;       // page_ref_count: mappings + page cache + driver + held references
  uint32_t held_refs = 0;     // references handed out through HostMm and not yet put
  uint32_t held_pins = 0;     // pins handed out and not yet unpinned
  bool reserved = false;      // PG_reserved (the zero page is)
  bool poisoned = false;      // PG_hwpoison
  bool dirty = false;         // set_page_dirty was called on it (through HostMm)
  bool accessed = false;      // mark_page_accessed was called on it (through HostMm)
  bool freed = false;         // refcount reached 0 and the frame went back to the allocator
};

// A VMA with the model's own attributes.
struct VmaInfo {
  Vma vma;  // what vma_lookup reports
  VmaKind kind = VmaKind::kAnonPrivate;
  Prot prot = Prot::kNone;
  PageBacking backing = PageBacking::k4K;
  FileId file = 0;           // kAnonShared / kFile*
  uint64_t file_offset = 0;  // of vma.start, bytes
  Pfn device_pfn;            // kPfnmap: pfn of the page at vma.start
  PfnmapBacking pfnmap_backing = PfnmapBacking::kRefcounted;
};

// Call counters, so tests can assert which path ran (invariants 6, 7). Monotonic until
// reset_counters().
struct SimCounters {
  uint64_t fast_lookups = 0;  // get_user_page_fast_only calls
  uint64_t fast_hits = 0;     //   ... that returned a page
  uint64_t slow_gups = 0;     // get_user_pages_unlocked calls
  uint64_t slow_gup_pages = 0;  // ... that returned 1
  uint64_t vma_lookups = 0;
  uint64_t follow_pfnmaps = 0;
  uint64_t fixups = 0;          // fixup_user_fault calls
  uint64_t fixup_unlocks = 0;   // ... that dropped the mmap lock
  uint64_t faults = 0;          // page faults handled (GUP, fixup, populate)
  uint64_t cow_breaks = 0;      // write faults that copied a CoW-shared / zero / page-cache page
  uint64_t zero_page_maps = 0;  // read faults that mapped the zero page
  uint64_t page_ins = 0;        // faults that read a page in (file I/O or swap-in)
  uint64_t puts = 0;            // put_page calls (references and pins)
  uint64_t get_page_unless_zero = 0;  // calls (successful or not)
  uint64_t invalidations = 0;   // invalidate_range_start/end brackets issued
  FollFlags last_gup_flags = 0;  // gup_flags of the last get_user_pages_unlocked
};

// A forced result of get_user_pages_unlocked for one page (inject_gup_result).
struct GupInjection {
  long result = -14;  // 0 or a negative errno (default -EFAULT); 1 is not injectable
  int times = -1;     // how many calls it applies to; -1: until cleared
};

// Behaviour of fixup_user_fault for one page (inject_fixup).
struct FixupInjection {
  // Nonzero: fixup_user_fault fails with this negative errno (row 18), after any lock drop.
  int error = 0;
  // The next N calls each drop the mmap lock once and report *unlocked = true (row 19). The
  // last of them then retries the fault from a fresh VMA lookup (installing a missing PFNMAP
  // PTE); the earlier ones return 0 leaving the PTE as it was (the retried fault raced with
  // another zap), so a caller that re-looks-up and calls fixup again sees N drops in a row.
  int drop_lock_times = 0;
  // Runs on the faulting thread while the mmap lock is dropped (with no SimHost lock held), so
  // it may munmap / mremap / mprotect / mmap (invariant 15). Called once per drop.
  std::function<void(class SimHost&)> while_unlocked;
};

// The result of age_range / test_young.
struct AgeResult {
  bool primary_young = false;    // some PTE in the range was young (primary MMU accessed bit)
  bool secondary_young = false;  // some notifier (KVM) reported young
};

struct SimHostConfig {
  Hva hva_base{0x7f0000000000};  // where the first VMA goes (reproducible addresses)
  uint64_t first_pfn = 0x1000;   // pfn of the zero page; frames are numbered upward from it
  // A read fault of untouched private anonymous memory maps the shared zero page (read-only,
  // row 9) when true; when false it allocates a fresh exclusive page, writable at once (row 8),
  // as kernels without the zero page do (host_facts.h).
  bool zero_page = true;
};

// A protocol violation recorded by the model (never a crash).
struct SimViolation {
  std::string what;  // "put_page of pfn 0x1003 with no reference held", ...
};

// ---------------------------------------------------------------------------------------------
// SimHost.
//
// A model address space: VMAs, a page table, frames with refcounts and flags, memfds and disk
// files with a page cache, signals, MMU notifiers, and injection points for every failure of
// the decision table (spec 4). Everything is deterministic: the same calls give the same hvas,
// pfns and results.
//
// Thread safety: every method may be called from any thread. Lock order (outermost first):
//   1. the model mmap lock (a reader-writer lock, like mmap_lock): taken shared by
//      get_user_pages_unlocked, populate and the mmap_read_lock() of HostMm; exclusive by
//      every setup call that changes VMAs or PTEs (mmap, munmap, mprotect, mremap, discard,
//      write_protect, make_cow_shared, poison, evict, swap_out, zap_pfnmap). It nests: a
//      thread that holds it may call GUP again (the v7 hwpoison probe does). A setup call on a
//      thread that holds it shared fails with EDEADLK instead of deadlocking.
//   2. the locks of notifier subscribers (e.g. the MMU's mmu_lock): notifier callbacks run
//      with the mmap lock held by the changing thread (GUP CoW breaks: shared; setup calls:
//      exclusive) and with no other SimHost lock held. So a subscriber must not take the mmap
//      lock (call GUP or setup calls) from a callback, and nobody may call GUP, populate or a
//      setup call while holding a lock that a callback takes. put_page, set_page_dirty,
//      mark_page_accessed, page_reserved, get_user_page_fast_only, page_address and the
//      queries take only lock 4 and are safe under such locks.
//   3. the notifier registry lock: held only to copy the subscriber list, never across a
//      callback. unregister_notifier waits until no invalidation or aging call that could
//      still reach the notifier is running (like synchronize_srcu), so it must not be called
//      from a callback or while holding a lock a callback takes.
//   4. the state lock: innermost, held only inside SimHost, never across a callback.
//
// Bad input (unaligned or unmapped ranges, unknown pfns, foreign Pages) gives an Error or a
// recorded violation, never a crash.
class SimHost final : public HostMm {
 public:
  explicit SimHost(SimHostConfig config = {});
  ~SimHost() override;
  SimHost(const SimHost&) = delete;
  SimHost& operator=(const SimHost&) = delete;

  // ------------------------------------------------------------------ address space setup
  // mmap: a new VMA of `size` bytes (rounded up to the page size; a multiple of the huge page
  // size for hugetlb). EINVAL for bad sizes/alignment/options, EEXIST if `fixed` overlaps,
  // ENOENT for an unknown file, ENOMEM when the address space is exhausted.
  [[nodiscard]] Result<Hva> mmap(uint64_t size, Prot prot, VmaKind kind,
                                 const MmapOptions& options = {});
  // A memfd (no I/O needed; evicting its pages swaps them out) or a disk file (pages start on
  // disk unless `resident`), `size` bytes, to map with MmapOptions::file (several VMAs may
  // map one file: they then share its frames).
  [[nodiscard]] Result<FileId> create_memfd(uint64_t size);
  [[nodiscard]] Result<FileId> create_file(uint64_t size, bool resident = false);

  // munmap: drops the VMAs and PTEs of [hva, hva + len) (len rounded up). Unmapped parts are
  // ignored. Notifiers: invalidate bracket around the change.
  [[nodiscard]] Result<void> munmap(Hva hva, uint64_t len);
  // mprotect: new protection for [hva, hva + len), which must be fully mapped (ENOMEM).
  // Removing write makes PTEs read-only; adding it changes no PTE (the next write faults).
  [[nodiscard]] Result<void> mprotect(Hva hva, uint64_t len, Prot prot);
  // mremap(MREMAP_MAYMOVE [| MREMAP_FIXED]): [old_hva, old_hva + old_len) must lie in one VMA
  // (EFAULT). Without new_hva, a shrink or same size stays in place (the tail is unmapped) and a
  // grow moves the range to a fresh place; with new_hva it moves there (replacing whatever was
  // mapped, EINVAL if it overlaps the old range). Frames and PTEs move with it. Returns the new
  // address. Notifiers: an invalidation of the old range (and munmap's for replaced ranges).
  [[nodiscard]] Result<Hva> mremap(Hva old_hva, uint64_t old_len, uint64_t new_len,
                                   std::optional<Hva> new_hva = std::nullopt);
  // madvise(MADV_DONTNEED): drops the PTEs of the range (anonymous private pages read back as
  // zero; shared and file pages stay in their file). EINVAL on VM_PFNMAP.
  [[nodiscard]] Result<void> discard(Hva hva, uint64_t len);

  // ------------------------------------------------------------------ page state setup
  // MADV_POPULATE_READ / _WRITE: faults every page of the range in, as GUP would (CoW breaks
  // on write, page-ins). Errors as the kernel's: ENOMEM unmapped, EINVAL PROT_NONE / VM_PFNMAP
  // / write to a read-only VMA, EHWPOISON poisoned, plus injected GUP results.
  [[nodiscard]] Result<void> populate(Hva hva, uint64_t len, bool write);
  // Simulated fork of anonymous private pages: each page of the range (populated with a write
  // first if needed) gets a second owner and a read-only PTE, so a read maps it read-only and
  // a write breaks CoW into a new frame. EINVAL for other VMA kinds and hugetlb.
  [[nodiscard]] Result<void> make_cow_shared(Hva hva, uint64_t len = kPageSize);
  // Makes present PTEs of the range read-only without changing frames (like uffd-wp or the
  // dirty tracking of a file). A write fault makes them writable again in place; a PFNMAP PTE
  // stays read-only (row 20).
  [[nodiscard]] Result<void> write_protect(Hva hva, uint64_t len = kPageSize);
  // memory_failure(): the frame behind hva (populated with a write first if needed) becomes
  // poisoned and every PTE mapping it becomes a hwpoison entry. Hugetlb poisons the whole huge
  // page; THP splits first.
  [[nodiscard]] Result<void> poison(Hva hva);
  // Drops file pages of the range from the page cache (data kept "on disk"), unmapping them:
  // the next fault needs I/O (kFollNowait GUP returns 0). For a memfd this swaps the pages out.
  // Pages with references held through HostMm are skipped (reclaim cannot free them). Returns
  // the number of pages evicted.
  [[nodiscard]] Result<uint64_t> evict_from_page_cache(Hva hva, uint64_t len = kPageSize);
  // The same for anonymous private pages: swap them out.
  [[nodiscard]] Result<uint64_t> swap_out(Hva hva, uint64_t len = kPageSize);
  // Zaps PTEs of a VM_PFNMAP range (zap_vma_ptes, e.g. a driver moving a buffer): they become
  // missing; fixup_user_fault installs them again.
  [[nodiscard]] Result<void> zap_pfnmap(Hva hva, uint64_t len = kPageSize);

  // ------------------------------------------------------------------ signals
  // Signal state of every thread without an override.
  void set_signal(SignalState state);
  // Signal state of one thread (overrides set_signal); clear_thread_signals drops overrides.
  void set_thread_signal(std::thread::id thread, SignalState state);
  void clear_thread_signals();

  // ------------------------------------------------------------------ injections (per page)
  // get_user_pages_unlocked(hva) returns `injection.result` (e.g. -EFAULT for an OOM/SIGBUS
  // fault, -ENOMEM, 0 for "needs I/O") before looking at anything else.
  [[nodiscard]] Result<void> inject_gup_result(Hva hva, GupInjection injection);
  // get_user_page_fast_only(hva) misses `times` times (-1: until cleared).
  [[nodiscard]] Result<void> inject_fast_miss(Hva hva, int times = -1);
  // fixup_user_fault(hva) fails and/or drops the mmap lock (rows 18, 19).
  [[nodiscard]] Result<void> inject_fixup(Hva hva, FixupInjection injection);
  void clear_injections();

  // ------------------------------------------------------------------ aging
  // The primary MMU ages [start, end): clears PTE young bits and calls every notifier's
  // clear_flush_young (flush) or clear_young (!flush).
  AgeResult age_range(Hva start, Hva end, bool flush);
  // test_young on every notifier and the PTE young bits; changes nothing.
  AgeResult test_young(Hva start, Hva end);
  // exit_mmap: calls every notifier's release(), then drops every VMA (no invalidations).
  void exit_mmap();

  // ------------------------------------------------------------------ queries
  std::optional<VmaInfo> vma_info(Hva hva) const;
  PteInfo pte(Hva hva) const;
  FrameInfo frame(Pfn pfn) const;
  Pfn zero_pfn() const;
  // Whether the file page behind hva is in the page cache (false for other kinds).
  bool page_cache_resident(Hva hva) const;
  SimCounters counters() const;
  void reset_counters();
  // Protocol violations so far (put of a page not held, refcount underflow, dirty/accessed
  // marking of a reserved or refcount-0 page, of a page nobody holds, unbalanced mmap lock).
  // Tests assert violations() == 0.
  uint64_t violations() const;
  std::vector<SimViolation> violation_log() const;  // the first 256
  // Human-readable state of one page (VMA, PTE, frame, level, injections), for the CLI.
  std::string describe(Hva hva) const;
  // Every VMA and every non-empty PTE, one line each, then the counters.
  std::string dump() const;

  // ------------------------------------------------------------------ HostMm (see host.h)
  bool get_user_page_fast_only(Hva hva, FollFlags gup_flags, Page* page) override;
  long get_user_pages_unlocked(Hva hva, FollFlags gup_flags, Page* page) override;
  void mmap_read_lock() override;
  void mmap_read_unlock() override;
  std::optional<Vma> vma_lookup(Hva hva) override;
  int follow_pfnmap(Hva hva, PfnmapPte* pte) override;
  int fixup_user_fault(Hva hva, bool write, bool* unlocked) override;
  void put_page(const Page& page) override;
  void set_page_dirty(const Page& page) override;
  void mark_page_accessed(const Page& page) override;
  bool page_reserved(const Page& page) override;
  std::optional<Page> pfn_to_refcounted_page(Pfn pfn, Hva hva) override;
  bool get_page_unless_zero(const Page& page) override;
  bool signal_pending() override;
  bool fatal_signal_pending() override;
  PgLevel host_mapping_level(Hva hva) override;
  // Returns the frame's 4K of data (allocated zeroed on first use; the zero page's is shared
  // and must not be written). nullptr for unknown, freed or poisoned pfns. The memory stays
  // valid for the SimHost's lifetime; after the frame is freed it may be reused by a new frame.
  std::byte* page_address(Pfn pfn, Hva hva) override;
  void register_notifier(MmuNotifier* notifier) override;
  void unregister_notifier(MmuNotifier* notifier) override;
  uint64_t outstanding_refs() const override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Names, for describe() and for building states from text (the CLI's JSON scenarios).
std::string_view to_string(VmaKind kind);            // "anon-private", "anon-shared", ...
std::string_view to_string(PageBacking backing);     // "4k", "thp", "hugetlb-2m", "hugetlb-1g"
std::string_view to_string(PfnmapBacking backing);   // "refcounted", "refcount-zero", ...
std::string_view to_string(SignalState state);       // "none", "pending", "fatal", ...
std::string_view to_string(FrameKind kind);          // "zero", "anon", "page-cache", ...
std::string prot_to_string(Prot prot);               // "rw-", "---", "r-x"
std::optional<VmaKind> parse_vma_kind(std::string_view text);
std::optional<PageBacking> parse_page_backing(std::string_view text);
std::optional<PfnmapBacking> parse_pfnmap_backing(std::string_view text);
std::optional<SignalState> parse_signal_state(std::string_view text);
// "rw", "rw-", "r", "r-x", "none", "---": letters r, w, x in any order, '-' ignored.
std::optional<Prot> parse_prot(std::string_view text);

}  // namespace gfnmap
