// gfnmap memslot tests: the commit sequence seen by listeners (spec 7.4), the DELETE/MOVE
// INVALID window (invariant 20), prepare failures, and generations (spec 7.3, invariant 22).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

using test::kHvaBase;
using test::region;
using test::snapshot;

constexpr uint64_t kMiB = 1 << 20;

std::string slot_str(const Memslot* s) {
  if (!s) return "null";
  return std::to_string(s->id) + "@" + std::to_string(s->base_gfn.value) + "/" +
         std::to_string(s->flags);
}

// Records every callback as a line and checks, inside each, what the published state must be.
class RecordingListener : public MemslotListener {
 public:
  RecordingListener(Memslots& slots, std::string name) : slots_(slots), name_(std::move(name)) {}

  Result<void> prepare_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                     MemslotChange change) override {
    log.push_back(name_ + " prepare " + std::string(to_string(change)) + " " +
                  slot_str(old_slot) + " -> " + slot_str(new_slot));
    check_not_in_swap();
    if (fail_prepare) return make_error(fail_prepare, "listener ", name_, " says no");
    return {};
  }
  void flush_shadow_memslot(const Memslot& slot) override {
    log.push_back(name_ + " flush " + slot_str(&slot));
    check_not_in_swap();
    // The window: lookups of the slot's gfns find the INVALID copy, never a usable slot, and its
    // hva is KVM_HVA_ERR_BAD (the resolver's NOSLOT).
    EXPECT_TRUE(slot.invalid());
    auto lock = slots_.read_lock();
    const MemslotSet& set = lock.set(slot.as_id);
    for (Gfn gfn : {slot.base_gfn, slot.end_gfn() - 1}) {
      const Memslot* found = set.gfn_to_memslot(gfn);
      ASSERT_NE(found, nullptr);
      EXPECT_TRUE(found->invalid());
      EXPECT_EQ(found->id, slot.id);
      VcpuMemslotCache cache;
      EXPECT_EQ(set.vcpu_gfn_to_memslot(cache, gfn), found);
      EXPECT_EQ(gfn_to_hva_memslot(found, gfn), kHvaErrBad);
      EXPECT_EQ(gfn_to_hva_memslot_prot(found, gfn, nullptr), kHvaErrBad);
      EXPECT_FALSE(set.is_visible_gfn(gfn));
    }
    EXPECT_EQ(set.id_to_memslot(slot.id), set.gfn_to_memslot(slot.base_gfn));
    int seen = 0;
    set.for_each_hva_overlap(slot.userspace_addr, slot.hva_end(), [&](const Memslot& s) {
      if (s.id == slot.id) {
        ++seen;
        EXPECT_TRUE(s.invalid());
      }
    });
    EXPECT_EQ(seen, 1) << "notifiers still find the INVALID slot by hva";
  }
  void commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                            MemslotChange change) override {
    log.push_back(name_ + " commit " + std::string(to_string(change)) + " " +
                  slot_str(old_slot) + " -> " + slot_str(new_slot));
    check_not_in_swap();
    // The new set is active.
    auto lock = slots_.read_lock();
    const unsigned as = old_slot ? old_slot->as_id : new_slot->as_id;
    const uint16_t id = old_slot ? old_slot->id : new_slot->id;
    const Memslot* now = lock.set(as).id_to_memslot(id);
    if (new_slot) {
      ASSERT_NE(now, nullptr);
      EXPECT_EQ(*now, *new_slot);
    } else {
      EXPECT_EQ(now, nullptr);
    }
  }
  void memslots_updated(unsigned as_id, uint64_t generation) override {
    log.push_back(name_ + " updated as" + std::to_string(as_id));
    generations.push_back(generation);
    // Invariant 22 and spec 7.3: inside the swap the active set shows the previous generation
    // with bit 63 set; the one passed in is final (previous + nr_address_spaces).
    const unsigned nr_as = slots_.config().nr_address_spaces;
    const uint64_t in_progress = (generation - nr_as) | kMemslotGenUpdateInProgress;
    EXPECT_EQ(slots_.generation(as_id), in_progress);
    auto lock = slots_.read_lock();
    EXPECT_EQ(lock.set(as_id).generation(), in_progress);
    EXPECT_EQ(generation & kMemslotGenUpdateInProgress, 0u);
    EXPECT_EQ(generation % nr_as, as_id);
    // A fresh vCPU cache holds the in-progress sentinel, which AS 0's first swap shows
    // (0 | bit 63): a lookup must search, not follow the cache's null slot.
    VcpuMemslotCache fresh;
    for (const Memslot& s : lock.set(as_id).slots()) {
      EXPECT_EQ(lock.set(as_id).vcpu_gfn_to_memslot(fresh, s.base_gfn), &s);
      EXPECT_EQ(fresh.generation, kMemslotGenUpdateInProgress) << "never cached in a swap";
    }
    EXPECT_EQ(lock.set(as_id).vcpu_gfn_to_memslot(fresh, Gfn(~uint64_t{0})), nullptr);
    // A listener must not change slots from a callback: a clear error, not a deadlock.
    auto r = slots_.set_memory_region(region(100, 0x7000000000, kMiB));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.code(), EDEADLK);
  }

  std::vector<std::string> log;
  std::vector<uint64_t> generations;
  int fail_prepare = 0;

 private:
  void check_not_in_swap() {
    for (unsigned as = 0; as < slots_.config().nr_address_spaces; ++as) {
      EXPECT_EQ(slots_.generation(as) & kMemslotGenUpdateInProgress, 0u);
    }
  }
  Memslots& slots_;
  std::string name_;
};

