// gfnmap MMU stress scenario (shared by the tsan suite and the soak): vCPUs write random gfns
// while other threads invalidate hva ranges, move and delete slots and harvest dirty logs.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"

namespace gfnmap::test {

struct StressParams {
  unsigned duration_ms = 1500;
  unsigned nr_vcpus = 2;
  uint64_t pages_per_slot = 64;
  bool pte_prefetch = false;  // MmuOptions::pte_prefetch (maps present neighbours on faults)
  bool guest_mode = false;    // vCPUs access through a Vcpu::GuestMode held for the whole run
  // Pause of the invalidating thread between two invalidations. 0 keeps one in progress most of
  // the time on a 2-core machine; the PTE prefetch needs windows without any.
  unsigned invalidation_gap_us = 0;
};

struct StressResult {
  uint64_t writes = 0;
  uint64_t mmio_exits = 0;
  uint64_t invalidations = 0;
  uint64_t moves = 0;
  uint64_t deletes = 0;
  uint64_t harvests = 0;
  uint64_t pte_prefetches = 0;  // leaves the PTE prefetch installed
};

// Slots 0..2 log dirty pages and move between two gpa homes of their own; slot 3 does not log
// and is deleted and re-created. All four map one memfd (kAnonShared), so host invalidations
// (discard, write_protect) never lose data: every page must end with the last value each vCPU
// wrote to its own word of it.
class StressScenario {
 public:
  static constexpr unsigned kSlots = 4;
  static constexpr unsigned kLoggedSlots = 3;

  explicit StressScenario(StressParams p) : p_(p) {}

