// gfnmap memslot concurrency tests (run under TSan, and in release builds with the membarrier
// protocol where the kernel has it): the SRCU grace-period guarantee. A writer publishes a new
// object, waits for a grace period, then poisons the old one (plain writes) and reuses it later;
// readers on several threads check, for as long as their section lasts, that the object they
// loaded is whole and never poisoned. A reader still inside its section when the old object is
// poisoned would see it (every build) and race with the writer's plain writes (TSan).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "memslot/srcu.h"

namespace gfnmap::detail {
namespace {

constexpr uint64_t kPoison = 0xdeaddeaddeaddeadULL;

// Plain words, all equal to the object's value while it is published or may be read.
struct Payload {
  uint64_t words[8];
  void fill(uint64_t v) {
    for (uint64_t& w : words) w = v;
  }
};

// Returns the value the section saw, after checking the object again and again (the writer must
// not poison or refill it meanwhile).
uint64_t check_payload(const Payload* p, unsigned rereads) {
  const uint64_t v = p->words[0];
  EXPECT_NE(v, kPoison) << "a reader inside its section loaded a poisoned object";
  for (unsigned r = 0; r <= rereads; ++r) {
    for (uint64_t w : p->words) {
      if (w != v) {
        ADD_FAILURE() << "object changed under a reader: " << std::hex << v << " -> " << w;
        return v;
      }
    }
  }
  return v;
}

struct Rig {
  explicit Rig(Srcu::Mode mode) : srcu(mode) {
    for (Payload& p : pool) p.fill(kPoison);
    pool[0].fill(1);
    current.store(&pool[0]);
  }

  // Publishes a fresh object, waits a grace period, poisons the old one; objects are reused
  // round-robin, so a poisoned object is refilled a few grace periods later. Runs at least
  // `grace_periods` times and until readers have completed `sections` sections meanwhile.
  void writer(int grace_periods, long min_sections) {
    uint64_t value = 1;
    size_t next = 1;
    for (int i = 0; i < grace_periods || sections.load() < min_sections; ++i) {
      Payload* fresh = &pool[next];
      next = (next + 1) % std::size(pool);
      fresh->fill(++value);
      Payload* old = current.exchange(fresh, std::memory_order_seq_cst);  // W
      srcu.synchronize();
      old->fill(kPoison);  // no reader of `old` may remain
    }
  }

  Srcu srcu;
  Payload pool[4];
  std::atomic<Payload*> current{nullptr};
  std::atomic<bool> stop{false};
  std::atomic<long> sections{0};
};

// One reader section: load, check while holding it (sometimes with a nested section that may
// see a newer object), end.
void read_section(Rig& rig, std::mt19937_64& rng) {
  const unsigned token = rig.srcu.read_lock();
  const Payload* p = rig.current.load(std::memory_order_seq_cst);  // L
  const uint64_t seen = check_payload(p, static_cast<unsigned>(rng() % 16));
  if (rng() % 4 == 0) {
    const unsigned inner = rig.srcu.read_lock();
    const Payload* q = rig.current.load(std::memory_order_seq_cst);
    EXPECT_GE(check_payload(q, 2), seen) << "a nested section saw an older object";
    rig.srcu.read_unlock(inner);
  }
  if (rng() % 64 == 0) std::this_thread::yield();  // preempted inside the section
  check_payload(p, 1);
  rig.srcu.read_unlock(token);
  rig.sections.fetch_add(1, std::memory_order_relaxed);
}

class SrcuGracePeriod : public ::testing::TestWithParam<Srcu::Mode> {};

std::string mode_name(const ::testing::TestParamInfo<Srcu::Mode>& param) {
  return param.param == Srcu::Mode::kAuto ? "Auto" : "SeqCst";
}

INSTANTIATE_TEST_SUITE_P(Modes, SrcuGracePeriod,
                         ::testing::Values(Srcu::Mode::kAuto, Srcu::Mode::kSeqCst), mode_name);

TEST_P(SrcuGracePeriod, NoReaderSeesAnObjectPoisonedAfterAGracePeriod) {
  Rig rig(GetParam());
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&rig, t] {
      std::mt19937_64 rng(1000 + t);
      while (!rig.stop.load(std::memory_order_relaxed)) read_section(rig, rng);
    });
  }
  rig.writer(1500, 3000);
  rig.stop = true;
  for (auto& t : readers) t.join();
}

