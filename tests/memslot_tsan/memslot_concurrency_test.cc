// gfnmap memslot concurrency tests (run under TSan and ASan): lock-free readers against a
// writer, swaps waiting for invalidation windows and for readers of the old set (spec 7.3, 8.2).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "memslot/memslot_test_util.h"

namespace gfnmap {
namespace {

using test::kHvaBase;
using test::region;

constexpr uint32_t kIds = 16;
constexpr uint64_t kSlotStride = 64;  // pages between home positions
constexpr uint64_t kMiB = 1 << 20;

// Every slot id has a fixed shape and two homes (A, B), so a reader can tell a torn or stale
// slot from a real one: npages = 16 + id, hva = base + id MiB (ids 8.. share ids 0..'s memory).
uint64_t npages_of(uint16_t id) { return 16 + id; }
uint64_t hva_of(uint16_t id) { return kHvaBase + (id % 8) * kMiB; }
uint64_t home_a(uint16_t id) { return id * kSlotStride; }
uint64_t home_b(uint16_t id) { return (kIds + id) * kSlotStride; }

// A reader's checks of one set it holds: well-formed, slots of the known family, every lookup
// consistent with a scan of that same (immutable) set.
void check_set(const MemslotSet& set, unsigned as, std::mt19937_64& rng, VcpuMemslotCache& cache) {
  ASSERT_EQ(set.as_id(), as);
  const auto slots = set.slots();
  for (size_t i = 0; i < slots.size(); ++i) {
    const Memslot& s = slots[i];
    ASSERT_LT(s.id, kIds);
    ASSERT_EQ(s.as_id, as);
    ASSERT_EQ(s.npages, npages_of(s.id));
    ASSERT_EQ(s.userspace_addr.value, hva_of(s.id));
    ASSERT_TRUE(s.base_gfn.value == home_a(s.id) || s.base_gfn.value == home_b(s.id));
    ASSERT_EQ(s.flags & ~(kMemLogDirtyPages | kMemslotInvalid), 0u);
    if (i > 0) {
      ASSERT_LE(slots[i - 1].end_gfn(), s.base_gfn);  // invariant 20
    }
    ASSERT_EQ(set.id_to_memslot(s.id), &s);
  }
  for (int k = 0; k < 8; ++k) {
    const Gfn gfn(rng() % (2 * kIds * kSlotStride));
    const Memslot* want = nullptr;
    for (const Memslot& s : slots) {
      if (s.contains(gfn)) want = &s;
    }
    ASSERT_EQ(set.search_memslots(gfn), want);
    ASSERT_EQ(set.gfn_to_memslot(gfn), want);
    ASSERT_EQ(set.vcpu_gfn_to_memslot(cache, gfn), want);
    if (want && want->invalid()) {
      ASSERT_EQ(gfn_to_hva_memslot(want, gfn), kHvaErrBad);
    }
  }
  const uint64_t qs = kHvaBase + rng() % (9 * kMiB);
  const uint64_t qe = qs + rng() % kMiB;
  size_t got = 0;
  set.for_each_hva_overlap(Hva(qs), Hva(qe), [&](const Memslot&) { ++got; });
  const size_t want = static_cast<size_t>(std::count_if(
      slots.begin(), slots.end(), [&](const Memslot& s) {
        return s.userspace_addr.value < qe && s.hva_end().value > qs;
      }));
  ASSERT_EQ(got, want);
}

// Random CREATE / MOVE / FLAGS_ONLY / DELETE calls over the slot family.
void writer_step(Memslots& slots, unsigned nr_as, std::mt19937_64& rng) {
  const auto id = static_cast<uint16_t>(rng() % kIds);
  const auto as = static_cast<uint32_t>(rng() % nr_as);
  const bool at_b = rng() % 2;
  const uint64_t gpa = (at_b ? home_b(id) : home_a(id)) * kPageSize;
  const uint32_t flags = rng() % 2 ? kMemLogDirtyPages : 0;
  const uint64_t size = rng() % 4 == 0 ? 0 : npages_of(id) * kPageSize;
  auto r = slots.set_memory_region(region(id, gpa, size, hva_of(id), flags, as));
  // Only a DELETE of an absent slot can fail in this family.
  if (!r.ok()) {
    ASSERT_EQ(r.code(), EINVAL) << error_to_string(r.error());
  }
}

TEST(MemslotConcurrency, ReadersNeverSeeTornOrFreedSetsWhileWriterAndInvalidationsRun) {
  MemslotsConfig config;
  config.nr_address_spaces = 2;
  Memslots slots(config);
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0};