  StressResult run() {
    StressResult res;
    const uint64_t slot_bytes = p_.pages_per_slot * kPageSize;
    auto memfd = host_.create_memfd(kSlots * slot_bytes);
    EXPECT_TRUE(memfd.ok());
    MmapOptions mo;
    mo.file = *memfd;
    auto hva = host_.mmap(kSlots * slot_bytes, kProtRW, VmaKind::kAnonShared, mo);
    EXPECT_TRUE(hva.ok());
    base_hva_ = *hva;
    dirty_ = std::make_unique<DirtyLog>(slots_);
    MmuOptions o;
    o.dirty = dirty_.get();
    o.pte_prefetch = p_.pte_prefetch;
    mmu_ = std::make_unique<Mmu>(slots_, host_, o);
    checker_.owner = this;
    host_.register_notifier(&checker_);
    for (unsigned s = 0; s < kSlots; ++s) {
      EXPECT_TRUE(set(s, home(s, 0), s < kLoggedSlots ? kMemLogDirtyPages : 0).ok());
      pos_[s] = 0;
    }
    harvested_.resize(kSlots);
    for (auto& h : harvested_) h.assign(p_.pages_per_slot, false);

    std::atomic<bool> stop{false};
    struct VcpuState {
      std::vector<uint64_t> last;  // [slot * pages + page] = last value written
      uint64_t writes = 0, mmio = 0;
    };
    std::vector<VcpuState> vs(p_.nr_vcpus);
    std::vector<std::thread> threads;
    for (unsigned v = 0; v < p_.nr_vcpus; ++v) {
      vs[v].last.assign(kSlots * p_.pages_per_slot, 0);
      threads.emplace_back([&, v] {
        Vcpu vcpu(*mmu_, v);
        std::optional<Vcpu::GuestMode> gm;
        if (p_.guest_mode) gm.emplace(vcpu);
        std::mt19937_64 rng(1234 + v);
        uint64_t counter = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          unsigned s = static_cast<unsigned>(rng() % kSlots);
          uint64_t page = rng() % p_.pages_per_slot;
          unsigned where = static_cast<unsigned>(rng() % 2);
          Gpa gpa(home(s, where) + page * kPageSize + v * 8);
          uint64_t value = ++counter;
          VcpuExit ex = gm ? gm->write_u64(gpa, value) : vcpu.write_u64(gpa, value);
          if (ex.ok()) {
            vs[v].last[s * p_.pages_per_slot + page] = value;
            ++vs[v].writes;
          } else {
            EXPECT_EQ(ex.reason, ExitReason::kMmio) << to_string(ex.reason);
            ++vs[v].mmio;
          }
        }
      });
    }
    threads.emplace_back([&] {  // host invalidations
      std::mt19937_64 rng(99);
      while (!stop.load(std::memory_order_relaxed)) {
        uint64_t total = kSlots * p_.pages_per_slot;
        uint64_t first = rng() % total;
        uint64_t n = 1 + rng() % std::min<uint64_t>(16, total - first);
        Hva h = base_hva_ + first * kPageSize;
        bool ok = (rng() % 2) ? host_.discard(h, n * kPageSize).ok()
                              : host_.write_protect(h, n * kPageSize).ok();
        EXPECT_TRUE(ok);
        ++res.invalidations;
        if (p_.invalidation_gap_us != 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(p_.invalidation_gap_us));
        }
      }
    });
    threads.emplace_back([&] {  // memslot moves and deletes
      std::mt19937_64 rng(7);
      while (!stop.load(std::memory_order_relaxed)) {
        unsigned s = static_cast<unsigned>(rng() % kSlots);
        std::lock_guard g(slot_mu_);
        if (s < kLoggedSlots) {
          pos_[s] ^= 1;
          EXPECT_TRUE(set(s, home(s, pos_[s]), kMemLogDirtyPages).ok());
          ++res.moves;
        } else {
          EXPECT_TRUE(set_size(s, home(s, 0), 0, 0).ok());
          std::this_thread::yield();
          EXPECT_TRUE(set(s, home(s, 0), 0).ok());
          ++res.deletes;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
    threads.emplace_back([&] {  // dirty-log harvests
      while (!stop.load(std::memory_order_relaxed)) {
        harvest();
        ++res.harvests;
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(p_.duration_ms));
    stop = true;
    for (auto& t : threads) t.join();
    harvest();

    // No write lost: in some harvested log (logged slots) and intact in memory (all slots).
    for (unsigned s = 0; s < kSlots; ++s) {
      for (uint64_t page = 0; page < p_.pages_per_slot; ++page) {
        bool written = false;
        for (unsigned v = 0; v < p_.nr_vcpus; ++v) {
          uint64_t want = vs[v].last[s * p_.pages_per_slot + page];
          if (want == 0) continue;
          written = true;
          uint64_t got = 0;
          Gpa gpa(home(s, pos_[s]) + page * kPageSize + v * 8);
          VcpuExit ex = mmu_->read_guest(gpa, {reinterpret_cast<std::byte*>(&got), 8});
          EXPECT_TRUE(ex.ok()) << to_string(ex.reason);
          EXPECT_EQ(got, want) << "lost write: slot " << s << " page " << page << " vcpu " << v;
        }
        if (written && s < kLoggedSlots) {
          EXPECT_TRUE(harvested_[s][page]) << "written page missing from every harvested log: slot "
                                           << s << " page " << page;
        }
      }
    }
    for (auto& st : vs) {
      res.writes += st.writes;
      res.mmio_exits += st.mmio;
    }
    EXPECT_EQ(checker_.survivors.load(), 0u) << "an entry survived invalidate_range_start";
    EXPECT_GT(checker_.checks.load(), 0u);
    MmuStats st = mmu_->stats();
    EXPECT_EQ(st.faults, st.installs + st.retries + st.exits + st.async_queued + st.async_halts)
        << "counters do not balance";
    res.pte_prefetches = st.pte_prefetches;
    EXPECT_EQ(mmu_->invalidate_in_progress(), 0);
    EXPECT_EQ(slots_.mn_active_invalidate_count(), 0);
    host_.unregister_notifier(&checker_);
    mmu_.reset();
    dirty_.reset();
    EXPECT_EQ(host_.outstanding_refs(), 0u) << "reference leak";
    EXPECT_EQ(host_.violations(), 0u)
        << (host_.violations() ? host_.violation_log()[0].what : std::string());
    return res;
  }

 private:
  // Registered with the host after the Mmu: its start runs after the Mmu's returned.
  struct Checker : MmuNotifier {
    StressScenario* owner = nullptr;
    std::atomic<uint64_t> checks{0};
    std::atomic<uint64_t> survivors{0};
    void invalidate_range_start(Hva start, Hva end) override {
      MemslotsReadLock rl = owner->slots_.read_lock();
      rl.set(0).for_each_hva_overlap(start, end, [&](const Memslot& s) {
        uint64_t lo = std::max(start.value, s.userspace_addr.value);
        uint64_t hi = std::min(end.value, s.hva_end().value);
        if (lo >= hi) return;
        Gfn g0 = s.base_gfn + ((lo - s.userspace_addr.value) >> kPageShift);
        Gfn g1 = s.base_gfn + ((hi - s.userspace_addr.value + kPageSize - 1) >> kPageShift);
        checks.fetch_add(1);
        survivors.fetch_add(owner->mmu_->count_mapped(0, g0, g1));
      });
    }
    void invalidate_range_end(Hva, Hva) override {}
  };

  uint64_t home(unsigned s, unsigned where) const {
    return (uint64_t{1} << 32) + (uint64_t{s} * 2 + where) * (uint64_t{1} << 30);
  }
  Result<std::optional<MemslotChange>> set(unsigned s, uint64_t gpa, uint32_t flags) {
    return set_size(s, gpa, p_.pages_per_slot * kPageSize, flags);
  }
  Result<std::optional<MemslotChange>> set_size(unsigned s, uint64_t gpa, uint64_t size,
                                                uint32_t flags) {
    UserspaceMemoryRegion r;
    r.slot = s;
    r.flags = flags;
    r.guest_phys_addr = gpa;
    r.memory_size = size;
    r.userspace_addr = base_hva_.value + s * p_.pages_per_slot * kPageSize;
    return slots_.set_memory_region(r);
  }
  void harvest() {
    std::vector<uint64_t> bm(dirty_bitmap_words(p_.pages_per_slot));
    for (unsigned s = 0; s < kLoggedSlots; ++s) {
      auto r = dirty_->get_dirty_log(s, bm);
      EXPECT_TRUE(r.ok()) << error_to_string(r.error());
      std::lock_guard g(harvest_mu_);
      for (uint64_t page = 0; page < p_.pages_per_slot; ++page) {
        if (bm[page / 64] & (uint64_t{1} << (page % 64))) harvested_[s][page] = true;
      }
    }
  }

  StressParams p_;
  SimHost host_;
  Memslots slots_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  Checker checker_;
  Hva base_hva_;
  std::mutex slot_mu_;
  unsigned pos_[kSlots] = {};
  std::mutex harvest_mu_;
  std::vector<std::vector<bool>> harvested_;
};

}  // namespace gfnmap::test
