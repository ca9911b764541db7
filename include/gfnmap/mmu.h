// gfnmap MMU: the second-level (EPT/NPT-like) table, page faults under the MMU-notifier
// protocol (spec 8, 9), invalidation and aging, dirty-log write protection, and the Vcpu API.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include "gfnmap/async_pf.h"
#include "gfnmap/dirty.h"
#include "gfnmap/follow.h"
#include "gfnmap/host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap {

class Vcpu;

// ---------------------------------------------------------------------------------------------
// Second-level PTE (SPTE) encoding. A leaf is one atomic 64-bit word:
//   bits 12..63  the host address minus the guest physical address of the leaf's first byte
//                (mod 2^64; both are 4K-aligned), so the host pointer of any byte the leaf
//                maps is (e & kAddrMask) + gpa: a table hit is one mask and the access's own
//                address add. The host pfn lives in a side array beside the entries.
//   bits 0..11   the flags below
// A non-leaf entry (levels 2..4) is a child table pointer with kTable set. 0 = not present.
namespace spte {
inline constexpr uint64_t kPresent = 1u << 0;       // readable
inline constexpr uint64_t kWritable = 1u << 1;      // writes allowed now
inline constexpr uint64_t kExecutable = 1u << 2;
inline constexpr uint64_t kHostWritable = 1u << 3;  // the host mapping was writable at fault
inline constexpr uint64_t kMmuWritable = 1u << 4;   // may be made writable (only dirty-log WP)
inline constexpr uint64_t kAccessed = 1u << 5;
inline constexpr uint64_t kDirty = 1u << 6;
inline constexpr uint64_t kRefcounted = 1u << 7;    // the pfn had a refcounted struct page
inline constexpr uint64_t kLarge = 1u << 8;         // a 2M or 1G leaf
inline constexpr uint64_t kPfnOverflow = 1u << 9;   // pfn kept in the overflow map
inline constexpr uint64_t kScattered = 1u << 10;    // 2M leaf whose 4K host pages are not
                                                    // contiguous: bits 12..63 point at an
                                                    // array of 512 host page pointers
inline constexpr uint64_t kTable = 1u << 11;        // non-leaf: bits 12..63 point at a table
inline constexpr uint64_t kFlagsMask = 0xfff;
inline constexpr uint64_t kAddrMask = ~kFlagsMask;

constexpr bool is_leaf(uint64_t e) { return (e & kPresent) && !(e & kTable); }
constexpr bool is_writable(uint64_t e) { return is_leaf(e) && (e & kWritable); }
// Write-protected only for dirty logging: the lock-free fast path may make it writable.
constexpr bool is_dirty_log_protected(uint64_t e) {
  return is_leaf(e) && !(e & kWritable) && (e & kHostWritable) && (e & kMmuWritable);
}
// "P|W|X|HW|MW|A|D|RC|L"
std::string to_string(uint64_t e);
}  // namespace spte

// PTE_PREFETCH_NUM: the aligned group of 4K entries the PTE prefetch fills (MmuOptions).
inline constexpr unsigned kPtePrefetchNum = 8;

// Guest address width of the table: 4 levels of 512 entries, 48-bit gpa (x86 4-level EPT).
inline constexpr unsigned kMmuLevels = 4;
inline constexpr uint64_t kMmuMaxGfn = uint64_t{1} << 36;  // exclusive

// ---------------------------------------------------------------------------------------------
// Table layout (not API; here so the vCPU's table-hit path can be inlined into callers).

