// gfnmap dirty logging (spec 7.5): per-slot dirty bitmaps (GET/CLEAR_DIRTY_LOG, manual protect,
// initially-set) and per-vCPU dirty rings (push, soft-full, harvest, KVM_RESET_DIRTY_RINGS).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// The write-protect step belongs to the MMU (kvm_arch_mmu_enable_log_dirty_pt_masked). The MMU
// implements this interface and hands it to DirtyLog; dirty/ never includes mmu/.
//
// Calls come from the thread running get_dirty_log / clear_dirty_log / reset_dirty_rings, never
// while DirtyLog holds a lock the MMU could need, and always inside one begin_batch/end_batch
// pair (KVM_MMU_LOCK ... KVM_MMU_UNLOCK), so the MMU may take its lock once per batch.
class DirtyWriteProtector {
 public:
  virtual ~DirtyWriteProtector() = default;
  // Write-protect again (or clear the D bit of) gfn base + i for every set bit i of `mask`.
  // `base` is absolute (slot.base_gfn + offset) and every such gfn lies inside `slot`; for
  // bitmaps base is slot.base_gfn + a multiple of 64, for rings it may be any gfn of the slot.
  // mask != 0.
  virtual void write_protect(const Memslot& slot, Gfn base, uint64_t mask) = 0;
  // kvm_flush_remote_tlbs_memslot: once per slot and call, after its write_protect calls, when
  // at least one bit was reported.
  virtual void flush_remote_tlbs(const Memslot& slot);
  virtual void begin_batch();
  virtual void end_batch();
};

// ---------------------------------------------------------------------------------------------
// Capabilities and ABI constants.

// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) argument bits.
inline constexpr uint64_t kDirtyLogManualProtectEnable = 1u << 0;  // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
inline constexpr uint64_t kDirtyLogInitiallySet = 1u << 1;         // KVM_DIRTY_LOG_INITIALLY_SET
inline constexpr uint64_t kDirtyLogManualCaps =
    kDirtyLogManualProtectEnable | kDirtyLogInitiallySet;

// struct kvm_dirty_gfn: one ring entry, 16 bytes, as mmapped by the VMM in KVM. `slot` is
// as_id << 16 | id, `offset` is gfn - slot.base_gfn. The producer (the vCPU) fills slot and
// offset, then publishes with flags = kDirtyGfnDirty (release); the harvester reads them after
// seeing kDirtyGfnDirty (acquire) and stores kDirtyGfnReset (release); reset_dirty_rings
// clears flags to 0.
inline constexpr uint32_t kDirtyGfnDirty = 1u << 0;  // KVM_DIRTY_GFN_F_DIRTY
inline constexpr uint32_t kDirtyGfnReset = 1u << 1;  // KVM_DIRTY_GFN_F_RESET
struct DirtyGfn {
  std::atomic<uint32_t> flags{0};
  uint32_t slot = 0;
  uint64_t offset = 0;
};
static_assert(sizeof(DirtyGfn) == 16, "struct kvm_dirty_gfn is 16 bytes");

inline constexpr uint32_t kDirtyRingRsvdEntries = 64;     // KVM_DIRTY_RING_RSVD_ENTRIES
inline constexpr uint32_t kDirtyRingMaxEntries = 65536;   // KVM_DIRTY_RING_MAX_ENTRIES

constexpr uint32_t dirty_log_slot(uint16_t as_id, uint16_t id) {
  return (uint32_t{as_id} << 16) | id;
}

// ---------------------------------------------------------------------------------------------
// One vCPU's dirty ring (kvm_dirty_ring + the VMM's mmapped view of it).
//
// Threads: push() and soft_full() from the owning vCPU's thread only (one producer); harvest()
// from one VMM thread at a time; DirtyLog::reset_dirty_rings() from any thread (serialised
// internally). Entries are published and consumed through DirtyGfn::flags as described above.
class DirtyRing {
 public:
  // nr_entries that is not a power of two is rounded down to one (0 gives a ring that drops
  // every push); DirtyLog::create_vcpu always passes a checked size.
  DirtyRing(uint32_t vcpu_id, uint32_t nr_entries, uint32_t reserved_entries);
  DirtyRing(const DirtyRing&) = delete;
  DirtyRing& operator=(const DirtyRing&) = delete;

