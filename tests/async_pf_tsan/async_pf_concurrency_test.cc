// gfnmap async_pf concurrency tests (run under TSan): vCPU threads queueing and completing
// faults while workers run the slow path; every token is delivered exactly once, nothing leaks.
#include <gtest/gtest.h>

#include <cerrno>
#include <random>
#include <set>
#include <thread>

#include "async_pf/fake_host.h"
#include "gfnmap/async_pf.h"

namespace gfnmap {
namespace {

using testing_apf::FakeHost;

constexpr uint64_t kHva = 0x7f0000000000ULL;

class CountingClient : public AsyncPfClient {
 public:
  void page_ready(const AsyncPfWork&) override { ++prefetches; }
  void page_present_queued() override { kicks.fetch_add(1, std::memory_order_relaxed); }
  uint64_t prefetches = 0;  // vCPU thread only
  std::atomic<uint64_t> kicks{0};
};

TEST(AsyncPfConcurrency, Invariant24_VcpusAndWorkersDeliverEveryTokenOnce) {
  FakeHost host;
  for (uint64_t g = 0; g < 64; g += 5) host.set_result(Hva(kHva + g * kPageSize), -EFAULT);
  AsyncPf apf(host, 3);
  constexpr int kVcpus = 3;
  constexpr int kFaults = 600;
  std::vector<std::thread> vcpus;
  std::vector<int> failures(kVcpus, 0);
  for (int v = 0; v < kVcpus; ++v) {
    vcpus.emplace_back([&, v] {
      CountingClient client;
      AsyncPfQueue& q = apf.vcpu_queue(static_cast<uint32_t>(v), &client);
      std::mt19937_64 rng(static_cast<uint64_t>(v));
      std::set<uint32_t> tokens;
      std::set<uint32_t> ready;
      int queued = 0;
      while (queued < kFaults || q.queued() != 0) {
        if (queued < kFaults) {
          const Gfn gfn(rng() % 128);
          if (q.find_gfn(gfn)) {
            // Repeated fault: halt until something completes.
            q.wait_for_completion();
          } else if (const uint32_t t = q.setup_async_pf(gfn_to_gpa(gfn), gfn,
                                                         Hva(kHva + gfn.value * kPageSize))) {
            if (!tokens.insert(t).second) ++failures[v];  // tokens unique while outstanding
            ++queued;
          } else if (q.queued() < kAsyncPfPerVcpu) {
            ++failures[v];  // setup failed below the bound
          }
          if (q.queued() > kAsyncPfPerVcpu) ++failures[v];
        } else {
          q.wait_for_completion(50);
        }
        q.check_completion();
        for (const AsyncPfEvent& e : q.take_events()) {
          if (e.kind != AsyncPfEvent::Kind::kReady) continue;
          if (!ready.insert(e.token).second || tokens.count(e.token) == 0) ++failures[v];
          tokens.erase(e.token);
        }
      }
      if (!tokens.empty()) ++failures[v];
      if (client.prefetches != kFaults) ++failures[v];
      apf.remove_vcpu(static_cast<uint32_t>(v));
    });
  }
  for (auto& t : vcpus) t.join();
  for (int v = 0; v < kVcpus; ++v) EXPECT_EQ(failures[v], 0) << "vcpu " << v;
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(apf.pool().completed(), uint64_t{kVcpus} * kFaults);
}

// A vCPU clears its queue (reset / teardown) while workers are completing its items.
TEST(AsyncPfConcurrency, Spec9_ClearRacingWorkers) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 2);
  for (int round = 0; round < 50; ++round) {
    AsyncPfQueue q(pool, 1);
    for (uint64_t g = 0; g < 20; ++g) {
      ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(g), Hva(kHva + g * kPageSize)), 0u);
    }
    if (round % 2) q.check_completion();
    q.clear_completion_queue();
    EXPECT_EQ(q.queued(), 0u);
    EXPECT_EQ(q.wakeup_all(), 0);
  }
  EXPECT_EQ(host.outstanding_refs(), 0u);
}

}  // namespace
}  // namespace gfnmap