// Sections handed to another thread, which checks the object and ends the section there (a
// MemslotsReadLock moved across threads): the unlock counts on the finishing thread.
TEST_P(SrcuGracePeriod, SectionsEndedOnAnotherThreadAreWaitedFor) {
  Rig rig(GetParam());
  struct Handoff {
    unsigned token;
    const Payload* p;
    uint64_t seen;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Handoff> queue;
  bool done = false;

  std::thread starter([&] {
    std::mt19937_64 rng(5);
    while (!rig.stop.load(std::memory_order_relaxed)) {
      const unsigned token = rig.srcu.read_lock();
      const Payload* p = rig.current.load(std::memory_order_seq_cst);
      const uint64_t seen = check_payload(p, 2);
      std::unique_lock lk(mu);
      cv.wait(lk, [&] { return queue.size() < 4; });
      queue.push_back({token, p, seen});
      cv.notify_all();
    }
    std::lock_guard lk(mu);
    done = true;
    cv.notify_all();
  });
  std::thread finisher([&] {
    std::mt19937_64 rng(6);
    for (;;) {
      Handoff h;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return !queue.empty() || done; });
        if (queue.empty()) return;
        h = queue.front();
        queue.pop_front();
        cv.notify_all();
      }
      EXPECT_EQ(check_payload(h.p, static_cast<unsigned>(rng() % 8)), h.seen);
      rig.srcu.read_unlock(h.token);
      rig.sections.fetch_add(1, std::memory_order_relaxed);
    }
  });
  std::thread reader([&] {
    std::mt19937_64 rng(7);
    while (!rig.stop.load(std::memory_order_relaxed)) read_section(rig, rng);
  });

  rig.writer(500, 1000);
  rig.stop = true;
  starter.join();
  finisher.join();
  reader.join();
}

// Readers on threads that found every reader slot taken use the shared atomic counts.
TEST_P(SrcuGracePeriod, ReadersWithoutASlotOfTheirOwnAreWaitedFor) {
  Rig rig(GetParam());
  // Hold every free reader slot with idle threads.
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  std::atomic<unsigned> parked{0};
  std::atomic<unsigned> got_slot{0};
  std::vector<std::thread> holders;
  for (unsigned t = 0; t < Srcu::kReaderSlots; ++t) {
    holders.emplace_back([&] {
      rig.srcu.read_unlock(rig.srcu.read_lock());
      if (Srcu::this_thread_slot() < Srcu::kReaderSlots) got_slot.fetch_add(1);
      parked.fetch_add(1);
      std::unique_lock lk(mu);
      cv.wait(lk, [&] { return release; });
    });
  }
  while (parked.load() < Srcu::kReaderSlots) std::this_thread::yield();

  std::vector<std::thread> readers;
  std::atomic<unsigned> shared{0};
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&rig, &shared, t] {
      std::mt19937_64 rng(2000 + t);
      read_section(rig, rng);
      if (Srcu::this_thread_slot() == Srcu::kShared) shared.fetch_add(1);
      while (!rig.stop.load(std::memory_order_relaxed)) read_section(rig, rng);
    });
  }
  rig.writer(500, 1000);
  rig.stop = true;
  for (auto& t : readers) t.join();
  EXPECT_EQ(shared.load(), 2u) << "both readers should have found every slot taken ("
                               << got_slot.load() << " holders got one)";
  {
    std::lock_guard lk(mu);
    release = true;
  }
  cv.notify_all();
  for (auto& t : holders) t.join();
}

}  // namespace
}  // namespace gfnmap::detail
