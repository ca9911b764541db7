// gfnmap memslots: address spaces of guest-physical -> host-virtual slots, changed with
// KVM_SET_USER_MEMORY_REGION's checks and errnos, read lock-free through immutable snapshots.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "gfnmap/types.h"

namespace gfnmap {

// User flags (bits 0..15) and the internal INVALID flag (spec 1, 7.1).
inline constexpr uint32_t kMemLogDirtyPages = 1u << 0;  // KVM_MEM_LOG_DIRTY_PAGES
inline constexpr uint32_t kMemReadonly = 1u << 1;       // KVM_MEM_READONLY
inline constexpr uint32_t kMemGuestMemfd = 1u << 2;     // KVM_MEM_GUEST_MEMFD
inline constexpr uint32_t kMemslotInvalid = 1u << 16;   // KVM_MEMSLOT_INVALID

inline constexpr uint32_t kMemSlotsNum = 32767;   // KVM_MEM_SLOTS_NUM (SHRT_MAX)
inline constexpr uint32_t kUserMemSlots = 32764;  // KVM_USER_MEM_SLOTS on x86 (= KVM_CAP_NR_MEMSLOTS)
inline constexpr uint64_t kMemMaxNrPages = (uint64_t{1} << 31) - 1;  // KVM_MEM_MAX_NR_PAGES
inline constexpr uint64_t kMemslotGenUpdateInProgress = uint64_t{1} << 63;
inline constexpr uint64_t kTaskSizeMax = 0x00007ffffffff000ULL;  // x86-64 TASK_SIZE_MAX

struct Memslot {
  uint16_t id = 0;
  uint16_t as_id = 0;
  Gfn base_gfn;
  uint64_t npages = 0;
  Hva userspace_addr;
  uint32_t flags = 0;

  Gfn end_gfn() const { return base_gfn + npages; }  // exclusive
  Hva hva_end() const { return userspace_addr + npages * kPageSize; }  // exclusive
  // One unsigned compare (a gfn below base_gfn wraps to a huge offset), so one branch where the
  // two-sided test has a coin-flip branch for gfns outside the slot. Same answer: a slot's
  // base_gfn + npages never wraps (KVM's wrap check).
  bool contains(Gfn gfn) const { return gfn - base_gfn < npages; }
  bool readonly() const { return flags & kMemReadonly; }
  bool logs_dirty() const { return flags & kMemLogDirtyPages; }
  bool invalid() const { return flags & kMemslotInvalid; }

