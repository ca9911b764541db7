// gfnmap MMU, internal: Mmu::Impl (the MMU lock, the tables of every address space, the
// invalidation state, registered vCPUs, retired tables) shared by mmu.cc and vcpu.cc.
#pragma once

#include <atomic>
#include <cassert>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gfnmap/mmu.h"
#include "sched/sched_hooks.h"
#include "table.h"

namespace gfnmap {

struct Mmu::Impl {
  explicit Impl(Mmu& mmu) : self(mmu) {}

  Mmu& self;

  // ---- The MMU lock (kvm->mmu_lock). Lock order: see mmu.h.
  std::mutex lock;
  std::atomic<std::thread::id> owner{};  // the holder, for the recursion/held assertions
  bool held_by_me() const { return owner.load(std::memory_order_relaxed) == std::this_thread::get_id(); }
  void lock_mmu() {
    assert(!held_by_me() && "MMU lock taken recursively (lock order, mmu.h)");
    GFNMAP_BLOCK_UNTIL("mmu_lock", [this] {
      return owner.load(std::memory_order_relaxed) == std::thread::id{};
    });
    lock.lock();
    owner.store(std::this_thread::get_id(), std::memory_order_relaxed);
  }
  void unlock_mmu() {
    assert(held_by_me());
    owner.store(std::thread::id{}, std::memory_order_relaxed);
    lock.unlock();
  }
  void assert_held() const { assert(held_by_me() && "MMU lock must be held"); }

  // ---- Under the lock.
  std::vector<detail::SptNode*> roots;  // one per address space, never replaced
  long in_progress = 0;                 // mmu_invalidate_in_progress
  uint64_t range_start = kInvalidGfn;   // mmu_invalidate_range_start/_end
  uint64_t range_end = kInvalidGfn;
  std::vector<Vcpu*> vcpus;
  std::vector<std::pair<Vcpu*, uint64_t>> waits;  // flush scratch: vCPUs in a window, their seq
  std::unordered_map<const void*, uint64_t> pfn_overflow;  // &node->e[i] -> pfn
  // Chunks of tables of levels 2..4 (table.h); blocks are reached from their level-2 table.
  std::vector<detail::SptChunk*> pool;
  // Unlinked tables of levels 2..4 that a vCPU in an access window may still read: freed by
  // the next flush. (A level-1 table is zeroed when unlinked and reused at once: see SptNode.)
  std::vector<std::pair<detail::SptNode*, int>> retired_nodes;  // node, its level
  std::vector<detail::SptScatter*> retired_scatter;
  bool batch_locked = false;     // begin_batch took the lock
  bool batch_needs_flush = false;

  std::atomic<long> in_progress_pub{0};  // copy of in_progress for lock-free readers
  // Bumped (before the flush that frees them) whenever tables of level 2..4 are retired: vCPUs
  // drop their cached region (flat level-1 array, level-2 table) when it changes.
  std::atomic<uint64_t> table_epoch{0};
  std::atomic<uint64_t> nr_nodes{0};      // tables linked now
  std::atomic<uint64_t> nr_resident{0};   // chunk slots that hold memory (kSptNodeBytes each)
  std::atomic<uint64_t> nr_scatter{0};

  // ---- Counters (relaxed).
  struct Counters {
    std::atomic<uint64_t> faults{0}, fast_faults{0}, nowait_hits{0}, slow_faults{0},
        async_queued{0}, async_halts{0}, retries{0}, exits{0}, installs{0}, installs_2m{0},
        installs_1g{0}, prefetches{0}, pte_prefetches{0}, zapped{0}, write_protected{0}, splits{0},
        tlb_flushes{0}, invalidations{0};
  } c;
  static void inc(std::atomic<uint64_t>& v, uint64_t n = 1) {
    v.fetch_add(n, std::memory_order_relaxed);
  }

  // ---- VMM accesses (read_guest / write_guest).
  std::mutex vmm_mutex;
  std::unique_ptr<Vcpu> vmm_vcpu;

  // ---- Table operations (mmu.cc). All require the lock.
  struct ZapCtx {
    bool flush = false;
    uint64_t zapped = 0;
  };
  // A new empty table of level 2..4 (a level-2 table comes with its block).
  detail::SptNode* alloc_table(int level);
  // The new empty table for entry idx of table `parent` at `level` (> 1; the caller links it):
  // a level-1 table is node idx of the parent's block (all zero: the SptNode invariant).
  detail::SptNode* alloc_child(detail::SptNode* parent, int level, unsigned idx);
  // A level-1 table unlinked from its level-2 entry: zeroed now (vCPUs reading the flat array
  // then miss) and free for reuse.
  void release_l1(detail::SptNode* node);
  // A retired table of level 2..4 after the flush (a level-2 table's block goes with it).
  void free_table(detail::SptNode* node, int level);
  void set_leaf_pfn(detail::SptNode* node, unsigned idx, uint64_t pfn, uint64_t* e);
  uint64_t leaf_pfn(const detail::SptNode* node, unsigned idx, uint64_t e) const;
  void drop_leaf(detail::SptNode* node, unsigned idx, uint64_t e);
  // Unlinks the subtree's bookkeeping (leaves dropped); levels 2..4 are retired until the
  // flush, a level-1 table is released at once unless its level-2 table goes too (in_retired).
  void retire_subtree(detail::SptNode* node, int level, ZapCtx& ctx, bool in_retired = false);
  void zap_node(detail::SptNode* node, int level, uint64_t base, uint64_t start, uint64_t end,
                ZapCtx& ctx);
  void zap_range(unsigned as_id, uint64_t start, uint64_t end, ZapCtx& ctx);
  // leaf_gfn: the first gfn the huge leaf maps.
  detail::SptNode* split_leaf(detail::SptNode* node, unsigned idx, int level, uint64_t leaf_gfn,
                              bool write_protect);
  template <class Fn>  // fn(node, idx, e, level, leaf_gfn) for every leaf overlapping [start,end)
  void for_each_leaf(detail::SptNode* node, int level, uint64_t base, uint64_t start,
                     uint64_t end, Fn& fn);
  // direct_pte_prefetch: fills the not-present entries of the aligned group of
  // kPtePrefetchNum around node->e[idx] (a 4K leaf for gfn just installed) from pages the host
  // already has. Lock held; the caller checked that no invalidation is in progress.
  void pte_prefetch(Vcpu& vcpu, const MemslotSet& set, detail::SptNode* node, unsigned idx,
                    uint64_t gfn);
  void flush(bool needed);
  void free_retired();
  bool retry_gfn(uint64_t mmu_seq, uint64_t gfn) const;
};

}  // namespace gfnmap