  uint32_t vcpu_id() const { return vcpu_id_; }
  uint32_t size() const { return size_; }              // entries, a power of two
  uint32_t soft_limit() const { return soft_limit_; }  // size - reserved entries
  // dirty_index - reset_index: entries pushed and not yet reset.
  uint32_t used() const;
  // used() >= soft_limit(): the vCPU must exit with KVM_EXIT_DIRTY_RING_FULL and may not
  // re-enter until reset_dirty_rings() brought it below the limit.
  bool soft_full() const { return used() >= soft_limit_; }

  // kvm_dirty_ring_push. Returns false (entry dropped, counted in dropped()) only when the ring
  // is completely full, which a vCPU that honours soft_full() never reaches.
  bool push(uint32_t slot, uint64_t offset);

  // The VMM side: walks entries from the harvest index while they carry kDirtyGfnDirty, calls
  // fn(slot, offset) for each in push order, marks it kDirtyGfnReset, and returns the count.
  size_t harvest(FunctionRef<void(uint32_t slot, uint64_t offset)> fn);
  // The raw entries (the mmapped page array of KVM_DIRTY_LOG_PAGE_OFFSET), for VMMs that
  // harvest themselves; do not mix with harvest() on the same ring.
  std::span<DirtyGfn> entries() { return {entries_.get(), size_}; }

  uint64_t pushed() const { return pushed_.load(std::memory_order_relaxed); }
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  friend class DirtyLog;
  uint32_t vcpu_id_;
  uint32_t size_;
  uint32_t soft_limit_;
  std::unique_ptr<DirtyGfn[]> entries_;
  std::atomic<uint32_t> dirty_index_{0};  // written by the vCPU
  std::atomic<uint32_t> reset_index_{0};  // written by reset_dirty_rings
  uint32_t harvest_index_ = 0;            // the VMM's fetch index
  std::atomic<uint64_t> pushed_{0};
  std::atomic<uint64_t> dropped_{0};
};

// ---------------------------------------------------------------------------------------------
// A (gpa, length) view of a bitmap: maximal runs of set bits, in gpa order.
struct DirtyRange {
  Gpa gpa;
  uint64_t length = 0;  // bytes, a multiple of kPageSize
  friend bool operator==(const DirtyRange&, const DirtyRange&) = default;
};
// Bit i of `bitmap` (word i / 64, bit i % 64) is page base_gfn + i; bits at or above npages
// are ignored.
std::vector<DirtyRange> dirty_bitmap_to_ranges(Gfn base_gfn, std::span<const uint64_t> bitmap,
                                               uint64_t npages);

// Words needed for a bitmap of npages (ALIGN(npages, 64) / 64).
constexpr uint64_t dirty_bitmap_words(uint64_t npages) { return (npages + 63) / 64; }

struct DirtyLogConfig {
  // Arch extra entries kept free in every ring besides the 64 reserved ones (x86 with PML:
  // 512; here 0 unless a test needs it).
  uint32_t ring_arch_reserved_entries = 0;
};

// The VM's dirty-log state: bitmaps keyed by (as_id, slot id), kept in step with memslot
// changes through MemslotListener (spec 7.4 "prepare": dropped when logging turns off, reused
// when it stays on, fresh when it turns on; all ones with manual protect + initially set), and
// the per-vCPU rings.
//
// Threads: mark_page_dirty_in_slot is lock-free and may run on any number of threads
// concurrently with everything else; callers hold a MemslotsReadLock and pass a slot of the set
// that lock shows (as KVM's callers hold kvm->srcu): a bitmap is freed only after the memslot
// swap that stops its slot logging has waited out such readers. The ioctls
// may run concurrently with marks and with each other. Register DirtyLog with Memslots before
// any slot logs dirty pages and before the MMU's listener, so a slot's bitmap exists before
// the MMU write-protects it.
class DirtyLog final : public MemslotListener {
 public:
  // Registers itself as a listener of `memslots`; the destructor unregisters.
  explicit DirtyLog(Memslots& memslots, DirtyLogConfig config = {});
  ~DirtyLog() override;
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  // The MMU's write-protect hook; nullptr (the default) skips the step. Set before use.
  void set_write_protector(DirtyWriteProtector* protector);

  // KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags): EINVAL for unknown bits and for
  // kDirtyLogInitiallySet without kDirtyLogManualProtectEnable; may be changed at any time (0
  // turns it off).
  Result<void> enable_manual_dirty_log_protect(uint64_t flags);
  bool manual_protect() const;  // any kDirtyLogManualCaps bit set
  bool initially_set() const;   // kDirtyLogInitiallySet set: new bitmaps start all ones

  // KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, size_bytes): EINVAL unless size is a power of two,
  // >= kPageSize and >= the reserved area ((64 + arch) * 16 bytes); E2BIG above 65536 entries;
  // EINVAL when already enabled or once a vCPU exists.
  Result<void> enable_dirty_ring(uint32_t size_bytes);
  // KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: keep bitmaps beside the ring (for writes without a
  // vCPU). EINVAL unless the ring is enabled and every address space has no slots.
  Result<void> enable_dirty_ring_with_bitmap();
  uint32_t dirty_ring_size_bytes() const;  // 0 when no ring
  bool uses_bitmaps() const;               // kvm_use_dirty_bitmap

  // kvm_vm_ioctl_create_vcpu's share: after this no ring can be enabled. Returns the vCPU's
  // ring (owned by DirtyLog, stable address) or nullptr when rings are off. EEXIST when the id
  // was already created.
  Result<DirtyRing*> create_vcpu(uint32_t vcpu_id);
  DirtyRing* vcpu_ring(uint32_t vcpu_id) const;  // nullptr when none

  // mark_page_dirty_in_slot: no-op unless slot.logs_dirty() and slot.contains(gfn). With a
  // ring and a vCPU ring given, pushes (as_id << 16 | id, gfn - base_gfn); else sets the bit
  // (atomic; a write without a vCPU in ring-only mode is dropped, as KVM does after a WARN).
  // Returns true when this push left the ring soft-full (KVM_REQ_DIRTY_RING_SOFT_FULL).
  bool mark_page_dirty_in_slot(const Memslot& slot, Gfn gfn, DirtyRing* vcpu_ring = nullptr);

  // KVM_GET_DIRTY_LOG. `slot` = as_id << 16 | id; `bitmap` receives dirty_bitmap_words(npages)
  // words (bit i = page base_gfn + i; the rest of the span is left alone). Errors: ENXIO
  // ring-only; EINVAL bad as_id or id >= nr_user_slots; ENOENT slot absent or not logging;
  // EFAULT span too small (checked before anything is cleared). Without manual protect each
  // word is fetched-and-cleared atomically and its bits write-protected again; with it the
  // bitmap is copied and nothing changes. Returns the number of dirty pages reported.
  Result<uint64_t> get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap);

  // KVM_CLEAR_DIRTY_LOG. Bit i of `bitmap` is page first_page + i. Errors: ENXIO, EINVAL (as_id
  // or id), EINVAL first_page % 64, ENOENT, EINVAL first_page > npages, num_pages > npages -
  // first_page, num_pages % 64 unless first_page + num_pages == npages; EFAULT span shorter
  // than dirty_bitmap_words(num_pages). Clears exactly mask & old per word (atomic and-not),
  // write-protects those pages again; user bits beyond the slot are ignored. Returns the
  // number of pages cleared.
  Result<uint64_t> clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                                   std::span<const uint64_t> bitmap);

  // KVM_RESET_DIRTY_RINGS: EINVAL without a ring. For every vCPU ring, from its reset index
  // while entries carry kDirtyGfnReset: clear them, re-protect their gfns (batched per slot
  // within a 64-gfn window; entries of absent slots or beyond npages are skipped). Returns
  // the number of entries reset.
  Result<uint64_t> reset_dirty_rings();

  // MemslotListener: bitmap allocation (spec 7.4 prepare) and release (commit).
  Result<void> prepare_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                     MemslotChange change) override;
  void commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                            MemslotChange change) override;

  // Bytes of bitmap memory currently allocated (8 per 64 guest pages), for metrics.
  uint64_t bitmap_bytes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace gfnmap
