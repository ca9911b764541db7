// gfnmap LinuxHost: the HostMm interface over real process memory (anonymous, memfd, files, THP,
// hugetlb, userfaultfd-backed and device memory), with a syscall-free fast path.
#pragma once

#include <atomic>
#include <bitset>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "gfnmap/host.h"
#include "gfnmap/types.h"

namespace gfnmap {

// What backs a region (the KVM selftests' "backing source").
enum class RegionKind {
  kAnonymous,    // private anonymous (MAP_PRIVATE | MAP_ANONYMOUS); created ones are
                 // MADV_NOHUGEPAGE, so their mapping level is 4K without a system call
  kThp,          // private anonymous with MADV_HUGEPAGE
  kHugetlb2M,    // MAP_HUGETLB | MAP_HUGE_2MB (needs a non-empty pool)
  kHugetlb1G,    // MAP_HUGETLB | MAP_HUGE_1GB
  kMemfdShared,  // memfd_create + MAP_SHARED
  kFileShared,   // a file, MAP_SHARED
  kFilePrivate,  // a file, MAP_PRIVATE (a write breaks CoW)
  kLazy,         // private anonymous served by a userfaultfd page server (uffd.h)
  kDevice,       // device memory behaving as VM_IO | VM_PFNMAP: never refcounted
};
std::string_view to_string(RegionKind kind);

// Where pfns come from: the physical frame in /proc/self/pagemap (needs CAP_SYS_ADMIN), or the
// host virtual page number (hva >> 12). kAuto picks pagemap when its PFN bits are readable.
enum class PfnSource { kAuto, kPagemap, kVirtual };

// How many pages a slow-path fault on an anonymous or memfd region populates (LinuxHost::Options).
enum class FaultAround : uint8_t {
  kOff,         // the faulting page only, as KVM's GUP does
  kSequential,  // readahead-style: ahead of sequential runs only (the default)
  kFixed,       // the aligned window of fault_around_pages pages around every fault
};
std::string_view to_string(FaultAround policy);

// What a lazily populated (userfaultfd) region needs from its page server. Implemented by
// uffd::PageServer; LinuxHost never includes uffd.h.
class LazyBacking {
 public:
  virtual ~LazyBacking() = default;
  // The page holding hva has been served and not removed since: touching it will not wait.
  virtual bool page_ready(Hva hva) = 0;
  // Asks for hva ahead of any demand fault (FOLL_NOWAIT kick); never blocks.
  virtual void request(Hva hva) = 0;
  // Asks for hva and waits until it is served. When `interrupt_fd` >= 0 (a signalfd), returns
  // -EINTR as soon as it is readable or a signal handler ran; otherwise waits on. 0 when ready.
  virtual int wait_ready(Hva hva, int interrupt_fd) = 0;
  // UFFDIO_POISON on [start, end): the pages must be missing. 0 or -errno.
  virtual int poison(Hva start, Hva end) = 0;
};

// A request to create a region (LinuxHost::create_region) or to adopt an existing mapping
// (LinuxHost::register_region).
struct RegionSpec {
  RegionKind kind = RegionKind::kAnonymous;
  uint64_t size = 0;              // bytes, a multiple of the page size (2M/1G for hugetlb)
  int prot = 3;                   // PROT_READ | PROT_WRITE
  int fd = -1;                    // kFileShared / kFilePrivate (and kMemfdShared to reuse one)
  uint64_t offset = 0;            // file offset
  Hva addr;                       // register_region: the start of the existing mapping
  LazyBacking* lazy = nullptr;    // kLazy: the page server (must outlive the region)
  std::string name = "gfnmap";    // memfd name
};

// A region as LinuxHost knows it.
struct RegionInfo {
  Hva start;
  Hva end;  // exclusive
  RegionKind kind = RegionKind::kAnonymous;
  uint32_t vm_flags = 0;  // kVm* flags as vma_lookup reports them
  bool owned = false;     // created (and unmapped at the end) by LinuxHost
};

// Statistics, all monotonic.
struct LinuxHostStats {
  uint64_t fast_hits = 0;
  uint64_t fast_misses = 0;
  uint64_t slow_calls = 0;
  uint64_t populate_errors = 0;
  uint64_t nowait_needs_io = 0;
  uint64_t interrupted = 0;
  uint64_t invalidations = 0;
  uint64_t bad_puts = 0;  // put_page of a page with no reference: a caller bug, never a crash
  uint64_t populated_ahead = 0;  // pages fault-around populated beyond the faulting ones
};

namespace detail {
struct LinuxRegion;
struct LinuxRegionSet;
}  // namespace detail

// HostMm over this process's memory.
//
// LinuxHost is the "VMA" source for vma_lookup: it knows the regions it created or was told
// about, and an address outside them has no VMA (GUP gives -EFAULT without a system call).
// Per page it keeps atomic state (present, host-writable, pfn) set by the slow path and cleared
// by invalidations, so get_user_page_fast_only needs no system call. A reference on real
// memory is LinuxHost's own accounting (a per-page count; the kernel page is not pinned): the
// kernel may still reclaim or migrate the page, which is safe because every user of the pfn is
// under MMU-notifier protection or re-resolves, and page contents are reached through the hva.
//
// Slow path: MADV_POPULATE_READ / MADV_POPULATE_WRITE on the one page (the kernel's own GUP).
// Host changes made through LinuxHost (discard, protect, unmap, remap) and userfaultfd REMOVE /
// UNMAP events (through notify_external_*) raise invalidate_range_start/end to subscribers.
//
// Signals: "pending" means blocked and pending for the calling thread (sigpending(2)), the
// state a vCPU thread is in when it blocks its kick signal. An interruptible wait also ends when
// an unblocked signal's handler runs. A fatal signal cannot be observed from user space (the
// process is gone): fatal_signal_pending() is always false.
//
// Notifier subscribers must unregister before they are destroyed; callbacks run on the thread
// that made the change (for userfaultfd events, a page-server thread) and must not call back
// into LinuxHost's region changes. The destructor calls release() on the subscribers left.
//
// Lock order: mmap lock (shared_mutex) > regions publish lock. The fast path takes no lock.
class LinuxHost final : public HostMm {
 public:
  struct Options {
    PfnSource pfn_source = PfnSource::kAuto;
    // Fault-around for anonymous and memfd regions: a slow-path fault populates a window of
    // pages with its one MADV_POPULATE call (and one pagemap read), so that the next faults in
    // the window take the system-call-free fast path. The window is never larger than
    // fault_around_pages (a power of two, 2 to 512; EINVAL otherwise) and never leaves the
    // region (nor a piece of it that mprotect split off).
    //  - kSequential: readahead-style. A fault on the page where the last window of a run of
    //    sequential faults ended populates twice that window (2, 4, ... pages from the faulting
    //    page up); any other fault populates its own page only, as KVM's GUP does. Random or
    //    strided access allocates nothing it does not touch; a sequential first touch (a guest
    //    zeroing its memory, a restore) makes one system call per fault_around_pages pages and
    //    allocates at most one window beyond the last page it touched. kFaultAroundStreams runs
    //    per mapping are followed at a time (one per vCPU faulting in it, say).
    //  - kFixed: every slow-path fault populates the aligned window of fault_around_pages around
    //    its page (the kernel's fault-around for file pages): meant for restores that touch all.
    //  - kOff: one page per fault.
    // A write fault populates for write, a read fault for read (the zero page for anonymous
    // memory: nothing is allocated ahead of reads).
    FaultAround fault_around = FaultAround::kSequential;
    uint32_t fault_around_pages = 64;
    // Whether a read fault of an untouched private anonymous page maps the shared zero page
    // (read-only: decision-table row 9) or a fresh exclusive page (writable: row 8). Unset:
    // host_facts().zero_page. True on a kernel without the zero page emulates it for kAnonymous
    // regions (such pages are kept read-only until written, and the write raises an
    // invalidation as a zero-page replacement does); false on a kernel with it is EINVAL.
    std::optional<bool> zero_page = std::nullopt;
  };
  static constexpr unsigned kFaultAroundStreams = 8;
  static Result<std::unique_ptr<LinuxHost>> create(Options options);
  static Result<std::unique_ptr<LinuxHost>> create() { return create(Options{}); }
  ~LinuxHost() override;
  LinuxHost(const LinuxHost&) = delete;
  LinuxHost& operator=(const LinuxHost&) = delete;