  friend bool operator==(const Memslot&, const Memslot&) = default;
};

// struct kvm_userspace_memory_region; `slot` holds the id in bits 0..15, the address space in
// bits 16..31.
struct UserspaceMemoryRegion {
  uint32_t slot = 0;
  uint32_t flags = 0;
  uint64_t guest_phys_addr = 0;
  uint64_t memory_size = 0;  // bytes; 0 deletes the slot
  uint64_t userspace_addr = 0;
  uint64_t guest_memfd_offset = 0;  // REGION2 only; checked only with kMemGuestMemfd
  uint32_t guest_memfd = 0;         // REGION2 only: the guest_memfd file descriptor (see
                                    // MemslotsConfig::check_guest_memfd_file)
};

enum class MemslotChange { kCreate, kDelete, kMove, kFlagsOnly };
std::string_view to_string(MemslotChange change);

// KVM_SET_USER_MEMORY_REGION (v1: only LOG_DIRTY_PAGES and READONLY) or _REGION2.
enum class RegionIoctl { kV1, kV2 };

struct MemslotsConfig {
  unsigned nr_address_spaces = 1;          // 1, or 2 (x86 with SMM); at most 2
  uint32_t nr_user_slots = kUserMemSlots;  // KVM_USER_MEM_SLOTS; 1..kMemSlotsNum
  bool readonly_mem = true;                // arch supports KVM_MEM_READONLY
  // The VM accepts KVM_MEM_GUEST_MEMFD (the flag rules of 7.4). gfnmap registers such slots but
  // does not model their memory.
  bool private_mem = false;
  // A CREATE with GUEST_MEMFD looks up `guest_memfd` in this process after the overlap check,
  // as kvm_gmem_bind does: a closed fd is EBADF, an open fd that is not a guest_memfd file
  // ("anon_inode:[kvm-gmem]") is EINVAL. Whether the file belongs to this VM, and its size, are
  // not checked. Off: no lookup (the model's default). kvm::System::memslots_config() sets it.
  bool check_guest_memfd_file = false;
  uint64_t task_size = kTaskSizeMax;       // access_ok() limit for userspace_addr + size
  // The arch's highest gfn a CREATE or MOVE may cover (x86: kvm_mmu_max_gfn(), from the
  // MMU's physical-address width; 2^40 - 1 with the shadow MMU). Checked after the overlap
  // check, as the kernel's arch prepare hook does. kvm::System::memslots_config() probes it.
  uint64_t max_gfn = ~uint64_t{0};
  // Read sections without fences, paid for by a membarrier(2) per update where the kernel has
  // it (src/memslot/srcu.h). Once chosen there is no safe way back: a process that denies
  // membarrier later (a seccomp filter installed after this Memslots) aborts at its next
  // update. Such a process sets false: sections then cost one locked add (about 3x).
  bool membarrier = true;
};

// Called by Memslots while it holds its slots lock (KVM's arch hooks). Pointers passed in are
// valid only during the call. Listeners must not call set_memory_region (it returns EDEADLK).
// Order for one change (docs/memslots.md): DELETE/MOVE: [swap to INVALID copy] memslots_updated,
// flush_shadow_memslot, prepare, [swap] memslots_updated, commit. CREATE/FLAGS_ONLY: prepare,
// [swap] memslots_updated, commit. The first failing prepare aborts the change; later listeners'
// prepare is not called and no listener is told of the abort except through memslots_updated of
// the swap that un-publishes the INVALID copy.
class MemslotListener {
 public:
  virtual ~MemslotListener() = default;
  // kvm_arch_prepare_memory_region: an error aborts the change with that errno.
  virtual Result<void> prepare_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                             MemslotChange change);
  // kvm_arch_flush_shadow_memslot: DELETE/MOVE, after the INVALID copy of the old slot is
  // published and before the new slot set is installed. Must zap every mapping of `slot`.
  // `slot` is the published INVALID copy (flags include kMemslotInvalid; KVM passes the
  // original, which has the same id and ranges).
  virtual void flush_shadow_memslot(const Memslot& slot);
  // kvm_arch_commit_memory_region: after the new set is active.
  virtual void commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                    MemslotChange change);
  // kvm_arch_memslots_updated: after every swap of an address space's active set, once every
  // reader of the old set has left. `generation` is the new, final one; as in KVM the active set
  // still shows the previous generation with kMemslotGenUpdateInProgress set during this call
  // (Memslots::generation), and the new one only after every listener has returned.
  virtual void memslots_updated(unsigned as_id, uint64_t generation);
};

// Per-vCPU last-used-slot cache (kvm_vcpu.last_used_slot / last_used_slot_gen). Valid only
// while its generation equals the set's; it never changes a lookup's answer.
struct VcpuMemslotCache {
  const Memslot* slot = nullptr;
  uint64_t generation = kMemslotGenUpdateInProgress;  // never a published generation
};

// One address space's published slot set. Immutable once published, except for the VM-wide
// last-used-slot cache and the generation, which is published with
// kMemslotGenUpdateInProgress set and made final (old + nr_address_spaces) once every reader of
// the previous set has left (spec 7.3). Slot pointers stay valid while the read lock that
// produced the set is held. INVALID slots (DELETE/MOVE windows) are members: lookups return
// them and the gfn -> hva helpers turn them into KVM_HVA_ERR_BAD.
class MemslotSet {
 public:
  unsigned as_id() const { return as_id_; }
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
  size_t size() const { return by_gfn_.size(); }
  std::span<const Memslot> slots() const { return by_gfn_; }  // sorted by base_gfn

