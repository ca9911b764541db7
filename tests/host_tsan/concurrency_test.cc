// gfnmap tests, host_tsan: SimHost used from many threads at once (GUP/put against munmap,
// CoW breaks, notifier registration, fixup lock drops, aging); run under TSan.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "gfnmap/sim_host.h"

namespace gfnmap {
namespace {

constexpr uint64_t kPages = 16;
constexpr int kIters = 300;

// Checks the notifier protocol under concurrency: per range, starts and ends balance, ranges are
// page aligned, nothing arrives after release/unregister.
class BalanceNotifier : public MmuNotifier {
 public:
  void invalidate_range_start(Hva start, Hva end) override {
    check(start, end);
    std::lock_guard l(mu_);
    ++open_[{start.value, end.value}];
    ++starts_;
  }
  void invalidate_range_end(Hva start, Hva end) override {
    check(start, end);
    std::lock_guard l(mu_);
    auto it = open_.find({start.value, end.value});
    if (it == open_.end() || it->second == 0) {
      ++unmatched_;
      return;
    }
    if (--it->second == 0) open_.erase(it);
  }
  bool clear_young(Hva start, Hva end) override {
    check(start, end);
    return true;
  }
  bool clear_flush_young(Hva start, Hva end) override {
    check(start, end);
    return true;
  }
  bool test_young(Hva start, Hva end) override {
    check(start, end);
    return false;
  }

  void retire() { retired_.store(true); }
  uint64_t starts() {
    std::lock_guard l(mu_);
    return starts_;
  }
  void expect_balanced() {
    std::lock_guard l(mu_);
    EXPECT_TRUE(open_.empty()) << open_.size() << " ranges started and never ended";
    EXPECT_EQ(unmatched_, 0u);
    EXPECT_EQ(bad_.load(), 0u);
    EXPECT_EQ(late_.load(), 0u) << "callbacks after unregister_notifier returned";
  }

 private:
  void check(Hva start, Hva end) {
    if (start.value % kPageSize || end.value % kPageSize || !(start < end)) ++bad_;
    if (retired_.load()) ++late_;
  }
  std::mutex mu_;
  std::map<std::pair<uint64_t, uint64_t>, int> open_;
  uint64_t starts_ = 0;
  uint64_t unmatched_ = 0;
  std::atomic<uint64_t> bad_{0};
  std::atomic<uint64_t> late_{0};
  std::atomic<bool> retired_{false};
};

// GUP (read/write, get/pin, nowait) + put from several threads while another thread munmaps,
// re-mmaps at the same place, discards and mprotects the range. Every reference handed out
// is put exactly once; the model records no violation; notifier brackets balance.
TEST(SimHostConcurrency, Invariant02_GupAndPutAgainstMunmapKeepReferencesBalanced) {
  SimHost mm;
  BalanceNotifier n;
  mm.register_notifier(&n);
  const Hva base = *mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> got{0};

  std::vector<std::thread> workers;
  for (int t = 0; t < 3; ++t) {
    workers.emplace_back([&, t] {
      for (uint64_t i = 0; !stop.load(); ++i) {
        const Hva hva = base + ((i * 7 + t) % kPages) * kPageSize;
        FollFlags flags = kFollHwpoison;
        if ((i + t) % 2) flags |= kFollWrite;
        if (i % 5 == 0) flags |= kFollPin;
        if (i % 11 == 0) flags |= kFollNowait;
        Page page;
        long r = mm.get_user_pages_unlocked(hva, flags, &page);
        if (r == 1) {
          ++got;
          if (std::byte* p = mm.page_address(page.pfn, hva); p && (flags & kFollWrite)) {
            p[t] = std::byte{1};  // the frame stays alive while referenced
          }
          if (!mm.page_reserved(page)) mm.mark_page_accessed(page);  // not the zero page
          mm.put_page(page);
        } else {
          EXPECT_TRUE(r == -EFAULT || r == 0) << r;  // unmapped / PROT_READ write / nowait
        }
        if (mm.get_user_page_fast_only(hva, kFollWrite, &page)) mm.put_page(page);
      }
    });
  }
  std::thread changer([&] {
    for (int i = 0; i < kIters; ++i) {
      switch (i % 4) {
        case 0:
          EXPECT_TRUE(mm.munmap(base, kPages * kPageSize));
          break;
        case 1: {
          MmapOptions o;
          o.fixed = base;
          EXPECT_TRUE(mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kAnonPrivate, o));
          break;
        }
        case 2:
          EXPECT_TRUE(mm.discard(base, kPages * kPageSize));
          break;
        case 3:
          EXPECT_TRUE(mm.mprotect(base, kPages * kPageSize, (i % 8 == 3) ? Prot::kRead : kProtRW));
          break;
      }
    }
    stop.store(true);
  });
  changer.join();
  for (auto& w : workers) w.join();
  mm.unregister_notifier(&n);
  n.retire();
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
  n.expect_balanced();
  EXPECT_GT(n.starts(), 0u);
}

// Write GUPs break CoW while other threads re-share the pages and fast-lookup them: at most
// one thread replaces a given PTE's frame, and every reference comes back.
TEST(SimHostConcurrency, Row07_ConcurrentCowBreaksAndFastLookups) {
  SimHost mm;
  BalanceNotifier n;
  mm.register_notifier(&n);
  const Hva base = *mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  ASSERT_TRUE(mm.populate(base, kPages * kPageSize, true));
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; ++t) {
    workers.emplace_back([&, t] {
      for (uint64_t i = 0; !stop.load(); ++i) {
        const Hva hva = base + ((i + t * 3) % kPages) * kPageSize;
        Page page;
        if (mm.get_user_pages_unlocked(hva, kFollWrite | kFollHwpoison, &page) == 1) {
          mm.set_page_dirty(page);
          mm.put_page(page);
        }
        if (mm.get_user_page_fast_only(hva, kFollWrite, &page)) {
          mm.put_page(page);
        }
      }
    });
  }
  std::thread sharer([&] {
    for (int i = 0; i < kIters; ++i) {
      EXPECT_TRUE(mm.make_cow_shared(base + (i % kPages) * kPageSize));
      if (i % 16 == 15) mm.age_range(base, base + kPages * kPageSize, i % 32 == 31);
    }
    stop.store(true);
  });
  sharer.join();
  for (auto& w : workers) w.join();
  mm.unregister_notifier(&n);
  n.retire();
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
  n.expect_balanced();
}