  // Maps a new region of spec.kind (spec.addr ignored). EINVAL for a bad size/prot/kind/fd,
  // EBADF for a closed fd, ENOMEM when the hugetlb pool is empty (message says so).
  Result<RegionInfo> create_region(const RegionSpec& spec);
  // Adopts an existing mapping [spec.addr, spec.addr + spec.size) of spec.kind. EINVAL for an
  // unaligned or empty range, EEXIST when it overlaps a known region, EFAULT when the range is
  // not mapped.
  Result<RegionInfo> register_region(const RegionSpec& spec);
  // Forgets a region without touching the mapping (unmaps it too when LinuxHost created it).
  // Raises an invalidation of its range.
  Result<void> unregister_region(Hva start);

  // Host events done through LinuxHost: each raises invalidate_range_start/end around the
  // change. Ranges must be page aligned and inside known regions (EINVAL otherwise).
  // discard: MADV_DONTNEED (private) or MADV_REMOVE (shared); the memory reads as zero (or the
  // file content for private file mappings) afterwards.
  Result<void> discard(Hva start, uint64_t size);
  // protect: mprotect to prot (PROT_NONE, PROT_READ, PROT_READ|PROT_WRITE); splits regions.
  Result<void> protect(Hva start, uint64_t size, int prot);
  // unmap: munmap; the range has no VMA afterwards.
  Result<void> unmap(Hva start, uint64_t size);
  // remap: replaces the backing of [start, start+size) of an anonymous or THP region with fresh
  // zero memory at the same address (mmap MAP_FIXED): every old translation dies.
  Result<void> remap(Hva start, uint64_t size);
  // poison: UFFDIO_POISON through the region's page server (kLazy regions only); the page is
  // discarded first. GUP then gives -EHWPOISON, as the kernel does.
  Result<void> poison(Hva start, uint64_t size);

