// gfnmap async_pf tests: the per-vCPU bound, tokens, repeated-fault detection, completions even
// after a failed fault-in, client call order, wakeup_all, cancellation and shutdown (spec 9).
#include <gtest/gtest.h>

#include <cerrno>
#include <thread>

#include "async_pf/fake_host.h"
#include "gfnmap/async_pf.h"

namespace gfnmap {
namespace {

using testing_apf::FakeHost;

constexpr uint64_t kHva = 0x7f0000000000ULL;
Hva hva_of(uint64_t gfn) { return Hva(kHva + gfn * kPageSize); }

// Records the client calls in order.
class RecordingClient : public AsyncPfClient {
 public:
  bool page_not_present(const AsyncPfWork& w) override {
    log.push_back("not_present " + std::to_string(w.token));
    return inject;
  }
  bool can_dequeue_page_present() override { return can_dequeue; }
  void page_ready(const AsyncPfWork& w) override {
    log.push_back("ready " + std::to_string(w.gfn.value));
  }
  void page_present(const AsyncPfWork& w) override {
    log.push_back("present " + std::to_string(w.token));
  }
  void page_present_queued() override { queued_calls.fetch_add(1); }

  std::vector<std::string> log;
  bool inject = true;
  bool can_dequeue = true;
  std::atomic<int> queued_calls{0};
};

// Delivers completions until `n` were delivered in total.
unsigned drain(AsyncPfQueue& q, unsigned n) {
  unsigned got = 0;
  while (got < n) {
    q.wait_for_completion();
    got += q.check_completion();
  }
  return got;
}

TEST(AsyncPf, Invariant24_AtMost64OutstandingPerVcpu) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 2);
  AsyncPfQueue q(pool, 3);
  host.close_gate();
  for (uint64_t g = 0; g < kAsyncPfPerVcpu; ++g) {
    EXPECT_NE(q.setup_async_pf(gfn_to_gpa(Gfn(g)), Gfn(g), hva_of(g)), 0u) << g;
  }
  EXPECT_EQ(q.queued(), kAsyncPfPerVcpu);
  EXPECT_EQ(q.setup_async_pf(gfn_to_gpa(Gfn(100)), Gfn(100), hva_of(100)), 0u);  // full
  EXPECT_EQ(q.queued(), kAsyncPfPerVcpu);
  EXPECT_FALSE(q.find_gfn(Gfn(100)));
  // Another vCPU has its own bound.
  AsyncPfQueue other(pool, 4);
  EXPECT_NE(other.setup_async_pf(Gpa(0), Gfn(0), hva_of(0)), 0u);
  host.open_gate();
  EXPECT_EQ(drain(q, kAsyncPfPerVcpu), kAsyncPfPerVcpu);
  EXPECT_EQ(q.queued(), 0u);
  EXPECT_NE(q.setup_async_pf(gfn_to_gpa(Gfn(100)), Gfn(100), hva_of(100)), 0u);
  drain(q, 1);
  drain(other, 1);
  EXPECT_EQ(host.outstanding_refs(), 0u);
}

TEST(AsyncPf, Invariant24_RepeatedFaultOnGfnWithOutstandingWorkIsDetected) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  AsyncPfQueue q(pool, 0);
  host.close_gate();
  EXPECT_FALSE(q.find_gfn(Gfn(7)));
  ASSERT_NE(q.setup_async_pf(gfn_to_gpa(Gfn(7)), Gfn(7), hva_of(7)), 0u);
  EXPECT_TRUE(q.find_gfn(Gfn(7)));  // the MMU halts + retries instead of queueing again
  EXPECT_FALSE(q.find_gfn(Gfn(8)));
  host.open_gate();
  q.wait_for_completion();
  // Done but "page ready" not delivered yet: still outstanding.
  EXPECT_TRUE(q.find_gfn(Gfn(7)));
  EXPECT_EQ(q.check_completion(), 1u);
  EXPECT_FALSE(q.find_gfn(Gfn(7)));
}

TEST(AsyncPf, Invariant24_CompletionDeliveredWhenFaultInFailed) {
  FakeHost host;
  host.set_result(hva_of(1), -EFAULT);
  host.set_result(hva_of(2), -EHWPOISON);
  AsyncPfWorkerPool pool(host, 2);
  RecordingClient client;
  AsyncPfQueue q(pool, 5, &client);
  const uint32_t t1 = q.setup_async_pf(gfn_to_gpa(Gfn(1)), Gfn(1), hva_of(1));
  const uint32_t t2 = q.setup_async_pf(gfn_to_gpa(Gfn(2)), Gfn(2), hva_of(2));
  ASSERT_NE(t1, 0u);
  ASSERT_NE(t2, 0u);
  drain(q, 2);
  EXPECT_EQ(q.queued(), 0u);
  std::map<uint32_t, long> result;
  for (const AsyncPfEvent& e : q.take_events()) {
    if (e.kind == AsyncPfEvent::Kind::kPageReady) result[e.token] = e.gup_result;
  }
  EXPECT_EQ(result[t1], -EFAULT);
  EXPECT_EQ(result[t2], -EHWPOISON);
  EXPECT_EQ(host.outstanding_refs(), 0u);
}

