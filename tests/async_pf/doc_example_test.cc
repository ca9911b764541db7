// gfnmap async_pf tests: the example of docs/async-pf.md, call for call, with its results
// asserted, so the page cannot drift from the library.
#include <gtest/gtest.h>

#include <vector>

#include "gfnmap/async_pf.h"
#include "gfnmap/sim_host.h"

namespace gfnmap {
namespace {

// The MMU's side: inject "page not present" into the guest, re-run the fault when ready.
class ExampleClient : public AsyncPfClient {
 public:
  bool page_not_present(const AsyncPfWork& /*work*/) override { return true; }  // injected
  void page_ready(const AsyncPfWork& work) override { prefetched.push_back(work.gfn); }
  std::vector<Gfn> prefetched;
};

TEST(AsyncPfDocExample, QueueCompleteDeliver) {
  SimHost host;
  Hva ram = *host.mmap(16 * kPageSize, kProtRW, VmaKind::kAnonPrivate);  // not populated

  AsyncPf apf(host, /*nr_threads=*/2);
  ExampleClient client;
  AsyncPfQueue& q = apf.vcpu_queue(/*vcpu_id=*/1, &client);

  // A fault the MMU could not resolve without sleeping: queue it instead of blocking.
  const Gfn gfn(5);
  ASSERT_FALSE(q.find_gfn(gfn));
  const uint32_t token = q.setup_async_pf(gfn_to_gpa(gfn), gfn, ram + 5 * kPageSize);
  EXPECT_EQ(token, (1u << 12) | 1u);  // (apf.id++ << 12) | vcpu_id, never 0
  EXPECT_TRUE(q.find_gfn(gfn));       // a repeated fault: halt and retry, do not queue again
  EXPECT_EQ(q.queued(), 1u);

  // A fault whose hva has no VMA: queued as well; the worker's fault-in fails.
  const Gfn bad(6);
  const uint32_t bad_token = q.setup_async_pf(gfn_to_gpa(bad), bad, Hva(0x1000));
  EXPECT_NE(bad_token, 0u);
  EXPECT_EQ(q.setup_async_pf(gfn_to_gpa(bad), bad, kHvaErrBad), 0u);  // error hva: refused

  // The vCPU halts until workers finish, then delivers "page ready" for each.
  unsigned delivered = 0;
  while (delivered < 2) {
    q.wait_for_completion();
    delivered += q.check_completion();
  }
  EXPECT_EQ(q.queued(), 0u);
  EXPECT_FALSE(q.find_gfn(gfn));
  EXPECT_EQ(client.prefetched.size(), 2u);
  EXPECT_EQ(host.outstanding_refs(), 0u);  // the worker kept no reference

  std::vector<AsyncPfEvent> events = q.take_events();
  ASSERT_EQ(events.size(), 4u);  // two not-present, then two ready (in completion order)
  EXPECT_EQ(events[0].kind, AsyncPfEvent::Kind::kPageNotPresent);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[1].token, bad_token);
  for (int i = 2; i < 4; ++i) {
    EXPECT_EQ(events[i].kind, AsyncPfEvent::Kind::kPageReady);
    if (events[i].token == token) {
      EXPECT_EQ(events[i].gup_result, 1);
    } else {
      EXPECT_EQ(events[i].token, bad_token);
      EXPECT_LT(events[i].gup_result, 0);  // fault-in failed: delivered all the same
    }
  }

  // Guest reset / PV feature toggled: a synthetic "wake everyone" completion.
  EXPECT_EQ(q.wakeup_all(), 0);
  EXPECT_EQ(q.check_completion(), 1u);
  EXPECT_EQ(q.take_events().back().token, kAsyncPfWakeupAllToken);
  apf.remove_vcpu(1);  // clears anything still queued, waits for a running worker
}

}  // namespace
}  // namespace gfnmap