namespace detail {

inline constexpr unsigned kSptEntries = 512;
inline constexpr unsigned kSptShift = 9;
// 4K pages of one level-2 table's range (1 GiB): the span of one flat level-1 array.
inline constexpr uint64_t kSptRegionPages = uint64_t{1} << (2 * kSptShift);

constexpr unsigned spt_shift(int level) { return kSptShift * static_cast<unsigned>(level - 1); }
constexpr uint64_t spt_pages(int level) { return uint64_t{1} << spt_shift(level); }
constexpr unsigned spt_index(uint64_t gfn, int level) {
  return static_cast<unsigned>((gfn >> spt_shift(level)) & (kSptEntries - 1));
}

// A word that walkers read without the MMU lock. A trivial type accessed only through
// std::atomic_ref, so zero-filled storage from mmap already is a table of empty entries
// (nothing to construct, nothing written, no memory used until an entry is set).
template <class T>
struct SptWord {
  T v;
  T load(std::memory_order o) const { return std::atomic_ref<T>(const_cast<T&>(v)).load(o); }
  void store(T x, std::memory_order o) { std::atomic_ref<T>(v).store(x, o); }
  bool compare_exchange_strong(T& expected, T desired, std::memory_order o) {
    return std::atomic_ref<T>(v).compare_exchange_strong(expected, desired, o);
  }
  bool compare_exchange_weak(T& expected, T desired, std::memory_order o) {
    return std::atomic_ref<T>(v).compare_exchange_weak(expected, desired, o);
  }
};
using SptEntry = SptWord<uint64_t>;
static_assert(std::is_trivial_v<SptEntry> && sizeof(SptEntry) == 8);

// One table node: 512 entries, one 4K page, nothing else. Nodes live in 4 MiB chunks that also
// hold their pfn side data (src/mmu/table.h). The 512 level-1 tables under one level-2 table
// are the consecutive nodes of one chunk, its block: node j is the table of the level-2 entry
// j, so the 4K entries of the whole 1 GiB region are one flat array of kSptRegionPages entries
// indexed by gfn. Invariant: a block node that its level-2 entry does not link (the entry is
// empty or a 2M leaf) holds only zero entries, so a walker may read that array without
// looking at the level-2 entry.
struct alignas(4096) SptNode {
  SptEntry e[kSptEntries];
};
static_assert(sizeof(SptNode) == 4096);

// The 512 host page pointers of a 2M leaf whose host pages are not contiguous (spte::kScattered).
struct alignas(4096) SptScatter {
  std::byte* ptr[kSptEntries] = {};
};
static_assert(sizeof(SptScatter) == 4096);

// The address bits of a leaf whose first 4K page is `gfn` and maps host address `host`.
inline uint64_t spt_encode_leaf(const void* host, uint64_t gfn) {
  return reinterpret_cast<uint64_t>(host) - (gfn << kPageShift);
}
constexpr bool spt_addr_encodable(uint64_t host) { return (host & spte::kFlagsMask) == 0; }

// The host pointer of gfn's 4K page inside leaf e at `level` (gfn anywhere in the leaf).
inline std::byte* spt_leaf_ptr(uint64_t e, int level, uint64_t gfn) {
  if (e & spte::kScattered) {
    // SAFETY: a scattered leaf's address bits point at its SptScatter (kept until a flush
    // after the leaf is gone).
    return reinterpret_cast<SptScatter*>(e & spte::kAddrMask)->ptr[gfn & (spt_pages(level) - 1)];
  }
  // SAFETY: leaf address bits are written only by spt_encode_leaf from host pointers.
  return reinterpret_cast<std::byte*>((e & spte::kAddrMask) + (gfn << kPageShift));
}

inline SptNode* spt_child(uint64_t e) {
  // SAFETY: table entries are written only by the MMU from SptNode pointers | kTable.
  return reinterpret_cast<SptNode*>(e & spte::kAddrMask);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Accesses and exits.

enum class Access : uint8_t { kRead = 1, kWrite = 2, kExec = 4 };
std::string_view to_string(Access access);

// What made Vcpu's access stop, like KVM_RUN's exit reasons. kNone: the access completed.
enum class ExitReason : uint8_t {
  kNone,
  kMmio,               // KVM_EXIT_MMIO: no memslot, or a write to a READONLY slot / RO PFNMAP
  kMemoryFault,        // like KVM_RUN failing with EFAULT: the hva could not be resolved
  kHwpoison,           // SIGBUS BUS_MCEERR_AR: the backing page is poisoned (hva reported)
  kIntr,               // KVM_EXIT_INTR / -EINTR: a signal interrupted the fault-in
  kDirtyRingFull,      // KVM_EXIT_DIRTY_RING_FULL: harvest and reset before running again
  kAsyncPfNotPresent,  // the fault went async: "page not present" with a token
  kAsyncPfHalt,        // a fault on a gfn with outstanding async work: halt, wait for ready
};
std::string_view to_string(ExitReason reason);

struct VcpuExit {
  ExitReason reason = ExitReason::kNone;
  uint64_t bytes_done = 0;  // bytes of the access completed before the exit
  Gpa gpa;                  // the first byte not done
  struct {
    uint32_t len = 0;  // at most 8, and never crossing the page
    bool is_write = false;
    std::array<std::byte, 8> data{};  // write: the bytes the guest stores
  } mmio;
  int error = 0;     // kMemoryFault: EFAULT; kIntr: EINTR
  Hva hva;           // kHwpoison: the poisoned page's hva; kMemoryFault: the hva (or error hva)
  uint32_t token = 0;  // kAsyncPfNotPresent / kAsyncPfHalt: the async PF token (never 0)

  bool ok() const { return reason == ExitReason::kNone; }
};

// ---------------------------------------------------------------------------------------------
// The MMU.

// Counters; each is monotonic. Balance (checked by the tests): every page_fault call ends in
// exactly one of installs, retries, exits, async_queued, async_halts, i.e.
//   faults == installs + retries + exits + async_queued + async_halts
// where fast-path fixes are not page_fault calls (fast_faults counts them).
struct MmuStats {
  uint64_t faults = 0;          // page_fault calls (prefetches included)
  uint64_t fast_faults = 0;     // dirty-log write faults fixed lock-free
  uint64_t nowait_hits = 0;     // resolved by the NOWAIT attempt
  uint64_t slow_faults = 0;     // needed the synchronous interruptible attempt
  uint64_t async_queued = 0;    // went async (not-present delivered)
  uint64_t async_halts = 0;     // repeated fault on a gfn with outstanding async work
  uint64_t retries = 0;         // RET_PF_RETRY: invalidation race or INVALID slot
  uint64_t exits = 0;           // ended in an exit (MMIO, EFAULT, hwpoison, intr)
  uint64_t installs = 0;        // leaves installed (4K + 2M + 1G)
  uint64_t installs_2m = 0;
  uint64_t installs_1g = 0;
  uint64_t prefetches = 0;      // page-ready re-runs
  uint64_t pte_prefetches = 0;  // 4K leaves installed by the PTE prefetch (not in installs)
  uint64_t zapped = 0;          // leaves zapped (any size)
  uint64_t write_protected = 0;  // leaves write-protected for dirty logging
  uint64_t splits = 0;          // huge leaves split into 4K leaves
  uint64_t tlb_flushes = 0;
  uint64_t invalidations = 0;   // invalidate_range_start calls that found a memslot
  uint64_t tables = 0;          // tables currently allocated
};

struct MmuOptions {
  // Largest leaf the MMU may install (the host and the slot may allow less).
  PgLevel max_level = PgLevel::k1G;
  // Dirty bitmaps / rings. Optional: without it dirty logging still write-protects, but
  // nothing records the dirty pages. Must outlive the Mmu.
  DirtyLog* dirty = nullptr;
  // Async page faults: the worker pool the vCPUs' queues use. Optional: without it NEEDS_IO
  // always goes the synchronous way. Must outlive the Mmu.
  AsyncPfWorkerPool* async_pf_pool = nullptr;
  // PTE prefetch (KVM's direct_pte_prefetch): after a fault installs a 4K leaf, the not-present
  // neighbours in its aligned group of kPtePrefetchNum entries are filled from pages the host
  // already has (prefetch_pages: fast-only write lookups, never I/O, never sleeps), without the
  // accessed and dirty bits. Skipped while an invalidation is in progress and for slots that
  // log dirty pages or are read-only, as in KVM. Off by default: it maps pages before the guest
  // touches them, which changes table contents and counters that callers may look at.
  bool pte_prefetch = false;
  // Test hook: runs in page_fault after the pfn is resolved and before the MMU lock is taken
  // (the window in which an invalidation can race the fault). Never on hot paths in production.
  std::function<void(Gfn)> after_faultin_hook;
};

// Outcome of one page_fault (RET_PF_*), with the exit it produced, if any.
enum class FaultResult : uint8_t { kFixed, kRetry, kExit, kAsync, kSpurious };
std::string_view to_string(FaultResult result);

// Lock order (outermost first); debug builds assert the MMU lock is not taken recursively:
//   1. Memslots' slots lock (set_memory_region; listener callbacks run under it)
//   2. the memslots read lock (SRCU: never blocks, may be held across everything below)
//   3. Mmu::mmu_lock_ (installs, zaps, write protection, aging, vCPU registration)
//   4. HostMm's own locks (page ops: put_page / set_page_dirty / host_mapping_level /
//      page_address are called under mmu_lock_; the host must not hold them while calling
//      notifiers) and DirtyLog's locks (mark dirty under mmu_lock_ or lock-free)
// MmuNotifier callbacks run with the host's mapping lock held by the caller (mmap_lock) and
// take 3; Mmu never calls into the host's mapping-changing operations.
//
// Concurrency contract: table walks (Vcpu accesses) are lock-free. After
// invalidate_range_start returns, no leaf for the range exists and no vCPU is still using a
// translation read before it (the "TLB flush" waits for vCPU accesses in flight). A fault whose
// sequence snapshot predates an overlapping invalidation never installs.
class Mmu final : public MmuNotifier, public MemslotListener, public DirtyWriteProtector {
 public:
  // Registers itself as slots' listener and mm's notifier (unregistered in the destructor).
  Mmu(Memslots& slots, HostMm& mm, MmuOptions options = {});
  ~Mmu() override;
  Mmu(const Mmu&) = delete;
  Mmu& operator=(const Mmu&) = delete;

  Memslots& memslots() { return slots_; }
  HostMm& host() { return mm_; }
  DirtyLog* dirty() { return options_.dirty; }

  // The fault handler (spec 8.3, 9): snapshot the invalidation sequence, faultin_pfn with
  // NOWAIT, async or synchronous retry, retry check under the lock, install, release.
  // `prefetch`: a page-ready re-run (never goes async, never exits for NEEDS_IO).
  // On kExit, *exit holds the exit; on kAsync, exit->token the token.
  FaultResult page_fault(Vcpu& vcpu, Gpa gpa, Access access, bool prefetch, VcpuExit* exit);

  // ---- MmuNotifier (spec 8.2): registered with the HostMm.
  void invalidate_range_start(Hva start, Hva end) override;
  void invalidate_range_end(Hva start, Hva end) override;
  bool clear_flush_young(Hva start, Hva end) override;
  bool clear_young(Hva start, Hva end) override;
  bool test_young(Hva start, Hva end) override;
  void release() override;

  // ---- MemslotListener (spec 7.4).
  Result<void> prepare_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                     MemslotChange change) override;
  void flush_shadow_memslot(const Memslot& slot) override;
  void commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                            MemslotChange change) override;