TEST(AsyncPf, Spec9_SlowPathWritesAndKeepsNoReference) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  AsyncPfQueue q(pool, 0);
  ASSERT_NE(q.setup_async_pf(Gpa(0x3000), Gfn(3), hva_of(3)), 0u);
  drain(q, 1);
  EXPECT_EQ(host.flags_seen(), kFollWrite);
  EXPECT_EQ(host.calls(), 1);
  EXPECT_EQ(host.outstanding_refs(), 0u);
  EXPECT_EQ(pool.completed(), 1u);
}

TEST(AsyncPf, Invariant24_TokensNeverZeroIncludingWraparound) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  AsyncPfQueue q0(pool, 0);
  EXPECT_EQ(q0.alloc_token(), 1u << 12);  // id starts at 1
  EXPECT_EQ(q0.alloc_token(), 2u << 12);
  q0.set_next_id(0);  // 0 << 12 == 0: restarts at 1
  EXPECT_EQ(q0.alloc_token(), 1u << 12);
  q0.set_next_id(0xfffff);
  EXPECT_EQ(q0.alloc_token(), 0xfffff000u);
  EXPECT_EQ(q0.alloc_token(), 1u << 12);  // id 0x100000 << 12 wraps to 0: restarts at 1
  // Over a full cycle of ids (2^20) and then some, never zero, vcpu id in the low bits.
  AsyncPfQueue q7(pool, 7);
  for (uint32_t i = 0; i < (1u << 20) + 10; ++i) {
    const uint32_t t = q7.alloc_token();
    ASSERT_NE(t, 0u) << i;
    ASSERT_EQ(t & 0xfff, 7u);
  }
  // setup_async_pf's token has the same shape.
  const uint32_t t = q0.setup_async_pf(Gpa(0), Gfn(0), hva_of(0));
  EXPECT_EQ(t, 2u << 12);
  drain(q0, 1);
}

TEST(AsyncPf, Spec9_SetupFailsForErrorHvaButConsumesAToken) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  AsyncPfQueue q(pool, 1);
  EXPECT_EQ(q.setup_async_pf(Gpa(0), Gfn(0), kHvaErrBad), 0u);
  EXPECT_EQ(q.setup_async_pf(Gpa(0), Gfn(0), kHvaErrRoBad), 0u);
  EXPECT_EQ(q.queued(), 0u);
  EXPECT_FALSE(q.find_gfn(Gfn(0)));
  EXPECT_TRUE(q.take_events().empty());
  EXPECT_EQ(q.setup_async_pf(Gpa(0), Gfn(0), hva_of(0)), (3u << 12) | 1u);
  drain(q, 1);
  EXPECT_EQ(host.calls(), 1);
}

TEST(AsyncPf, Spec9_EventsAndClientCallOrder) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  RecordingClient client;
  AsyncPfQueue q(pool, 2, &client);
  const uint32_t t = q.setup_async_pf(Gpa(0x5123), Gfn(5), hva_of(5));
  ASSERT_NE(t, 0u);
  drain(q, 1);
  const std::string ts = std::to_string(t);
  EXPECT_EQ(client.log, (std::vector<std::string>{"not_present " + ts, "ready 5", "present " + ts}));
  auto events = q.take_events();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0], (AsyncPfEvent{AsyncPfEvent::Kind::kNotPresent, t, Gfn(5), Gpa(0x5123),
                                     false, 0}));
  EXPECT_EQ(events[1], (AsyncPfEvent{AsyncPfEvent::Kind::kReady, t, Gfn(5), Gpa(0x5123), false,
                                     1}));
  EXPECT_TRUE(q.take_events().empty());
}

TEST(AsyncPf, Spec9_NotPresentInjectionResultIsRecorded) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  RecordingClient client;
  client.inject = false;  // PV #PF not deliverable: the vCPU halts instead
  AsyncPfQueue q(pool, 2, &client);
  host.close_gate();
  ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(0), hva_of(0)), 0u);
  struct Check : AsyncPfClient {
    bool injected = true;
    void page_present(const AsyncPfWork& w) override { injected = w.notpresent_injected; }
  } check;
  AsyncPfQueue q2(pool, 3, &check);
  ASSERT_NE(q2.setup_async_pf(Gpa(0), Gfn(0), hva_of(0)), 0u);
  host.open_gate();
  drain(q, 1);
  drain(q2, 1);
  EXPECT_TRUE(check.injected);  // the default page_not_present reports injected
}

TEST(AsyncPf, Spec9_PagePresentQueuedOnlyWhenDoneListWasEmpty) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 2);
  RecordingClient client;
  AsyncPfQueue q(pool, 0, &client);
  for (uint64_t g = 0; g < 5; ++g) ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(g), hva_of(g)), 0u);
  while (pool.completed() < 5) std::this_thread::yield();
  EXPECT_EQ(client.queued_calls.load(), 1);
  EXPECT_EQ(q.check_completion(), 5u);
  ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(9), hva_of(9)), 0u);
  drain(q, 1);
  EXPECT_EQ(client.queued_calls.load(), 2);
}

