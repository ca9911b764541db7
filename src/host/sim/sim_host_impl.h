// gfnmap host/sim, internal: SimHost's state (VMAs, page table, frames, files, injections) and
// the helpers shared by sim_host.cc and sim_host_describe.cc.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gfnmap/sim_host.h"
#include "mmap_lock.h"

namespace gfnmap {

namespace detail {

inline constexpr uint64_t kTaskLimit = 0x00007ffffffff000ULL;  // TASK_SIZE_MAX (x86-64)
inline constexpr uint64_t k2M = uint64_t{2} << 20;
inline constexpr uint64_t k1G = uint64_t{1} << 30;

constexpr uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }
constexpr uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }
constexpr uint64_t page_no(uint64_t addr) { return addr >> kPageShift; }

// Saved contents of a page that is not in memory (on disk or in swap); null means zeros.
using Blob = std::shared_ptr<std::vector<std::byte>>;

// A frame's 4K of data, 4K-aligned like real pages (the MMU keeps page pointers in its entries
// as they are, without the low 12 bits).
struct PageDataFree {
  void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{kPageSize}); }
};
using PageData = std::unique_ptr<std::byte[], PageDataFree>;
inline PageData new_page_data() {
  void* p = ::operator new[](kPageSize, std::align_val_t{kPageSize});
  return PageData(static_cast<std::byte*>(p));
}

struct Frame {
  FrameKind kind = FrameKind::kHole;
  int64_t refcount = 0;
  uint32_t held_refs = 0;
  uint32_t held_pins = 0;
  bool has_struct_page = true;
  bool reserved = false;
  bool poisoned = false;
  bool dirty = false;
  bool accessed = false;
  bool freed = false;
  PageData data;  // allocated on first page_address / copy
};

struct Pte {
  PteInfo::State state = PteInfo::State::kNone;
  uint64_t pfn = 0;
  bool writable = false;
  bool young = false;
  bool dirty = false;
  bool cow = false;      // frame shared with a simulated fork child
  bool counted = false;  // holds a reference on the frame (false for PFNMAP PTEs)
  Blob swap;             // kSwapped: the page's data
};

struct VmaRec {
  uint64_t start = 0;
  uint64_t end = 0;
  Prot prot = Prot::kNone;
  VmaKind kind = VmaKind::kAnonPrivate;
  PageBacking backing = PageBacking::k4K;
  FileId file = 0;
  uint64_t file_off = 0;  // bytes, of `start`
  uint64_t device_pfn = 0;  // kPfnmap: pfn of `start`
  PfnmapBacking pfnmap_backing = PfnmapBacking::kRefcounted;
  bool vm_io = false;
  bool writenotify = false;  // effective: kFileShared with MmapOptions::writenotify
  bool ptes_writable = true;

  bool contains(uint64_t a) const { return a >= start && a < end; }
  uint64_t file_index(uint64_t addr) const { return (file_off + (addr - start)) >> kPageShift; }
  uint32_t vm_flags() const;
  bool file_backed() const { return kind != VmaKind::kAnonPrivate && kind != VmaKind::kPfnmap; }
  bool is_hugetlb() const {
    return backing == PageBacking::kHugetlb2M || backing == PageBacking::kHugetlb1G;
  }
  uint64_t huge_size() const;  // 4K for k4K
};

struct File {
  bool memfd = false;
  uint64_t npages = 0;
  std::map<uint64_t, uint64_t> cache;  // page index -> pfn (the cache holds one reference)
  std::map<uint64_t, Blob> disk;        // page index -> data not in the cache (disk / swap)
};

struct Range {
  uint64_t start;
  uint64_t end;
};

// Fault outcome beyond 0 / -errno: kFollNowait and the fault needs I/O.
inline constexpr long kFaultNeedsIo = 1;

}  // namespace detail

struct SimHost::Impl {
  explicit Impl(SimHost& self, SimHostConfig config);

  SimHost& self;
  SimHostConfig cfg;
  detail::MmapLock mmap_lock;

  // Notifier registry (lock 3).
  std::mutex nmu;
  std::condition_variable ncv;
  std::vector<MmuNotifier*> notifiers;
  uint64_t next_ticket = 1;
  std::multiset<uint64_t> active_tickets;