  // ---- DirtyWriteProtector (the dirty layer calls it after harvesting; the Mmu registers
  // itself with options.dirty). write_protect clears the writable bit of the leaves of
  // base + i for every set bit i of mask (kvm_arch_mmu_enable_log_dirty_pt_masked), splitting
  // huge leaves first. begin_batch/end_batch take and drop the MMU lock; flush_remote_tlbs
  // flushes when something was write-protected.
  void write_protect(const Memslot& slot, Gfn base, uint64_t mask) override;
  void flush_remote_tlbs(const Memslot& slot) override;
  void begin_batch() override;
  void end_batch() override;
  // Write-protects a whole slot and splits its huge leaves (dirty logging turned on).
  uint64_t write_protect_slot(const Memslot& slot);
  // Records a write to gfn by the vCPU (or, vcpu == nullptr, by the VMM through gfnmap) in the
  // dirty log. Returns true when it left the vCPU's ring soft-full.
  bool mark_page_dirty(Vcpu* vcpu, const Memslot& slot, Gfn gfn);

  // ---- Invalidation state (mmu_invalidate_*), for tests and tools.
  uint64_t invalidate_seq() const { return invalidate_seq_.load(std::memory_order_acquire); }
  long invalidate_in_progress() const;
  // [start, end) of the tracked gfn range; {kInvalid, kInvalid} when unset.
  std::pair<uint64_t, uint64_t> invalidate_range() const;
  static constexpr uint64_t kInvalidGfn = ~uint64_t{0};
  // mmu_invalidate_retry_gfn(seq, gfn), taking the MMU lock.
  bool invalidate_retry_gfn(uint64_t seq, Gfn gfn) const;

