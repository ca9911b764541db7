// gfnmap async_pf tests: a tiny HostMm whose slow path answers per hva (success with a counted
// reference, or an errno) and can be held at a gate, so tests control when workers finish.
#pragma once

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <map>
#include <mutex>

#include "gfnmap/host.h"

namespace gfnmap::testing_apf {

class FakeHost : public HostMm {
 public:
  // get_user_pages_unlocked: blocks while the gate is closed; returns the errno set for the hva
  // (negative), else 1 with a reference.
  long get_user_pages_unlocked(Hva hva, FollFlags gup_flags, Page* page) override {
    {
      std::unique_lock<std::mutex> lk(mu_);
      ++entered_;
      cv_.notify_all();
      cv_.wait(lk, [&] { return gate_open_; });
      flags_seen_ |= gup_flags;
      ++calls_;
      auto it = results_.find(hva.value);
      if (it != results_.end()) return it->second;
    }
    refs_.fetch_add(1);
    *page = Page{this, Pfn(hva.value >> kPageShift), hva, false};
    return 1;
  }
  void put_page(const Page& /*page*/) override { refs_.fetch_sub(1); }
  uint64_t outstanding_refs() const override { return refs_.load(); }

  void set_result(Hva hva, long result) {
    std::lock_guard<std::mutex> g(mu_);
    results_[hva.value] = result;
  }
  void close_gate() {
    std::lock_guard<std::mutex> g(mu_);
    gate_open_ = false;
  }
  void open_gate() {
    std::lock_guard<std::mutex> g(mu_);
    gate_open_ = true;
    cv_.notify_all();
  }
  // Waits until n slow-path calls have entered (held at the gate or done).
  void wait_entered(int n) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return entered_ >= n; });
  }
  int calls() {
    std::lock_guard<std::mutex> g(mu_);
    return calls_;
  }
  FollFlags flags_seen() {
    std::lock_guard<std::mutex> g(mu_);
    return flags_seen_;
  }

  // The rest of HostMm is not used by async_pf.
  bool get_user_page_fast_only(Hva, FollFlags, Page*) override { return false; }
  void mmap_read_lock() override {}
  void mmap_read_unlock() override {}
  std::optional<Vma> vma_lookup(Hva) override { return std::nullopt; }
  int follow_pfnmap(Hva, PfnmapPte*) override { return -EINVAL; }
  int fixup_user_fault(Hva, bool, bool*) override { return -EFAULT; }
  void set_page_dirty(const Page&) override {}
  void mark_page_accessed(const Page&) override {}
  bool page_reserved(const Page&) override { return false; }
  std::optional<Page> pfn_to_refcounted_page(Pfn, Hva) override { return std::nullopt; }
  bool get_page_unless_zero(const Page&) override { return false; }
  bool signal_pending() override { return false; }
  bool fatal_signal_pending() override { return false; }
  PgLevel host_mapping_level(Hva) override { return PgLevel::k4K; }
  std::byte* page_address(Pfn, Hva) override { return nullptr; }
  void register_notifier(MmuNotifier*) override {}
  void unregister_notifier(MmuNotifier*) override {}

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool gate_open_ = true;
  int entered_ = 0;
  int calls_ = 0;
  FollFlags flags_seen_ = 0;
  std::map<uint64_t, long> results_;
  std::atomic<uint64_t> refs_{0};
};

}  // namespace gfnmap::testing_apf