// Notifiers come and go while invalidations and aging run: after unregister_notifier returns,
// the notifier gets no callback (it may be destroyed).
TEST(SimHostConcurrency, Invariant17_UnregisterWaitsForRunningCallbacks) {
  SimHost mm;
  const Hva base = *mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kAnonShared);
  std::atomic<bool> stop{false};
  std::thread changer([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      const Hva hva = base + (i % kPages) * kPageSize;
      EXPECT_TRUE(mm.populate(hva, kPageSize, true));
      EXPECT_TRUE(mm.discard(hva, kPageSize));
      mm.age_range(base, base + kPages * kPageSize, i % 2);
      (void)mm.test_young(base, base + kPageSize);
    }
  });
  for (int i = 0; i < kIters / 3; ++i) {
    auto n = std::make_unique<BalanceNotifier>();
    mm.register_notifier(n.get());
    std::this_thread::yield();
    mm.unregister_notifier(n.get());
    n->retire();
    n->expect_balanced();  // nothing in flight: every start it saw has its end
  }
  stop.store(true);
  changer.join();
  EXPECT_EQ(mm.violations(), 0u);
}

// Row 19 under concurrency: the faulting thread's lock drop lets a writer (the callback and an
// independent thread) change the VMA; other threads keep GUPing. No deadlock, no violation.
TEST(SimHostConcurrency, Row19_FixupLockDropWhileOthersRun) {
  SimHost mm;
  BalanceNotifier n;
  mm.register_notifier(&n);
  MmapOptions dev;
  dev.ptes_present = false;
  const Hva pfnmap = *mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kPfnmap, dev);
  const Hva anon = *mm.mmap(kPages * kPageSize, kProtRW, VmaKind::kAnonPrivate);
  std::atomic<bool> stop{false};
  std::thread gupper([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      Page page;
      if (mm.get_user_pages_unlocked(anon + (i % kPages) * kPageSize, kFollWrite, &page) == 1) {
        mm.put_page(page);
      }
    }
  });
  std::thread zapper([&] {
    for (uint64_t i = 0; !stop.load(); ++i) {
      (void)mm.zap_pfnmap(pfnmap + (i % kPages) * kPageSize);  // may race a replacement
    }
  });
  for (int i = 0; i < kIters / 3; ++i) {
    const Hva hva = pfnmap + (i % kPages) * kPageSize;
    FixupInjection inj;
    inj.drop_lock_times = 2;
    inj.while_unlocked = [&](SimHost& h) { (void)h.zap_pfnmap(hva); };
    ASSERT_TRUE(mm.inject_fixup(hva, std::move(inj)));
    ASSERT_TRUE(mm.zap_pfnmap(hva));  // only fixup_user_fault installs it again
    mm.mmap_read_lock();
    int drops = 0;
    for (int tries = 0; tries < 4; ++tries) {
      bool unlocked = false;
      PfnmapPte pte;
      if (mm.follow_pfnmap(hva, &pte) == 0) break;
      EXPECT_EQ(mm.fixup_user_fault(hva, true, &unlocked), 0);
      drops += unlocked;
    }
    mm.mmap_read_unlock();
    EXPECT_EQ(drops, 2);
  }
  stop.store(true);
  gupper.join();
  zapper.join();
  mm.unregister_notifier(&n);
  n.retire();
  EXPECT_EQ(mm.outstanding_refs(), 0u);
  EXPECT_EQ(mm.violations(), 0u);
  n.expect_balanced();
}

// Per-thread signals: a fatal signal on one thread interrupts only that thread's GUPs.
TEST(SimHostConcurrency, Row10_ThreadSignalsAreIndependent) {
  SimHost mm;
  const Hva base = *mm.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  long killed = 1;
  long alive = 0;
  std::thread a([&] {
    mm.set_thread_signal(std::this_thread::get_id(), SignalState::kFatal);
    ++ready;
    while (!go.load()) std::this_thread::yield();
    Page page;
    killed = mm.get_user_pages_unlocked(base, kFollWrite, &page);
  });
  std::thread b([&] {
    ++ready;
    while (!go.load()) std::this_thread::yield();
    Page page;
    alive = mm.get_user_pages_unlocked(base, kFollWrite, &page);
    if (alive == 1) mm.put_page(page);
  });
  while (ready.load() < 2) std::this_thread::yield();
  go.store(true);
  a.join();
  b.join();
  EXPECT_EQ(killed, -EINTR);
  EXPECT_EQ(alive, 1);
  EXPECT_EQ(mm.outstanding_refs(), 0u);
}

}  // namespace
}  // namespace gfnmap