  // Changes seen behind LinuxHost's back (userfaultfd REMOVE / UNMAP / REMAP events): raise the
  // invalidation and update the region table. `begin` runs before the change where the event
  // allows it; `end` after.
  void notify_external_begin(Hva start, Hva end);
  void notify_external_end(Hva start, Hva end);
  void notify_external_unmap(Hva start, Hva end);

  // Regions known now, sorted by start.
  std::vector<RegionInfo> regions() const;
  LinuxHostStats stats() const;
  // True when pfns come from /proc/self/pagemap.
  bool pfns_are_physical() const { return physical_pfns_; }
  // PAGEMAP_SCAN is available (probed at creation).
  bool has_pagemap_scan() const { return has_pagemap_scan_; }
  // The zero-page fact this host follows (Options::zero_page), and whether it is emulated.
  bool zero_page() const { return zero_page_; }
  bool zero_page_emulated() const { return emulate_zero_page_; }

  // HostMm.
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
  std::byte* page_address(Pfn pfn, Hva hva) override;
  void register_notifier(MmuNotifier* notifier) override;
  void unregister_notifier(MmuNotifier* notifier) override;
  uint64_t outstanding_refs() const override;

 private:
  explicit LinuxHost(Options options);

  const detail::LinuxRegion* find(Hva hva) const;  // lock-free, on the published set
  Result<RegionInfo> add_region(const RegionSpec& spec, Hva start, bool owned, int fd_to_close);
  Result<void> check_range(Hva start, uint64_t size, const char* what) const;
  void publish_locked(std::vector<detail::LinuxRegion> regions);
  void invalidate_start(Hva start, Hva end);
  void invalidate_end(Hva start, Hva end);
  void clear_state(Hva start, Hva end);
  long slow_get(const detail::LinuxRegion& r, Hva hva, FollFlags flags, Page* page);
  int wait_interruptible(const detail::LinuxRegion& r, Hva hva, bool interruptible);
  uint64_t read_pfn(Hva hva, uint64_t* entry);
  void note_populated(const detail::LinuxRegion& r, Hva hva, bool write);
  // Options::fault_around for a slow-path fault on pg: populates a window holding pg and records
  // its pages; false when it populated nothing (the caller populates pg alone).
  bool fault_around(const detail::LinuxRegion& r, Hva pg, bool write);
  // Options::zero_page emulated (a kernel without it): of the n pages from start, those a read
  // populate is about to fault in fresh, which would have mapped the zero page (bit k: page k);
  // keep_read_only then records them read-only after the populate.
  static constexpr uint64_t kMaxWindow = 512;
  std::bitset<kMaxWindow> zero_page_candidates(const detail::LinuxRegion& r, Hva start,
                                               uint64_t n, bool write);
  void keep_read_only(const detail::LinuxRegion& r, Hva start, uint64_t n,
                      const std::bitset<kMaxWindow>& fresh);
  // Populates [start, end) (inside r) and records every page. False on failure.
  bool populate_window(const detail::LinuxRegion& r, Hva start, Hva end, bool write);
  PgLevel mapping_level_locked(const detail::LinuxRegion& r, Hva hva);

  Options options_;
  int pagemap_fd_ = -1;
  int kpageflags_fd_ = -1;
  bool physical_pfns_ = false;
  bool has_pagemap_scan_ = false;
  bool zero_page_ = true;
  bool emulate_zero_page_ = false;

  mutable std::shared_mutex mmap_lock_;  // the "mmap lock": region table changes take it
  mutable std::mutex publish_mu_;        // writers of the region table; put_page fallback
  std::atomic<const detail::LinuxRegionSet*> set_{nullptr};
  std::vector<std::unique_ptr<detail::LinuxRegionSet>> retired_;  // freed at destruction

  mutable std::mutex notifier_mu_;
  std::vector<MmuNotifier*> notifiers_;

  mutable std::atomic<uint64_t> fast_hits_{0}, fast_misses_{0}, slow_calls_{0},
      populate_errors_{0}, nowait_needs_io_{0}, interrupted_{0}, invalidations_{0},
      bad_puts_{0}, populated_ahead_{0};
};

}  // namespace gfnmap