  // ---- Table introspection (lock-free walks; tests and tools).
  struct Leaf {
    uint64_t spte = 0;  // 0 when no leaf maps gfn
    PgLevel level = PgLevel::k4K;
    Pfn pfn;                      // of gfn's 4K page
    std::byte* host_ptr = nullptr;  // of gfn's 4K page
  };
  Leaf lookup(unsigned as_id, Gfn gfn) const;
  // Number of 4K pages mapped in [start, end) (a huge leaf counts its pages in the range).
  uint64_t count_mapped(unsigned as_id, Gfn start, Gfn end) const;
  // Zaps everything (kvm_mmu_zap_all) and flushes.
  void zap_all();
  // Bytes of table metadata currently allocated (entries + pfn side arrays + bookkeeping).
  uint64_t metadata_bytes() const;
  MmuStats stats() const;

  // ---- VMM accesses (kvm_read_guest / kvm_write_guest): through the table like a vCPU with
  // id kVmmVcpuId, serialised; writes are logged in the dirty bitmap (never a ring).
  VcpuExit read_guest(Gpa gpa, std::span<std::byte> out, unsigned as_id = 0);
  VcpuExit write_guest(Gpa gpa, std::span<const std::byte> data, unsigned as_id = 0);
  static constexpr uint32_t kVmmVcpuId = ~uint32_t{0};

  struct Impl;