using Log = std::vector<std::string>;

TEST(MemslotListeners, CommitSequence_CreateFlagsOnlyMoveDelete) {
  Memslots slots;
  RecordingListener l(slots, "L");
  slots.add_listener(&l);

  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB)), MemslotChange::kCreate);
  EXPECT_EQ(l.log, (Log{"L prepare CREATE null -> 3@256/0", "L updated as0",
                        "L commit CREATE null -> 3@256/0"}));
  l.log.clear();

  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, kMiB, kMiB, kHvaBase, kMemLogDirtyPages)),
                    MemslotChange::kFlagsOnly);
  EXPECT_EQ(l.log, (Log{"L prepare FLAGS_ONLY 3@256/0 -> 3@256/1", "L updated as0",
                        "L commit FLAGS_ONLY 3@256/0 -> 3@256/1"}));
  l.log.clear();

  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, 8 * kMiB, kMiB, kHvaBase, 1)),
                    MemslotChange::kMove);
  const std::string invalid = "3@256/" + std::to_string(kMemslotInvalid | kMemLogDirtyPages);
  EXPECT_EQ(l.log, (Log{"L updated as0", "L flush " + invalid,
                        "L prepare MOVE 3@256/1 -> 3@2048/1", "L updated as0",
                        "L commit MOVE 3@256/1 -> 3@2048/1"}));
  l.log.clear();

  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(3, 0, 0)), MemslotChange::kDelete);
  const std::string invalid2 = "3@2048/" + std::to_string(kMemslotInvalid | kMemLogDirtyPages);
  EXPECT_EQ(l.log, (Log{"L updated as0", "L flush " + invalid2,
                        "L prepare DELETE 3@2048/1 -> null", "L updated as0",
                        "L commit DELETE 3@2048/1 -> null"}));
  l.log.clear();

  // Failed checks and the no-op call no listener.
  EXPECT_FALSE(slots.set_memory_region(region(3, 0, 0)).ok());
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(4, 0, kMiB)), MemslotChange::kCreate);
  l.log.clear();
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(4, 0, kMiB)), std::nullopt);
  EXPECT_TRUE(l.log.empty());
}

TEST(MemslotListeners, CalledInRegistrationOrderAndRemovable) {
  Memslots slots;
  RecordingListener a(slots, "A");
  RecordingListener b(slots, "B");
  slots.add_listener(&a);
  slots.add_listener(&b);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  EXPECT_EQ(a.log.size(), 3u);
  ASSERT_EQ(b.log.size(), 3u);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, 0)), MemslotChange::kDelete);
  // Interleaving: each step runs every listener before the next step.
  ASSERT_EQ(a.log.size(), 8u);
  EXPECT_EQ(a.log[4], "A flush 1@0/" + std::to_string(kMemslotInvalid));
  EXPECT_EQ(b.log[4], "B flush 1@0/" + std::to_string(kMemslotInvalid));
  slots.remove_listener(&a);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  EXPECT_EQ(a.log.size(), 8u);
  EXPECT_EQ(b.log.size(), 11u);
  slots.add_listener(nullptr);  // ignored
  slots.remove_listener(nullptr);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, 0)), MemslotChange::kDelete);
}

TEST(MemslotListeners, PrepareFailureOnCreateAbortsWithItsErrno) {
  Memslots slots;
  RecordingListener a(slots, "A");
  RecordingListener b(slots, "B");
  slots.add_listener(&a);
  slots.add_listener(&b);
  a.fail_prepare = ENOSPC;
  const uint64_t gen = slots.generation(0);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, kMiB)), ENOSPC, "listener A says no");
  EXPECT_EQ(a.log, (Log{"A prepare CREATE null -> 1@0/0"}));
  EXPECT_TRUE(b.log.empty()) << "later listeners' prepare is not called";
  EXPECT_TRUE(snapshot(slots).empty());
  EXPECT_EQ(slots.generation(0), gen) << "nothing was published";
  EXPECT_EQ(slots.nr_memslot_pages(), 0u);
}

