// gfnmap memslots: MemslotSet lookups (gfn search with caches, id, hva intervals), its builder,
// and the gfn -> hva helpers (spec 3.1 step 1, 5, 7.2).
#include <algorithm>
#include <bit>
#include <new>
#include <utility>

#include "memslot_set_impl.h"

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// Lookups. A published set is immutable apart from last_used_slot_ and generation_, so these
// are plain reads of the set plus relaxed atomics.

const Memslot* MemslotSet::id_to_memslot(uint16_t id) const {
  if (id >= by_id_.size()) return nullptr;
  const uint32_t i = by_id_[id];
  return i ? &by_gfn_[i - 1] : nullptr;
}

const Memslot MemslotSet::kNoSlot{};

namespace {

using GfnTreeNode = MemslotSet::Impl::GfnTreeNodeT;

// One step of the descent: k = 2k + (base[k] <= gfn), written as base[k] < gfn + 1 so that it is
// one compare and one add-with-carry on x86-64 (cmp base[k], gfn + 1 sets the carry exactly when
// base[k] < gfn + 1; adc k, k adds it to 2k), no branch. GCC spills _addcarry_u64's result in the
// unrolled descent, hence the asm. Sanitizer builds use the C++ form, which they instrument.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GFNMAP_MEMSLOT_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define GFNMAP_MEMSLOT_SANITIZED 1
#endif
#endif
#if defined(__x86_64__) && !defined(GFNMAP_MEMSLOT_SANITIZED)
#define GFNMAP_DESCEND_ASM 1
#endif
[[gnu::always_inline]] inline size_t descend(const GfnTreeNode* tree, size_t k,
                                             uint64_t gfn_plus_1) {
#ifdef GFNMAP_DESCEND_ASM
  // The "m" operand tells the compiler that the asm reads the tree (an array of unknown size).
  asm("cmpq %[key], (%[tree], %[k], 8)\n\tadcq %[k], %[k]"
      : [k] "+r"(k)
      : [tree] "r"(tree), [key] "r"(gfn_plus_1),
        "m"(*reinterpret_cast<const GfnTreeNode(*)[]>(tree))
      : "cc");
  return k;
#else
  return 2 * k + (tree[k].base < gfn_plus_1);
#endif
}

// The leaf that gfn_plus_1 - 1 descends to (gfn_plus_1 == 0, i.e. gfn ~0, passes no node and
// ends at leaf 2^depth). Every set has one depth, so the switch's jump predicts, and the steps
// after it run unrolled.
[[gnu::always_inline]] inline size_t descend_to_leaf(const GfnTreeNode* tree, unsigned depth,
                                                     uint64_t gfn_plus_1) {
  size_t k = 1;
  for (; depth > 16; --depth) k = descend(tree, k, gfn_plus_1);
  // clang-format off
  switch (depth) {
#define GFNMAP_STEP(d)                \
  case d:                             \
    k = descend(tree, k, gfn_plus_1); \
    [[fallthrough]];
    GFNMAP_STEP(16) GFNMAP_STEP(15) GFNMAP_STEP(14) GFNMAP_STEP(13) GFNMAP_STEP(12)
    GFNMAP_STEP(11) GFNMAP_STEP(10) GFNMAP_STEP(9) GFNMAP_STEP(8) GFNMAP_STEP(7)
    GFNMAP_STEP(6) GFNMAP_STEP(5) GFNMAP_STEP(4) GFNMAP_STEP(3) GFNMAP_STEP(2) GFNMAP_STEP(1)
#undef GFNMAP_STEP
    default:
      break;
  }
  // clang-format on
  return k;
}

// The miss paths' search: the last slot starting at or below gfn, or the first slot when none
// does (its range test then fails), or &kNoSlot in an empty set. gfn ~0 descends to the first
// slot too, which is right: no slot holds it (a slot ends below 2^52, KVM's wrap check on
// guest_phys_addr + memory_size).
[[gnu::always_inline]] inline const Memslot* candidate_slot(const GfnTreeNode* tree,
                                                            unsigned depth, Gfn gfn) {
  return tree[descend_to_leaf(tree, depth, gfn.value + 1)].slot;
}

}  // namespace