TEST(AsyncPf, Spec9_CanDequeueFalseLeavesCompletionsQueued) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  RecordingClient client;
  client.can_dequeue = false;
  AsyncPfQueue q(pool, 0, &client);
  ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(1), hva_of(1)), 0u);
  q.wait_for_completion();
  EXPECT_EQ(q.check_completion(), 0u);
  EXPECT_EQ(q.queued(), 1u);
  EXPECT_TRUE(q.has_completions());
  client.can_dequeue = true;
  EXPECT_EQ(q.check_completion(), 1u);
  EXPECT_FALSE(q.has_completions());
}

TEST(AsyncPf, Spec9_WakeupAllIsASyntheticCompletion) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  RecordingClient client;
  AsyncPfQueue q(pool, 0, &client);
  EXPECT_EQ(q.wakeup_all(), 0);
  EXPECT_EQ(q.queued(), 1u);
  EXPECT_EQ(client.queued_calls.load(), 1);
  EXPECT_EQ(q.wakeup_all(), 0);  // done list not empty: nothing added
  EXPECT_EQ(q.queued(), 1u);
  EXPECT_EQ(q.check_completion(), 1u);
  EXPECT_EQ(q.queued(), 0u);
  const std::string token = std::to_string(kAsyncPfWakeupAllToken);
  EXPECT_EQ(client.log, (std::vector<std::string>{"present " + token}));  // no page_ready
  auto events = q.take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].wakeup_all);
  EXPECT_EQ(events[0].token, kAsyncPfWakeupAllToken);
  EXPECT_EQ(host.calls(), 0);
}

TEST(AsyncPf, Spec9_ClearCancelsPendingAndWaitsForRunning) {
  FakeHost host;
  AsyncPfWorkerPool pool(host, 1);
  RecordingClient client;
  AsyncPfQueue q(pool, 0, &client);
  host.close_gate();
  for (uint64_t g = 0; g < 10; ++g) ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(g), hva_of(g)), 0u);
  host.wait_entered(1);  // one runs (held at the gate), nine pending
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    host.open_gate();
  });
  q.clear_completion_queue();  // cancels nine, waits for the running one
  opener.join();
  EXPECT_EQ(q.queued(), 0u);
  EXPECT_FALSE(q.find_gfn(Gfn(0)));
  EXPECT_FALSE(q.has_completions());
  EXPECT_EQ(q.check_completion(), 0u);
  EXPECT_EQ(host.calls(), 1);
  EXPECT_EQ(host.outstanding_refs(), 0u);
  // Usable again.
  ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(1), hva_of(1)), 0u);
  drain(q, 1);
}

TEST(AsyncPf, Spec9_PoolShutdownCompletesPendingWorkAsCancelled) {
  FakeHost host;
  auto pool = std::make_unique<AsyncPfWorkerPool>(host, 1);
  AsyncPfQueue q(*pool, 0);
  host.close_gate();
  for (uint64_t g = 0; g < 4; ++g) ASSERT_NE(q.setup_async_pf(Gpa(0), Gfn(g), hva_of(g)), 0u);
  host.wait_entered(1);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    host.open_gate();
  });
  pool.reset();  // joins the worker after its running item
  opener.join();
  EXPECT_EQ(q.check_completion(), 4u);
  int cancelled = 0;
  for (const auto& e : q.take_events()) {
    if (e.kind == AsyncPfEvent::Kind::kPageReady && e.gup_result == -ECANCELED) ++cancelled;
  }
  EXPECT_EQ(cancelled, 3);
  EXPECT_EQ(q.setup_async_pf(Gpa(0), Gfn(9), hva_of(9)), 0u);  // pool gone
  EXPECT_EQ(host.outstanding_refs(), 0u);
}

TEST(AsyncPf, Spec9_VmWideAsyncPfOwnsQueues) {
  FakeHost host;
  AsyncPf apf(host, 2);
  EXPECT_EQ(apf.pool().nr_threads(), 2u);
  AsyncPfQueue& a = apf.vcpu_queue(0);
  AsyncPfQueue& b = apf.vcpu_queue(1);
  EXPECT_EQ(&apf.vcpu_queue(0), &a);
  EXPECT_NE(&a, &b);
  ASSERT_NE(a.setup_async_pf(Gpa(0), Gfn(1), hva_of(1)), 0u);
  ASSERT_NE(b.setup_async_pf(Gpa(0), Gfn(1), hva_of(1)), 0u);
  drain(a, 1);
  apf.remove_vcpu(1);  // with its work possibly still running
  apf.remove_vcpu(42);
  EXPECT_EQ(apf.vcpu_queue(1).queued(), 0u);  // a fresh queue
}

TEST(AsyncPf, Spec9_PoolThreadsAreBounded) {
  FakeHost host;
  AsyncPfWorkerPool zero(host, 0);
  EXPECT_EQ(zero.nr_threads(), 1u);
  AsyncPfWorkerPool many(host, 1000);
  EXPECT_EQ(many.nr_threads(), 64u);
}

}  // namespace
}  // namespace gfnmap