 private:
  friend class Vcpu;
  void register_vcpu(Vcpu* vcpu);
  void unregister_vcpu(Vcpu* vcpu);

  Memslots& slots_;
  HostMm& mm_;
  MmuOptions options_;
  std::unique_ptr<Impl> impl_;
  std::atomic<uint64_t> invalidate_seq_{0};
};

// ---------------------------------------------------------------------------------------------
// A software vCPU: accesses guest memory through the Mmu's table (lock-free on a hit), faults
// on a miss, and stops with a KVM_RUN-like exit when an access cannot complete.
//
// One thread uses a Vcpu at a time (like a vCPU fd). The Vcpu must be destroyed before its Mmu.

struct VcpuOptions {
  unsigned as_id = 0;
  // kvm_can_do_async_pf: NEEDS_IO may go async (needs Mmu's AsyncPf). Otherwise the fault
  // retries synchronously with FOLL_INTERRUPTIBLE.
  bool async_pf = false;
  // How often an access re-runs a fault that returned kRetry before giving up with kIntr
  // (a guest would spin forever; a library user wants control back). 0 = no limit.
  uint32_t max_retries = 0;
};

class Vcpu {
 public:
  Vcpu(Mmu& mmu, uint32_t id, VcpuOptions options = {});
  ~Vcpu();
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;

  uint32_t id() const { return id_; }
  unsigned as_id() const { return options_.as_id; }
  Mmu& mmu() { return mmu_; }
  const VcpuOptions& options() const { return options_; }
  VcpuMemslotCache& memslot_cache() { return memslot_cache_; }

  // gpa -> host pointer for an access of `access` kind, faulting in as needed. On success
  // t.host_ptr points at gpa's byte; it stays valid only until the next invalidation.
  struct Translation {
    VcpuExit exit;
    std::byte* host_ptr = nullptr;
    Pfn pfn;
    PgLevel level = PgLevel::k4K;
    uint64_t spte = 0;
  };
  Translation translate(Gpa gpa, Access access);
  // kvm_mmu_do_page_fault for one gpa, without accessing it (tools and tests).
  FaultResult fault(Gpa gpa, Access access, VcpuExit* exit);

  // Byte ranges crossing pages and slots. Stops at the first byte that cannot be accessed and
  // reports it in the exit (bytes_done tells how far it got).
  VcpuExit read(Gpa gpa, std::span<std::byte> out);
  VcpuExit write(Gpa gpa, std::span<const std::byte> data);
  // Fixed-size helpers for workloads: one 8-byte access (any alignment, may cross a page).
  VcpuExit read_u64(Gpa gpa, uint64_t* value);
  VcpuExit write_u64(Gpa gpa, uint64_t value);
  // The inline table-hit path: true when the access was done through an existing entry with
  // the needed permission (and accessed/dirty bits already set); false means "nothing done,
  // use read_u64/write_u64" (which fault or exit). Never faults, never blocks, no exit.
  [[gnu::always_inline]] bool try_read_u64(Gpa gpa, uint64_t* value) {
    return fast_u64<false>(gpa, value);
  }
  [[gnu::always_inline]] bool try_write_u64(Gpa gpa, uint64_t value) {
    return fast_u64<true>(gpa, &value);
  }

  // KVM's IN_GUEST_MODE for long runs of accesses (below): a table hit without a window per access.
  class GuestMode;

  // Async PF: completed work -> re-run each fault as a prefetch, return "page ready" events
  // (kvm_check_async_pf_completion). Not-present events come as exits.
  std::vector<AsyncPfEvent> check_async_pf_completion();
  // Blocks until at least one async PF of this vCPU completed, or timeout_ms passed (< 0:
  // forever). Returns whether one completed. False at once without an async queue.
  bool wait_async_pf(long timeout_ms = -1);
  AsyncPfQueue* async_pf_queue() { return apf_.get(); }
  // This vCPU's dirty ring (nullptr when the Mmu has no DirtyLog or rings are off).
  DirtyRing* dirty_ring() const { return ring_; }

  // The fault-side counters of this vCPU (same meaning as MmuStats).
  struct Stats {
    uint64_t accesses = 0;  // page pieces done by read/write (try_*_u64 hits not counted)
    uint64_t faults = 0;
    uint64_t fast_faults = 0;
    uint64_t retries = 0;
    uint64_t async = 0;
  };
  const Stats& stats() const { return stats_; }

