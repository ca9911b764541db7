// kvm suite: the built-in CPL3 guest runs natively on real KVM, visits its slice as the host
// model predicts, and the binding decodes its exits.
#include <gtest/gtest.h>

#include "gfnmap/kvm.h"
#include "kvm/kvm_test_util.h"

namespace gfnmap::kvm {
namespace {

TEST(KvmGuest, RunsWorkloadAndReportsPasses) {
  GFNMAP_REQUIRE_KVM();
  RunConfig c;
  c.bytes_per_vcpu = 8ull << 20;
  c.passes = 3;
  auto st = run_guest_workload(c);
  ASSERT_TRUE(st.ok()) << error_to_string(st.error());
  EXPECT_EQ(st->pages, 2048u);
  EXPECT_EQ(st->io_exits, 4u);  // 3 pass reports + done
  std::printf("first touch %.0f ns/page, retouch %.1f ns/page\n", st->first_touch_ns_per_page,
              st->retouch_ns_per_page);
}

}  // namespace
}  // namespace gfnmap::kvm