size_t MemslotSet::rank_of(Gfn gfn) const {
  if (by_gfn_.empty()) return 0;
  if (gfn.value == ~uint64_t{0}) return by_gfn_.size();
  // The tree counts the slots after the first; the first is counted by hand.
  const size_t after_first = descend_to_leaf(gfn_tree_.data(), gfn_tree_depth_, gfn.value + 1) -
                             (size_t{1} << gfn_tree_depth_);
  return after_first + (by_gfn_[0].base_gfn <= gfn);
}

const Memslot* MemslotSet::search_memslots(Gfn gfn, bool approx) const {
  const Memslot* slot = candidate_slot(gfn_tree_.data(), gfn_tree_depth_, gfn);
  if (slot->contains(gfn)) return slot;
  if (!approx || by_gfn_.empty()) return nullptr;
  // A neighbour of the hole: the candidate is the last slot starting below gfn, or the first slot
  // when every slot starts above gfn. gfn ~0 (which descends to the first slot) is above all.
  return gfn.value == ~uint64_t{0} ? &by_gfn_.back() : slot;
}

// Both miss paths search inline: one descent, one load of the candidate, one range compare.
const Memslot* MemslotSet::gfn_to_memslot_miss(Gfn gfn) const {
  const Memslot* slot = candidate_slot(gfn_tree_.data(), gfn_tree_depth_, gfn);
  if (!slot->contains(gfn)) return nullptr;
  last_used_slot_.store(slot, std::memory_order_relaxed);
  return slot;
}

const Memslot* MemslotSet::vcpu_gfn_to_memslot_miss(VcpuMemslotCache& cache, Gfn gfn,
                                                    uint64_t gen) const {
  const Memslot* slot = candidate_slot(gfn_tree_.data(), gfn_tree_depth_, gfn);
  if (!slot->contains(gfn)) return nullptr;
  if (!(gen & kMemslotGenUpdateInProgress)) {
    cache.slot = slot;
    cache.generation = gen;
  }
  return slot;
}

bool MemslotSet::is_visible_gfn(Gfn gfn) const {
  const Memslot* slot = gfn_to_memslot(gfn);
  return slot && slot->id < nr_user_slots_ && !slot->invalid();
}