  const Memslot* id_to_memslot(uint16_t id) const;  // nullptr when absent
  // search_memslots: O(log n). Without `approx` nullptr when no slot holds gfn; with it, a
  // neighbouring slot of the hole (nullptr only for an empty set).
  const Memslot* search_memslots(Gfn gfn, bool approx = false) const;
  // __gfn_to_memslot: VM-wide last_used_slot first, then search; a hit becomes last used.
  const Memslot* gfn_to_memslot(Gfn gfn) const;
  // kvm_vcpu_gfn_to_memslot: per-vCPU cache (checked by generation), then search without
  // touching the VM-wide cache.
  const Memslot* vcpu_gfn_to_memslot(VcpuMemslotCache& cache, Gfn gfn) const;
  // kvm_is_visible_gfn: in a slot with id < nr_user_slots that is not INVALID.
  bool is_visible_gfn(Gfn gfn) const;
  // Calls fn once for every slot whose hva range intersects [start, end), for MMU notifiers,
  // in O(log n + k) even when slots share hvas. The order of the calls is unspecified.
  void for_each_hva_overlap(Hva start, Hva end, FunctionRef<void(const Memslot&)> fn) const;

  struct Impl;  // implementation detail of memslot/

 private:
  friend class Memslots;
  friend struct Impl;
  MemslotSet() = default;
  const Memslot* gfn_to_memslot_miss(Gfn gfn) const;
  const Memslot* vcpu_gfn_to_memslot_miss(VcpuMemslotCache& cache, Gfn gfn, uint64_t gen) const;
  // The number of slots whose base gfn is <= gfn (the rank of gfn), for any gfn.
  size_t rank_of(Gfn gfn) const;

  // Holds no gfn (npages 0), so it is never returned: the empty set's leaf and the VM-wide cache
  // of a set that has not had a hit yet (the inline cache check then needs no null test).
  static const Memslot kNoSlot;

  // An hva range [start, end) of slot by_gfn_[index].
  struct HvaRange {
    uint64_t start;
    uint64_t end;
    uint32_t index;
  };
  // A node of the centered interval tree over hva_rest_: ranges holding `center`, stored at
  // [begin, begin + count) of hva_node_by_start_ (ascending start) and hva_node_by_end_
  // (descending end); children hold ranges wholly below / above center. -1: no child.
  struct HvaNode {
    uint64_t center;
    uint32_t begin;
    uint32_t count;
    int32_t left;
    int32_t right;
  };

  // The lookup's fields first, so that a lookup reads one or two cache lines of the set.
  unsigned as_id_ = 0;
  // The gfn search tree, one flat array: the base gfns of every slot but the first, as a perfect
  // binary search tree of depth gfn_tree_depth_ in breadth-first (Eytzinger) order, then one
  // leaf per slot. Node k (1 <= k < 2^depth) holds a base gfn (~0 past the last slot, which no
  // gfn passes) and has children 2k and 2k + 1; node 0 is unused. A descent is `depth`
  // branch-free steps k = 2k + (base[k] <= gfn) and ends at leaf 2^depth + r, where r is the
  // number of slots after the first that start at or below gfn; that leaf holds by_gfn_[r], the
  // only slot that can hold gfn. (An empty set has depth 0 and one leaf, &kNoSlot.)
  union GfnTreeNode {
    uint64_t base;        // nodes 1 .. 2^depth - 1
    const Memslot* slot;  // leaves 2^depth .. 2^depth + n - 1
  };
  unsigned gfn_tree_depth_ = 0;
  std::atomic<uint64_t> generation_{0};
  mutable std::atomic<const Memslot*> last_used_slot_{&kNoSlot};  // never null
  std::vector<GfnTreeNode> gfn_tree_;
  uint32_t nr_user_slots_ = kUserMemSlots;
  std::vector<Memslot> by_gfn_;       // sorted by base_gfn, no overlaps
  std::vector<uint32_t> by_id_;       // id -> index + 1 into by_gfn_, 0 when absent
  std::vector<HvaRange> hva_by_start_;  // every slot by (start, id); here `index` is the slot id
  std::vector<HvaRange> hva_chain_;   // pairwise disjoint ranges, sorted (greedy by start)
  std::vector<HvaRange> hva_rest_;    // the others (slots sharing hvas), sorted by start
  std::vector<HvaNode> hva_nodes_;    // centered interval tree over hva_rest_, root at 0
  std::vector<HvaRange> hva_node_by_start_;
  std::vector<HvaRange> hva_node_by_end_;
};

