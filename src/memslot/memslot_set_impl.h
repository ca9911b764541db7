// gfnmap memslots: building MemslotSet snapshots (copy-on-write, O(n) per change plus
// O(r log r) for the r slots whose hva ranges overlap others).
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "gfnmap/memslot.h"

namespace gfnmap {

struct MemslotSet::Impl {
  using HvaRangeT = MemslotSet::HvaRange;
  using GfnTreeNodeT = MemslotSet::GfnTreeNode;

  // An empty set; `generation` as given.
  static std::unique_ptr<MemslotSet> empty(unsigned as_id, uint32_t nr_user_slots,
                                           uint64_t generation);
  // A new, unpublished set: `old` without slot `remove_id` (when given) and with `insert`
  // (when non-null). Preconditions: the result has no gfn overlap; ids stay unique.
  // Throws std::bad_alloc. Generation is left 0: the swap sets it. `reuse` (optional) is a set
  // no reader can reach any more; its buffers are refilled, which saves the page faults of
  // fresh allocations (they dominate big updates).
  static std::unique_ptr<MemslotSet> derive(const MemslotSet& old,
                                            std::optional<uint16_t> remove_id,
                                            const Memslot* insert,
                                            std::unique_ptr<MemslotSet> reuse = nullptr);
  // A new, unpublished set of `slots` (any order; same preconditions). O(n log n).
  static std::unique_ptr<MemslotSet> build(unsigned as_id, uint32_t nr_user_slots,
                                           std::vector<Memslot> slots);
  // Derives the gfn search tree, by_id_ and the hva index from by_gfn_ and hva_by_start_.
  static void finish(MemslotSet& s);
  // Test hook (MemslotsTestPeer): the next n builds on this thread throw std::bad_alloc.
  static void fail_next_builds(unsigned n);
  static void set_generation(MemslotSet& set, uint64_t generation) {
    set.generation_.store(generation, std::memory_order_release);
  }
  // kvm_check_memslot_overlap: a slot other than `id` with gfns in [start, end), or nullptr.
  static const Memslot* find_overlap(const MemslotSet& set, uint16_t id, Gfn start, Gfn end);
  // Appends the centered interval tree of the given ranges to s.hva_nodes_; returns its root.
  static int32_t build_hva_tree(MemslotSet& s, std::vector<HvaRange> by_start,
                                std::vector<HvaRange> by_end);
};

}  // namespace gfnmap