 private:
  friend class Mmu;
  friend struct Mmu::Impl;
  // Runs fn(host_ptr, offset, n) on each page piece of [gpa, gpa + len) inside an access
  // window; src is the written data (for MMIO exits), nullptr for reads.
  template <class Fn>
  VcpuExit access_range(Gpa gpa, uint64_t len, bool write, const std::byte* src, Fn&& fn);
  VcpuExit handle_miss(Gpa gpa, bool write, uint64_t spte, uint64_t len_left,
                       const std::byte* src, uint32_t* tries, bool* again);
  // The table-hit path of read_u64/write_u64: true when the access was done. fast_u64 is the
  // common case inline (an aligned access in the cached region, a 4K leaf with the needed bits);
  // everything else (refilling the cache, huge and scattered leaves) is fast_u64_full.
  template <bool kWrite>
  [[gnu::always_inline]] inline bool fast_u64(Gpa gpa, uint64_t* value);
  template <bool kWrite>
  [[gnu::noinline]] bool fast_u64_full(Gpa gpa, uint64_t* value);
  // The access window ("in guest mode"): access_seq_ is odd from before a table entry is read
  // until the last use of the pointer it gave. Entering is ordered before the entry's load by a
  // full fence, or, when flushes use membarrier as their IPI, by a compiler barrier alone.
  [[gnu::always_inline]] inline uint64_t enter_access_window();
  [[gnu::always_inline]] inline void leave_access_window(uint64_t s) {
    access_seq_.store(s + 2, std::memory_order_release);
  }
  // A flush's kick of this vCPU's GuestMode, if one lives (the vCPU is in a window).
  void kick_guest_mode();

  Mmu& mmu_;
  uint32_t id_;
  VcpuOptions options_;
  VcpuMemslotCache memslot_cache_;
  Stats stats_;
  // Odd while the vCPU is between reading a table entry and finishing the access that uses it
  // ("in guest mode"); the TLB flush waits for it to move on.
  std::atomic<uint64_t> access_seq_{0};
  // The flush's "IPI" to a GuestMode of this vCPU: the address of its cache base, which a flush
  // that finds this vCPU in a window overwrites with GuestMode::kKicked (set while a GuestMode
  // lives). kicking_ is 1 while a flush writes through it; the GuestMode's destructor clears
  // guest_kick_ and then waits for kicking_ to be 0 (both seq_cst: either the flush sees null
  // or the destructor sees the flush), so a kick never lands in a destroyed GuestMode.
  std::atomic<std::atomic<uint64_t>*> guest_kick_{nullptr};
  std::atomic<uint32_t> kicking_{0};
  // The thread whose GuestMode holds this vCPU's window (debug builds assert that a flush never
  // comes from it: it would wait for itself).
  std::atomic<std::thread::id> guest_thread_{};
  detail::SptNode* root_ = nullptr;  // the table of as_id
  // Paging-structure cache of the per-access path: the flat level-1 entries and the level-2
  // table of the 1 GiB region that starts at gfn l1_base_, valid while the Mmu's table epoch
  // (bumped whenever a table of level 2 or more is retired) equals l1_epoch_. l1_base_ =
  // kNoBase: none.
  static constexpr uint64_t kNoBase = uint64_t{1} << 63;
  const std::atomic<uint64_t>* table_epoch_ = nullptr;
  uint64_t l1_base_ = kNoBase;
  uint64_t l1_epoch_ = 0;
  detail::SptEntry* l1_ = nullptr;
  detail::SptNode* l2_node_ = nullptr;
  DirtyRing* ring_ = nullptr;
  bool ring_full_ = false;  // ring_ was soft-full when last checked (only this vCPU pushes)
  struct ApfClient;
  std::unique_ptr<ApfClient> apf_client_;
  std::unique_ptr<AsyncPfQueue> apf_;
};

// ---------------------------------------------------------------------------------------------
// Implementation details of the inline table-hit path.