TEST(MemslotListeners, PrepareFailureOnDeleteUnpublishesTheInvalidCopy) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB, kHvaBase, kMemReadonly)),
                    MemslotChange::kCreate);
  const auto before = snapshot(slots);
  RecordingListener a(slots, "A");
  RecordingListener b(slots, "B");
  slots.add_listener(&a);
  slots.add_listener(&b);
  b.fail_prepare = EBUSY;
  const uint64_t gen = slots.generation(0);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, 0)), EBUSY, "listener B says no");
  const std::string invalid = "1@0/" + std::to_string(kMemslotInvalid | kMemReadonly);
  EXPECT_EQ(a.log, (Log{"A updated as0", "A flush " + invalid, "A prepare DELETE 1@0/2 -> null",
                        "A updated as0"}));
  EXPECT_EQ(b.log, (Log{"B updated as0", "B flush " + invalid, "B prepare DELETE 1@0/2 -> null",
                        "B updated as0"}));
  EXPECT_EQ(snapshot(slots), before) << "slot back, not INVALID";
  EXPECT_EQ(slots.generation(0), gen + 2) << "two swaps happened (invalidate, restore)";
  EXPECT_EQ(slots.nr_memslot_pages(), kMiB / kPageSize);
  auto lock = slots.read_lock();
  EXPECT_TRUE(lock.set().is_visible_gfn(Gfn(0)));
}

TEST(MemslotListeners, PrepareFailureOnMoveLeavesTheSlotWhereItWas) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  const auto before = snapshot(slots);
  RecordingListener a(slots, "A");
  slots.add_listener(&a);
  a.fail_prepare = EINVAL;
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 4 * kMiB, kMiB)), EINVAL, "says no");
  EXPECT_EQ(snapshot(slots), before);
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set().gfn_to_memslot(Gfn(0))->flags, 0u);
  EXPECT_EQ(lock.set().gfn_to_memslot(Gfn(4 * kMiB / kPageSize)), nullptr);
}

class EmptyErrorListener : public MemslotListener {
 public:
  Result<void> prepare_memory_region(const Memslot*, const Memslot*, MemslotChange) override {
    return Error{0, ""};
  }
};

TEST(MemslotListeners, PrepareFailureWithoutErrnoBecomesEinval) {
  Memslots slots;
  EmptyErrorListener l;
  slots.add_listener(&l);
  EXPECT_MEMSLOT_ERROR(slots.set_memory_region(region(1, 0, kMiB)), EINVAL,
                       "prepare_memory_region rejected the change");
}

// ---------------------------------------------------------------------------------------------
// Invariant 22: generations.

TEST(MemslotGenerations, Invariant22_OneAddressSpaceStartsAtZeroPlusOnePerSwap) {
  Memslots slots;
  RecordingListener l(slots, "L");
  slots.add_listener(&l);
  EXPECT_EQ(slots.generation(0), 0u);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  EXPECT_EQ(slots.generation(0), 1u);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, kMiB, kMiB)), MemslotChange::kMove);
  EXPECT_EQ(slots.generation(0), 3u);
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, 0)), MemslotChange::kDelete);
  EXPECT_EQ(slots.generation(0), 5u);
  EXPECT_EQ(l.generations, (std::vector<uint64_t>{1, 2, 3, 4, 5}));
}

TEST(MemslotGenerations, Invariant22_TwoAddressSpacesNeverCollide) {
  MemslotsConfig config;
  config.nr_address_spaces = 2;
  Memslots slots(config);
  RecordingListener l(slots, "L");
  slots.add_listener(&l);
  EXPECT_EQ(slots.generation(0), 0u);
  EXPECT_EQ(slots.generation(1), 1u);
  uint64_t last[2] = {0, 1};
  // A mix of changes in both address spaces; each swap moves its AS by 2.
  const std::vector<std::pair<UserspaceMemoryRegion, unsigned>> ops = {
      {region(0, 0, kMiB, kHvaBase, 0, 1), 1},
      {region(0, 0, kMiB, kHvaBase, 0, 0), 0},
      {region(0, kMiB, kMiB, kHvaBase, 0, 1), 1},
      {region(0, 0, kMiB, kHvaBase, kMemLogDirtyPages, 0), 0},
      {region(0, 0, 0, 0, 0, 0), 0},
  };
  for (const auto& [r, as] : ops) {
    const size_t before = l.generations.size();
    ASSERT_TRUE(slots.set_memory_region(r).ok());
    ASSERT_GT(l.generations.size(), before);
    for (size_t i = before; i < l.generations.size(); ++i) {
      const uint64_t g = l.generations[i];
      EXPECT_EQ(g % 2, as);
      EXPECT_EQ(g, last[as] + 2) << "strictly increasing, by nr_address_spaces per swap";
      last[as] = g;
    }
    EXPECT_EQ(slots.generation(0), last[0]);
    EXPECT_EQ(slots.generation(1), last[1]);
  }
  EXPECT_EQ(slots.generation(2), kMemslotGenUpdateInProgress) << "bad as_id";
}

TEST(MemslotGenerations, Invariant22_FailedChangesDoNotMoveTheGeneration) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  const uint64_t gen = slots.generation(0);
  EXPECT_FALSE(slots.set_memory_region(region(2, 0, kMiB)).ok());        // EEXIST
  EXPECT_FALSE(slots.set_memory_region(region(1, 0, 2 * kMiB)).ok());    // resize
  EXPECT_FALSE(slots.set_memory_region(region(9, 0, 0)).ok());           // absent
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), std::nullopt);
  EXPECT_EQ(slots.generation(0), gen);
}

}  // namespace
}  // namespace gfnmap