// The cache hits are inline (a load and one range compare); misses search out of line.
inline const Memslot* MemslotSet::gfn_to_memslot(Gfn gfn) const {
  const Memslot* slot = last_used_slot_.load(std::memory_order_relaxed);
  if (slot->contains(gfn)) [[likely]] return slot;
  return gfn_to_memslot_miss(gfn);
}

inline const Memslot* MemslotSet::vcpu_gfn_to_memslot(VcpuMemslotCache& cache, Gfn gfn) const {
  const uint64_t gen = generation_.load(std::memory_order_acquire);
  // The cache never stores an in-progress generation, and only with a slot of the set that had
  // it, so a match means cache.slot belongs to this set (a fresh cache holds nullptr and the
  // in-progress sentinel, which an in-progress set can show).
  // Two compares, not contains(): a vCPU's own cache nearly always hits, and for hits this form
  // measured 0.65-1.02 ns against 1.15-1.30 ns for the one-compare form (bench_memslot,
  // BM_VcpuGfnToMemslot_Hit, same runs). The VM-wide cache, shared by all vCPUs, misses often;
  // there the one-compare form saves the coin-flip branch.
  if (cache.generation == gen && cache.slot && gfn >= cache.slot->base_gfn &&
      gfn < cache.slot->end_gfn()) [[likely]] {
    return cache.slot;
  }
  return vcpu_gfn_to_memslot_miss(cache, gfn, gen);
}

class Memslots;

// An SRCU read-side section: the sets it hands out stay alive (and unchanged) until it ends.
// Cheap: an increment and a decrement of a counter of the calling thread, with no fence where
// the kernel has membarrier (src/memslot/srcu.h). Never blocks.
// A section may be moved to another thread and end there (like srcu_down_read/srcu_up_read).
// set_memory_region knows only the sections its thread opened: one opened elsewhere and held
// here is not seen, and a call from the thread holding it waits for itself forever.
// Not async-signal-safe: do not open or end a section in a signal handler. A fork()ed child
// must not update the parent's Memslots: a section open in another parent thread at the fork
// never ends in the child.
class [[nodiscard]] MemslotsReadLock {
 public:
  MemslotsReadLock(MemslotsReadLock&& other) noexcept;
  MemslotsReadLock(const MemslotsReadLock&) = delete;
  MemslotsReadLock& operator=(const MemslotsReadLock&) = delete;
  MemslotsReadLock& operator=(MemslotsReadLock&&) = delete;
  ~MemslotsReadLock();

  // as_id >= nr_address_spaces gives an empty set (generation kMemslotGenUpdateInProgress).
  // Successive calls may return newer sets; each stays valid until this section ends.
  const MemslotSet& set(unsigned as_id = 0) const;

 private:
  friend class Memslots;
  MemslotsReadLock(const Memslots* owner, unsigned idx, uint64_t opener)
      : owner_(owner), idx_(idx), opener_(opener) {}
  const Memslots* owner_;  // nullptr once moved from
  unsigned idx_;           // SRCU token (the epoch)
  uint64_t opener_;        // serial of the thread that opened the section (for EDEADLK)
};