namespace detail {

struct SptWalk {
  uint64_t e = 0;  // the entry where the walk stopped (a leaf, or 0)
  int level = 1;
  SptNode* node = nullptr;
  unsigned idx = 0;
};

// Lock-free walk from root. Callers that use the result for an access must be inside their
// access window so a flush can wait for them. Unrolled: every level has its own well-predicted
// branch (a loop's data-dependent exit mispredicts and serialises the accesses that follow).
inline SptWalk spt_walk(SptNode* root, uint64_t gfn) {
  static_assert(kMmuLevels == 4);
  SptNode* n = root;
  unsigned i = spt_index(gfn, 4);
  uint64_t e = n->e[i].load(std::memory_order_acquire);
  if (__builtin_expect(!(e & spte::kTable), 0)) return {e, 4, n, i};
  n = spt_child(e);
  i = spt_index(gfn, 3);
  e = n->e[i].load(std::memory_order_acquire);
  if (__builtin_expect(!(e & spte::kTable), 0)) return {e, 3, n, i};
  n = spt_child(e);
  i = spt_index(gfn, 2);
  e = n->e[i].load(std::memory_order_acquire);
  if (__builtin_expect(!(e & spte::kTable), 0)) return {e, 2, n, i};
  n = spt_child(e);
  i = spt_index(gfn, 1);
  return {n->e[i].load(std::memory_order_acquire), 1, n, i};
}

// What a 4K leaf needs for an inline hit. The entries of the flat level-1 array are zero or 4K
// leaves (never tables, never scattered), and every bit of a leaf implies kPresent, so a read
// needs only the accessed bit and a write the writable, accessed and dirty bits.
template <bool kWrite>
constexpr uint64_t kHitBits =
    kWrite ? (spte::kWritable | spte::kAccessed | spte::kDirty) : spte::kAccessed;

// True when a gpa's 8-byte access may take an inline hit: naturally aligned (it cannot cross a
// page). Unaligned accesses inside a page go to the out-of-line path, which does them too.
constexpr bool hit_aligned(uint64_t gpa) { return (gpa & (sizeof(uint64_t) - 1)) == 0; }

template <bool kWrite>
[[gnu::always_inline]] inline void hit_access(uint64_t e, uint64_t gpa, uint64_t* value) {
  // SAFETY: e is a 4K leaf (kHitBits), whose address bits are host minus guest address.
  std::byte* p = reinterpret_cast<std::byte*>((e & spte::kAddrMask) + gpa);
  if constexpr (kWrite) {
    std::memcpy(p, value, sizeof(uint64_t));
  } else {
    std::memcpy(value, p, sizeof(uint64_t));
  }
}

// True when the process could register for MEMBARRIER_CMD_PRIVATE_EXPEDITED: flushes then
// use membarrier as their "IPI" and vCPU accesses need only a compiler barrier; otherwise
// vCPUs pay a full fence when entering an access window.
bool membarrier_available();
extern bool g_vcpu_needs_fence;

// A full memory barrier. ThreadSanitizer does not support standalone fences; a seq_cst
// read-modify-write is a full barrier on x86 (a locked instruction) and is what TSan sees.
inline void full_fence() {
#if defined(__SANITIZE_THREAD__)
  static std::atomic<unsigned> fence_word{0};
  fence_word.fetch_add(0, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace detail

// The odd store is a release (a plain store on x86): what the vCPU stored before, such as
// GuestMode's reset of its cache base, is seen by a flush that sees the window open.
inline uint64_t Vcpu::enter_access_window() {
  const uint64_t s = access_seq_.load(std::memory_order_relaxed);
  access_seq_.store(s + 1, std::memory_order_release);
  if (detail::g_vcpu_needs_fence) {
    detail::full_fence();
  } else {
    std::atomic_signal_fence(std::memory_order_seq_cst);
  }
  return s;
}

// Always inlined and kept to the common case: on random accesses the hit path is bound by how
// many accesses the CPU keeps in flight, and every instruction, load and branch of the rarer
// cases costs more there than in isolation. The index is taken before the window: l1_base_
// and l1_ are this vCPU's own fields; only the entry load needs the window and the epoch.
template <bool kWrite>
[[gnu::always_inline]] inline bool Vcpu::fast_u64(Gpa gpa, uint64_t* value) {
  const uint64_t idx = (gpa.value >> kPageShift) - l1_base_;
  if (__builtin_expect(detail::hit_aligned(gpa.value) && idx < detail::kSptRegionPages &&
                           !ring_full_ && (!kWrite || id_ != Mmu::kVmmVcpuId), 1)) {
    const uint64_t s = enter_access_window();
    bool hit = false;
    if (__builtin_expect(table_epoch_->load(std::memory_order_relaxed) == l1_epoch_, 1)) {
      const uint64_t e = l1_[idx].load(std::memory_order_acquire);
      if (__builtin_expect((e & detail::kHitBits<kWrite>) == detail::kHitBits<kWrite>, 1)) {
        detail::hit_access<kWrite>(e, gpa.value, value);
        hit = true;
      }
    }
    leave_access_window(s);
    if (__builtin_expect(hit, 1)) return true;
  }
  return fast_u64_full<kWrite>(gpa, value);
}

// ---------------------------------------------------------------------------------------------
// KVM's IN_GUEST_MODE for a software vCPU thread. While a GuestMode lives, its vCPU stays inside
// one access window, so a table hit is one entry load and the access: no window per access and
// no table-epoch check (the region cache is dropped whenever the window is re-entered, and a
// retired table is freed only after every window open at the flush ended). A flush that finds
// the vCPU in guest mode kicks it (overwrites the GuestMode's cache base) and waits until the
// window ends; the next access made through the GuestMode ends it and enters a new one. So:
//  - hold a GuestMode only around a loop of accesses: while its thread blocks or computes
//    without accessing, every flush (invalidation, memslot change, dirty-log harvest) waits;
//  - while it lives, do not use its Vcpu directly, nor change host memory or memslots from its
//    thread (a flush would wait for that thread itself). read_u64/write_u64 below leave guest
//    mode around the faulting path and stay outside after an exit; for anything else, destroy
//    the GuestMode first unless its last access returned an exit.
// At most one GuestMode per Vcpu at a time, on the vCPU's thread.
class Vcpu::GuestMode {
 public:
  friend class Vcpu;  // the kick
  explicit GuestMode(Vcpu& vcpu);
  ~GuestMode();
  GuestMode(const GuestMode&) = delete;
  GuestMode& operator=(const GuestMode&) = delete;

  // As Vcpu::try_read_u64/try_write_u64: true when the access was done through an existing
  // entry; false means nothing was done. Never faults, never blocks.
  [[gnu::always_inline]] bool try_read_u64(Gpa gpa, uint64_t* value) {
    return hit<false>(gpa, value);
  }
  [[gnu::always_inline]] bool try_write_u64(Gpa gpa, uint64_t value) {
    return hit<true>(gpa, &value);
  }
  // As Vcpu::read_u64/write_u64 (fault in, or exit): outside guest mode on a miss. After an
  // exit the GuestMode stays outside until its next access, so the exit can be handled from
  // this thread (wait for async page faults, harvest and reset the dirty ring) while it lives.
  VcpuExit read_u64(Gpa gpa, uint64_t* value);
  VcpuExit write_u64(Gpa gpa, uint64_t value);

 private:
  // Cache bases that no gfn (< 2^52) is within kSptRegionPages of: nothing cached (also while
  // outside the window or while the dirty ring is full), and the flush's kick.
  static constexpr uint64_t kNoBase = uint64_t{1} << 63;
  static constexpr uint64_t kKicked = kNoBase | (uint64_t{1} << 62);

  template <bool kWrite>
  [[gnu::always_inline]] inline bool hit(Gpa gpa, uint64_t* value);
  // Everything the inline hit leaves out: a kick, refilling the region cache, unaligned
  // accesses, huge and scattered leaves, entries without the accessed/dirty bits set.
  template <bool kWrite>
  [[gnu::noinline]] bool hit_full(Gpa gpa, uint64_t* value);
  void enter();
  void leave();

  // The two words every hit reads come first. base_ is the first gfn of the cached 1 GiB region
  // (changed by this thread only by compare-and-swap, so a kick is never overwritten while the
  // window is open); l1_ is that region's flat level-1 array.
  std::atomic<uint64_t> base_{kNoBase};
  const detail::SptEntry* l1_ = nullptr;
  detail::SptNode* l2_ = nullptr;  // the region's level-2 table (huge leaves)
  Vcpu& vcpu_;
  uint64_t seq_ = 0;        // the vCPU's access_seq_ before entering
  bool inside_ = false;     // in the window (base_ never matches while outside)
  bool ring_full_ = false;  // the dirty ring was soft-full at entry: no hit until re-entry
  bool writes_ = false;     // write hits allowed (not the VMM's vCPU: its writes are logged)
};

// One load for the entry, one for the data; the checks are on values in registers or L1 (see
// Vcpu::fast_u64 on why the common case is all there is). A kick is seen as a base mismatch.
template <bool kWrite>
[[gnu::always_inline]] inline bool Vcpu::GuestMode::hit(Gpa gpa, uint64_t* value) {
  const uint64_t idx = (gpa.value >> kPageShift) - base_.load(std::memory_order_relaxed);
  if (__builtin_expect(detail::hit_aligned(gpa.value) && idx < detail::kSptRegionPages &&
                           (!kWrite || writes_), 1)) {
    const uint64_t e = l1_[idx].load(std::memory_order_acquire);
    if (__builtin_expect((e & detail::kHitBits<kWrite>) == detail::kHitBits<kWrite>, 1)) {
      detail::hit_access<kWrite>(e, gpa.value, value);
      return true;
    }
  }
  return hit_full<kWrite>(gpa, value);
}

}  // namespace gfnmap