  // State (lock 4).
  mutable std::mutex mu;
  std::map<uint64_t, detail::VmaRec> vmas;  // by start
  std::map<uint64_t, detail::Pte> ptes;     // by page number (hva >> 12)
  std::map<uint64_t, PgLevel> huge;         // huge-mapped regions, by aligned start hva
  std::vector<detail::Frame> frames;        // index = pfn - first_pfn
  std::vector<detail::PageData> data_pool;  // buffers of freed frames
  detail::PageData zero_data;
  std::map<FileId, detail::File> files;
  FileId next_file = 1;
  uint64_t next_hva = 0;
  SignalState signal = SignalState::kNone;
  std::map<std::thread::id, SignalState> thread_signals;
  std::map<uint64_t, GupInjection> gup_inj;       // by page number
  std::map<uint64_t, int> fast_inj;               // by page number: remaining misses
  std::map<uint64_t, FixupInjection> fixup_inj;   // by page number
  SimCounters counts;
  uint64_t outstanding = 0;
  uint64_t violation_count = 0;
  std::vector<SimViolation> violation_list;

  // ---- helpers; *_locked require `mu`.
  void violate_locked(std::string what);
  detail::VmaRec* find_vma_locked(uint64_t addr);
  const detail::VmaRec* find_vma_locked(uint64_t addr) const;
  bool any_vma_in_locked(uint64_t start, uint64_t end) const;
  bool fully_mapped_locked(uint64_t start, uint64_t end) const;
  void split_vma_locked(uint64_t addr);
  detail::Frame* frame_locked(uint64_t pfn);
  const detail::Frame* frame_locked(uint64_t pfn) const;
  uint64_t alloc_frames_locked(uint64_t n, uint64_t align_pages, FrameKind kind);
  std::byte* data_locked(detail::Frame& f);
  void free_frame_locked(detail::Frame& f);
  void ref_locked(uint64_t pfn);
  void unref_locked(uint64_t pfn);
  void clear_pte_locked(uint64_t page);
  void map_pte_locked(uint64_t page, uint64_t pfn, bool writable, bool dirty, bool counted);
  detail::Blob save_data_locked(detail::Frame& f);
  void grab_locked(uint64_t pfn, uint64_t addr, bool pin, Page* out);
  SignalState signal_locked() const;
  std::optional<PgLevel> huge_level_locked(uint64_t addr, uint64_t* region_start) const;
  // Drops the huge-mapping record of every THP region partly inside [start, end).
  void split_thp_locked(uint64_t start, uint64_t end);
  // Drops the huge-mapping record of every region fully inside [start, end).
  void forget_huge_in_locked(uint64_t start, uint64_t end);
  // The notification range for a change of [start, end): widened to whole huge mappings.
  detail::Range notify_range_locked(uint64_t start, uint64_t end) const;
  // EINVAL when [start, end) cuts a hugetlb page of a VMA it touches.
  bool cuts_hugetlb_locked(uint64_t start, uint64_t end) const;
  Result<uint64_t> place_locked(uint64_t size, uint64_t align, std::optional<Hva> fixed);

  // ---- notifiers (no SimHost lock held).
  struct Subscribers {
    std::vector<MmuNotifier*> list;
    uint64_t ticket = 0;
  };
  Subscribers acquire_subscribers();
  void release_subscribers(const Subscribers& s);

  // Runs start(ranges), change(), end(ranges); `change` runs with `mu` held.
  template <class F>
  void invalidate(const std::vector<detail::Range>& ranges, F&& change);

  // ---- faults. Caller holds the mmap lock (shared or exclusive), not `mu`. Returns 0 when
  // the PTE now allows the access (and *out holds a new reference if out != nullptr),
  // kFaultNeedsIo, or -errno. Checks VMA permissions when check_perms.
  long fault_page(uint64_t addr, bool write, bool nowait, bool hwpoison, bool pin, Page* out);

  // ---- setup bodies; caller holds the mmap lock exclusive.
  Result<void> munmap_excl(uint64_t start, uint64_t end);
  Result<uint64_t> evict_excl(uint64_t start, uint64_t end, bool anon);
};

}  // namespace gfnmap