namespace detail {
struct MemslotsTestPeer;  // tests only: reaches state no public call can (page-total overflow)
}

// The VM's memslots (kvm->memslots[], slots_lock, the swap protocol). Thread safety: any
// number of readers concurrently with one writer at a time (writers serialise internally).
class Memslots {
 public:
  explicit Memslots(MemslotsConfig config = {});
  ~Memslots();
  Memslots(const Memslots&) = delete;
  Memslots& operator=(const Memslots&) = delete;

  // The config in force: nr_address_spaces clamped to 1..2, nr_user_slots to 1..kMemSlotsNum.
  const MemslotsConfig& config() const { return config_; }

  // KVM_SET_USER_MEMORY_REGION(2): checks in KVM's order with KVM's errno for each (spec 7.4).
  // Returns the change made, or nullopt for the no-op modify (which returns 0 in KVM).
  // DELETE and MOVE first publish the old slot marked INVALID and call flush_shadow_memslot.
  // Every swap waits until no MMU-notifier invalidation is active (mn_invalidate_begin/end),
  // then until every reader of the old set has left. Writers serialise; a call from a listener
  // or from a thread inside a read section it opened (of any Memslots) returns EDEADLK instead
  // of deadlocking. A thread inside its own mn_invalidate_begin/end window must not call it.
  Result<std::optional<MemslotChange>> set_memory_region(const UserspaceMemoryRegion& region,
                                                         RegionIoctl ioctl = RegionIoctl::kV1);

  MemslotsReadLock read_lock() const;  // srcu_read_lock(&kvm->srcu)
  // The active generation of an address space (spec 7.3: starts at as_id, + nr_as per swap).
  // Has kMemslotGenUpdateInProgress set between a swap's publish and the end of its
  // memslots_updated calls; kMemslotGenUpdateInProgress alone for a bad as_id.
  uint64_t generation(unsigned as_id) const;
  uint64_t nr_memslot_pages() const;  // VM-wide total of pages in all slots

  // Listeners are called in registration order. Register before concurrent use.
  void add_listener(MemslotListener* listener);
  void remove_listener(MemslotListener* listener);

  // mn_active_invalidate_count: every notifier invalidate_range_start..end window is bracketed
  // by these; swaps wait for the count to reach 0 (spec 8.2). Balanced calls only.
  // An unbalanced end (count already 0) is ignored.
  void mn_invalidate_begin();
  void mn_invalidate_end();
  long mn_active_invalidate_count() const;

  struct Impl;  // implementation detail of memslot/

 private:
  friend class MemslotsReadLock;
  friend struct detail::MemslotsTestPeer;
  MemslotsConfig config_;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// gfn -> hva (spec 3.1 step 1, 5). All accept slot == nullptr.

// __gfn_to_hva_many: KVM_HVA_ERR_BAD for a null or INVALID slot, KVM_HVA_ERR_RO_BAD for a write
// to a READONLY slot, else the hva. nr_pages (optional) receives the pages left in the slot.
// Precondition when the slot is usable: slot->contains(gfn). As in KVM (array_index_nospec), a
// gfn outside the slot is clamped to the slot's first page, never to memory beyond it.
Hva gfn_to_hva_many(const Memslot* slot, Gfn gfn, uint64_t* nr_pages, bool write);
// gfn_to_hva_memslot: write intent, so a READONLY slot gives an error hva.
Hva gfn_to_hva_memslot(const Memslot* slot, Gfn gfn);
// gfn_to_hva_memslot_prot: read intent; *writable (optional) = !READONLY on success.
Hva gfn_to_hva_memslot_prot(const Memslot* slot, Gfn gfn, bool* writable);

}  // namespace gfnmap