  // Two readers and short pauses outside their sections: on 2 shared cores a reader preempted
  // inside its section holds up every grace period for a time slice (as SRCU would).
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      VcpuMemslotCache cache;
      uint64_t last_gen[2] = {0, 1};
      while (!stop.load(std::memory_order_relaxed)) {
        if (rng() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20));
        auto lock = slots.read_lock();
        const unsigned as = rng() % 2;
        const MemslotSet& set = lock.set(as);
        // Generations only move forward, as seen by one reader (bit 63 masked: a set is first
        // seen in progress, then final).
        const uint64_t gen = set.generation() & ~kMemslotGenUpdateInProgress;
        ASSERT_GE(gen, last_gen[as]);
        ASSERT_EQ(gen % 2, as);
        last_gen[as] = gen;
        check_set(set, as, rng, cache);
        reads.fetch_add(1, std::memory_order_relaxed);
        if (rng() % 4 == 0) {
          auto nested = slots.read_lock();  // sections nest; the inner one may see a newer set
          check_set(nested.set(as), as, rng, cache);
        }
      }
    });
  }

  // Invalidation windows: between mn_invalidate_begin and _end the published set of every
  // address space stays the same object (spec 8.2: start and end see the same memslots).
  std::thread invalidator([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      slots.mn_invalidate_begin();
      const MemslotSet* at_start[2];
      {
        auto lock = slots.read_lock();
        at_start[0] = &lock.set(0);
        at_start[1] = &lock.set(1);
      }
      std::this_thread::yield();
      {
        auto lock = slots.read_lock();
        ASSERT_EQ(&lock.set(0), at_start[0]);
        ASSERT_EQ(&lock.set(1), at_start[1]);
      }
      slots.mn_invalidate_end();
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // let the writer in
    }
  });

  std::mt19937_64 rng(7);
  for (int i = 0; i < 1500; ++i) writer_step(slots, 2, rng);
  // Let readers see the final state too.
  while (reads.load() < 100) std::this_thread::yield();
  stop = true;
  for (auto& t : readers) t.join();
  invalidator.join();
  EXPECT_EQ(slots.mn_active_invalidate_count(), 0);
}

// Signals, from inside a swap, whether the condition the swap must wait for had been met.
class SwapObserver : public MemslotListener {
 public:
  explicit SwapObserver(std::atomic<bool>& ready) : ready_(ready) {}
  void memslots_updated(unsigned, uint64_t) override {
    ++swaps;
    if (!ready_.load()) early = true;
  }
  std::atomic<int> swaps{0};
  std::atomic<bool> early{false};

 private:
  std::atomic<bool>& ready_;
};

TEST(MemslotConcurrency, SwapWaitsForInvalidationEndAndReadersDoNotBlockMeanwhile) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  std::atomic<bool> ended{false};
  SwapObserver observer(ended);
  slots.add_listener(&observer);

  slots.mn_invalidate_begin();
  slots.mn_invalidate_begin();  // nested windows: the swap waits for the count to reach 0
  std::thread writer([&] {
    ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, 0)), MemslotChange::kDelete);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  // The writer is parked before its first publish; readers go on, and see the old slot.
  {
    auto lock = slots.read_lock();
    const Memslot* s = lock.set().gfn_to_memslot(Gfn(0));
    ASSERT_NE(s, nullptr);
    EXPECT_FALSE(s->invalid());
  }
  EXPECT_EQ(observer.swaps.load(), 0);
  slots.mn_invalidate_end();
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(observer.swaps.load(), 0) << "one window is still open";
  ended = true;
  slots.mn_invalidate_end();
  writer.join();
  EXPECT_FALSE(observer.early.load()) << "a swap was published inside an invalidation window";
  EXPECT_EQ(observer.swaps.load(), 2);
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set().size(), 0u);
}

TEST(MemslotConcurrency, SwapWaitsForEveryReaderOfTheOldSet) {
  Memslots slots;
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 0, kMiB)), MemslotChange::kCreate);
  std::atomic<bool> released{false};
  SwapObserver observer(released);
  slots.add_listener(&observer);

  std::atomic<bool> holding{false};
  std::thread reader([&] {
    auto lock = slots.read_lock();
    const MemslotSet& old_set = lock.set();
    const Memslot* s = old_set.gfn_to_memslot(Gfn(5));
    holding = true;
    // The writer publishes a MOVE meanwhile; this section's set stays alive and unchanged.
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->base_gfn, Gfn(0));
    EXPECT_EQ(old_set.size(), 1u);
    EXPECT_EQ(old_set.gfn_to_memslot(Gfn(5)), s);
    released = true;
  });
  while (!holding.load()) std::this_thread::yield();
  ASSERT_MEMSLOT_OK(slots.set_memory_region(region(1, 4 * kMiB, kMiB)), MemslotChange::kMove);
  reader.join();
  EXPECT_FALSE(observer.early.load()) << "memslots_updated ran before the old set's reader left";
  EXPECT_EQ(observer.swaps.load(), 2);
}

TEST(MemslotConcurrency, ConcurrentWritersSerialise) {
  MemslotsConfig config;
  config.nr_user_slots = 64;
  Memslots slots(config);
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      for (uint32_t k = 0; k < 16; ++k) {
        const uint32_t id = t * 16 + k;
        ASSERT_MEMSLOT_OK(slots.set_memory_region(region(id, id * kMiB, kMiB, kHvaBase)),
                          MemslotChange::kCreate);
      }
    });
  }
  for (auto& w : writers) w.join();
  auto lock = slots.read_lock();
  EXPECT_EQ(lock.set().size(), 64u);
  EXPECT_EQ(slots.nr_memslot_pages(), 64 * kMiB / kPageSize);
  EXPECT_EQ(slots.generation(0), 64u);
}

}  // namespace
}  // namespace gfnmap