// Overlap of [qs, qe) with ranges [s, e) (s < e): either qs <= s < qe, or s < qs < e.
// hva_chain_: disjoint and sorted, so the hits are one contiguous run found by binary search.
// hva_rest_: the first kind is a contiguous run by start; the second is a stabbing query at qs
// on the centered interval tree, which visits O(log r) nodes and at each stops at the first
// miss. Total O(log n + k); every slot is reported once.
void MemslotSet::for_each_hva_overlap(Hva start, Hva end,
                                      FunctionRef<void(const Memslot&)> fn) const {
  const uint64_t qs = start.value;
  const uint64_t qe = end.value;
  if (qs >= qe) return;

  auto it = std::partition_point(hva_chain_.begin(), hva_chain_.end(),
                                 [qs](const HvaRange& r) { return r.end <= qs; });
  for (; it != hva_chain_.end() && it->start < qe; ++it) fn(by_gfn_[it->index]);

  if (hva_rest_.empty()) return;
  auto jt = std::partition_point(hva_rest_.begin(), hva_rest_.end(),
                                 [qs](const HvaRange& r) { return r.start < qs; });
  for (; jt != hva_rest_.end() && jt->start < qe; ++jt) fn(by_gfn_[jt->index]);

  int32_t n = 0;  // every range at a node holds its center: start <= center < end
  while (n >= 0) {
    const HvaNode& node = hva_nodes_[static_cast<size_t>(n)];
    if (qs <= node.center) {
      // end > center >= qs holds for all; report those starting below qs.
      for (uint32_t i = node.begin; i < node.begin + node.count; ++i) {
        const HvaRange& r = hva_node_by_start_[i];
        if (r.start >= qs) break;
        fn(by_gfn_[r.index]);
      }
      n = qs < node.center ? node.left : -1;  // right subtree starts above center >= qs
    } else {
      // start <= center < qs holds for all; report those ending above qs.
      for (uint32_t i = node.begin; i < node.begin + node.count; ++i) {
        const HvaRange& r = hva_node_by_end_[i];
        if (r.end <= qs) break;
        fn(by_gfn_[r.index]);
      }
      n = node.right;  // left subtree ends at or below center < qs
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Builder.

std::unique_ptr<MemslotSet> MemslotSet::Impl::empty(unsigned as_id, uint32_t nr_user_slots,
                                                    uint64_t generation) {
  std::unique_ptr<MemslotSet> set(new MemslotSet());
  set->as_id_ = as_id;
  set->nr_user_slots_ = nr_user_slots;
  set->generation_.store(generation, std::memory_order_relaxed);
  finish(*set);
  return set;
}

namespace {

thread_local unsigned t_fail_builds = 0;

void maybe_fail_build() {
  if (t_fail_builds > 0) {
    --t_fail_builds;
    throw std::bad_alloc();
  }
}

bool hva_key_less(const MemslotSet::Impl::HvaRangeT& a, const MemslotSet::Impl::HvaRangeT& b) {
  return a.start != b.start ? a.start < b.start : a.index < b.index;
}

// out = in without in[rm] (rm == in.size(): nothing removed), with *add (when non-null) placed
// before in[at] (at <= in.size()). Whole runs are copied: this is most of an update's cost.
template <class T>
void splice(std::vector<T>& out, const std::vector<T>& in, size_t rm, size_t at, const T* add) {
  const size_t n = in.size();
  out.clear();
  out.reserve(n + 1);
  auto copy = [&](size_t a, size_t b) {
    if (a < b) out.insert(out.end(), in.begin() + static_cast<ptrdiff_t>(a),
                          in.begin() + static_cast<ptrdiff_t>(b));
  };
  const size_t after_rm = std::min(rm + 1, n);
  if (!add) {
    copy(0, rm);
    copy(after_rm, n);
  } else if (at <= rm) {
    copy(0, at);
    out.push_back(*add);
    copy(at, rm);
    copy(after_rm, n);
  } else {
    copy(0, rm);
    copy(after_rm, at);
    out.push_back(*add);
    copy(at, n);
  }
}

}  // namespace

void MemslotSet::Impl::fail_next_builds(unsigned n) { t_fail_builds = n; }

std::unique_ptr<MemslotSet> MemslotSet::Impl::derive(const MemslotSet& old,
                                                     std::optional<uint16_t> remove_id,
                                                     const Memslot* insert,
                                                     std::unique_ptr<MemslotSet> reuse) {
  maybe_fail_build();
  std::unique_ptr<MemslotSet> set = reuse ? std::move(reuse)
                                          : std::unique_ptr<MemslotSet>(new MemslotSet());
  MemslotSet& s = *set;
  // Every member is rewritten below or by finish(); clear() keeps the capacity.
  s.generation_.store(0, std::memory_order_relaxed);
  s.last_used_slot_.store(&kNoSlot, std::memory_order_relaxed);
  s.by_gfn_.clear();
  s.hva_by_start_.clear();
  s.as_id_ = old.as_id_;
  s.nr_user_slots_ = old.nr_user_slots_;

  // by_gfn_ and hva_by_start_ ((start, id) order, `index` = id): the old arrays with the removed
  // slot cut out and the inserted one placed, copied as whole runs.
  const Memslot* removed = remove_id ? old.id_to_memslot(*remove_id) : nullptr;
  const size_t n = old.by_gfn_.size();
  size_t rm = n;
  size_t at = n;
  if (removed) rm = static_cast<size_t>(removed - old.by_gfn_.data());
  if (insert) {
    at = old.rank_of(insert->base_gfn);
  }
  splice(s.by_gfn_, old.by_gfn_, rm, at, insert);

  const auto key_at = [&old](uint64_t start, uint32_t id) {
    return static_cast<size_t>(
        std::lower_bound(old.hva_by_start_.begin(), old.hva_by_start_.end(),
                         HvaRange{start, 0, id}, hva_key_less) -
        old.hva_by_start_.begin());
  };
  std::optional<HvaRange> ins;
  rm = at = n;
  if (removed) rm = key_at(removed->userspace_addr.value, removed->id);
  if (insert) {
    ins = HvaRange{insert->userspace_addr.value, insert->hva_end().value, insert->id};
    at = key_at(ins->start, ins->index);
  }
  splice(s.hva_by_start_, old.hva_by_start_, rm, at, ins ? &*ins : nullptr);
  finish(s);
  return set;
}

std::unique_ptr<MemslotSet> MemslotSet::Impl::build(unsigned as_id, uint32_t nr_user_slots,
                                                    std::vector<Memslot> slots) {
  maybe_fail_build();
  std::unique_ptr<MemslotSet> set(new MemslotSet());
  MemslotSet& s = *set;
  s.as_id_ = as_id;
  s.nr_user_slots_ = nr_user_slots;
  std::sort(slots.begin(), slots.end(),
            [](const Memslot& a, const Memslot& b) { return a.base_gfn < b.base_gfn; });
  s.by_gfn_ = std::move(slots);
  for (const Memslot& m : s.by_gfn_) {
    s.hva_by_start_.push_back(HvaRange{m.userspace_addr.value, m.hva_end().value, m.id});
  }
  std::sort(s.hva_by_start_.begin(), s.hva_by_start_.end(), hva_key_less);
  finish(s);
  return set;
}

void MemslotSet::Impl::finish(MemslotSet& s) {
  s.hva_chain_.clear();
  s.hva_rest_.clear();
  s.hva_nodes_.clear();
  s.hva_node_by_start_.clear();
  s.hva_node_by_end_.clear();
  const size_t n = s.by_gfn_.size();
  uint32_t max_id = 0;
  for (const Memslot& m : s.by_gfn_) max_id = std::max<uint32_t>(max_id, m.id);

  // The gfn search tree over the bases of by_gfn_[1 ..]: the smallest perfect tree with room for
  // n - 1 bases (2^depth - 1 >= n - 1, so 16 slots take 4 steps), then one leaf per slot. The
  // j-th base in order (j >= 1) goes to node 2^l + (j >> (t + 1)) with t = ctz(j) and
  // l = depth - 1 - t (its level), so the bases are read in order, as they lie in memory.
  const size_t keys = n > 0 ? n - 1 : 0;
  unsigned depth = 0;
  while ((size_t{1} << depth) - 1 < keys) ++depth;
  const size_t first_leaf = size_t{1} << depth;
  s.gfn_tree_depth_ = depth;
  s.gfn_tree_.resize(first_leaf + std::max<size_t>(n, 1));
  s.gfn_tree_[0].base = 0;  // unused
  for (size_t k = 1; k < first_leaf; ++k) s.gfn_tree_[k].base = ~uint64_t{0};  // padding
  for (size_t j = 1; j <= keys; ++j) {
    const auto t = static_cast<unsigned>(std::countr_zero(j));
    const size_t node = (size_t{1} << (depth - 1 - t)) + (j >> (t + 1));
    s.gfn_tree_[node].base = s.by_gfn_[j].base_gfn.value;
  }
  s.gfn_tree_[first_leaf].slot = &kNoSlot;  // the empty set's only leaf
  for (size_t i = 0; i < n; ++i) s.gfn_tree_[first_leaf + i].slot = &s.by_gfn_[i];
  s.by_id_.assign(s.by_gfn_.empty() ? 0 : max_id + 1, 0);
  for (size_t i = 0; i < s.by_gfn_.size(); ++i) {
    s.by_id_[s.by_gfn_[i].id] = static_cast<uint32_t>(i + 1);
  }

  // Greedy split: a range joins the chain when it starts at or after the chain's end, so the
  // chain is disjoint; the rest (slots sharing hvas, usually none) goes to the interval tree.
  uint64_t chain_end = 0;
  s.hva_chain_.reserve(s.hva_by_start_.size());
  for (const HvaRange& r : s.hva_by_start_) {
    const HvaRange by_index{r.start, r.end, s.by_id_[r.index] - 1};
    if (r.start >= chain_end) {
      s.hva_chain_.push_back(by_index);
      chain_end = r.end;
    } else {
      s.hva_rest_.push_back(by_index);
    }
  }
  if (!s.hva_rest_.empty()) {
    std::vector<HvaRange> by_end = s.hva_rest_;
    std::stable_sort(by_end.begin(), by_end.end(),
                     [](const HvaRange& a, const HvaRange& b) { return a.end > b.end; });
    build_hva_tree(s, s.hva_rest_, std::move(by_end));
  }
}

// Centered interval tree: center = median start, so each child holds at most half the ranges
// and the depth is O(log r). Each range is stored at exactly one node.
int32_t MemslotSet::Impl::build_hva_tree(MemslotSet& s, std::vector<HvaRange> by_start,
                                         std::vector<HvaRange> by_end) {
  if (by_start.empty()) return -1;
  const uint64_t center = by_start[by_start.size() / 2].start;
  auto split = [center](std::vector<HvaRange>& in, std::vector<HvaRange>& lo,
                        std::vector<HvaRange>& mid, std::vector<HvaRange>& hi) {
    for (const HvaRange& r : in) {
      if (r.end <= center) {
        lo.push_back(r);
      } else if (r.start > center) {
        hi.push_back(r);
      } else {
        mid.push_back(r);
      }
    }
  };
  std::vector<HvaRange> lo_s, mid_s, hi_s, lo_e, mid_e, hi_e;
  split(by_start, lo_s, mid_s, hi_s);
  split(by_end, lo_e, mid_e, hi_e);
  by_start.clear();
  by_start.shrink_to_fit();
  by_end.clear();
  by_end.shrink_to_fit();

  const auto node = static_cast<int32_t>(s.hva_nodes_.size());
  s.hva_nodes_.push_back(HvaNode{center, static_cast<uint32_t>(s.hva_node_by_start_.size()),
                                 static_cast<uint32_t>(mid_s.size()), -1, -1});
  s.hva_node_by_start_.insert(s.hva_node_by_start_.end(), mid_s.begin(), mid_s.end());
  s.hva_node_by_end_.insert(s.hva_node_by_end_.end(), mid_e.begin(), mid_e.end());
  const int32_t left = build_hva_tree(s, std::move(lo_s), std::move(lo_e));
  const int32_t right = build_hva_tree(s, std::move(hi_s), std::move(hi_e));
  s.hva_nodes_[static_cast<size_t>(node)].left = left;
  s.hva_nodes_[static_cast<size_t>(node)].right = right;
  return node;
}

const Memslot* MemslotSet::Impl::find_overlap(const MemslotSet& set, uint16_t id, Gfn start,
                                              Gfn end) {
  // Slots are disjoint and sorted, so those meeting [start, end) are a contiguous run ending at
  // the last slot that begins before `end`; walk it backwards.
  for (auto i = static_cast<ptrdiff_t>(set.rank_of(end - 1)) - 1; i >= 0; --i) {
    const Memslot& m = set.by_gfn_[static_cast<size_t>(i)];
    if (m.end_gfn() <= start) break;
    if (m.id != id) return &m;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// gfn -> hva.

Hva gfn_to_hva_many(const Memslot* slot, Gfn gfn, uint64_t* nr_pages, bool write) {
  if (!slot || slot->invalid()) return kHvaErrBad;
  if (slot->readonly() && write) return kHvaErrRoBad;
  // array_index_nospec: an offset outside the slot becomes 0 (the caller broke the contract;
  // never hand out an hva beyond the slot).
  uint64_t offset = gfn - slot->base_gfn;
  if (offset >= slot->npages) offset = 0;
  if (nr_pages) *nr_pages = slot->npages - offset;
  return slot->userspace_addr + offset * kPageSize;
}

Hva gfn_to_hva_memslot(const Memslot* slot, Gfn gfn) {
  return gfn_to_hva_many(slot, gfn, nullptr, true);
}

Hva gfn_to_hva_memslot_prot(const Memslot* slot, Gfn gfn, bool* writable) {
  const Hva hva = gfn_to_hva_many(slot, gfn, nullptr, false);
  if (!kvm_is_error_hva(hva) && writable) *writable = !slot->readonly();
  return hva;
}

}  // namespace gfnmap
