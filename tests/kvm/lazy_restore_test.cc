// kvm suite: lazy restore of a real guest. The guest's slot is memory registered with gfnmap's
// userfaultfd page server; KVM's own GUP faults on it are served from a snapshot.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "gfnmap/kvm.h"
#include "gfnmap/uffd.h"
#include "kvm/kvm_test_util.h"

namespace gfnmap::kvm {
namespace {

constexpr uint64_t kSliceGpa = 1ull << 30;
constexpr uint64_t kPages = 2048;  // 8 MiB

// Word 0 of page p of the snapshot; the rest of the page is a fill byte (never all zero).
uint64_t snap_word(uint64_t p) { return 0xc0ffee0000000000ull ^ (p * 0x9e3779b97f4a7c15ull); }

std::vector<std::byte> make_snapshot() {
  std::vector<std::byte> s(kPages * kPageSize, std::byte{0x5a});
  for (uint64_t p = 0; p < kPages; ++p) {
    uint64_t w = snap_word(p);
    std::memcpy(s.data() + p * kPageSize, &w, sizeof w);
  }
  return s;
}

// The XOR of the words a guest running w reads when its slice starts as the snapshot's
// pages [first_page, first_page + w.npages).
uint64_t predicted_checksum(const GuestWorkload& w, uint64_t first_page) {
  std::vector<uint64_t> cur(w.npages);
  for (uint64_t p = 0; p < w.npages; ++p) cur[p] = snap_word(first_page + p);
  uint64_t x = 0;
  for_each_guest_access(w, [&](uint32_t pass, uint64_t page, bool write) {
    if (write) cur[page] = guest_write_value(w.slice + page * kPageSize, pass);
    else x ^= cur[page];
  });
  return x;
}

struct LazySlot {
  std::vector<std::byte> snapshot = make_snapshot();
  uffd::MemorySource source{snapshot};
  std::unique_ptr<uffd::PageServer> server;
};

// A started page server with one lazily restored range of kPages pages; nullptr + skip reason.
std::unique_ptr<LazySlot> make_lazy_slot(std::string* why, Hva* base) {
  auto s = std::make_unique<LazySlot>();
  auto server = uffd::PageServer::create(s->source, uffd::PageServerOptions{});
  if (!server) {
    *why = "userfaultfd unavailable: " + error_to_string(server.error());
    return nullptr;
  }
  s->server = std::move(*server);
  auto b = s->server->map_lazy(nullptr, kPages * kPageSize, 0);
  if (!b) {
    *why = "map_lazy: " + error_to_string(b.error());
    return nullptr;
  }
  if (auto r = s->server->start(); !r) {
    *why = "start: " + error_to_string(r.error());
    return nullptr;
  }
  *base = *b;
  return s;
}

void run_lazy(uint32_t write_percent, bool random, uint32_t passes) {
  GFNMAP_REQUIRE_KVM();
  std::string why;
  Hva base;
  auto lazy = make_lazy_slot(&why, &base);
  if (!lazy) GTEST_SKIP() << why;

  RunConfig c;
  c.vcpus = 2;
  c.bytes_per_vcpu = kPages / 2 * kPageSize;
  c.slice_gpa = Gpa(kSliceGpa);
  c.slots.push_back(RunSlot{1, Gpa(kSliceGpa), kPages * kPageSize,
                            reinterpret_cast<void*>(base.value), 0});
  c.passes = passes;
  c.write_percent = write_percent;
  c.random = random;
  c.seed = 7;
  auto st = run_guest_workload(c);
  ASSERT_TRUE(st.ok()) << error_to_string(st.error());
  ASSERT_EQ(st->checksums.size(), 2u);
  for (unsigned v = 0; v < 2; ++v) {
    GuestWorkload w{Gpa(kSliceGpa + v * c.bytes_per_vcpu), kPages / 2, passes, write_percent,
                    random, c.seed + v};
    EXPECT_EQ(st->checksums[v], predicted_checksum(w, v * (kPages / 2)))
        << "vCPU " << v << " did not read the snapshot's data";
  }
  // Every page of the slot was first touched by the guest: KVM's GUP raised a missing fault
  // that the server served (nothing else touches the range, no prefetch).
  uffd::PageServerStats s = lazy->server->stats();
  EXPECT_EQ(s.faults, kPages);
  EXPECT_EQ(s.faults_served, s.faults);
  EXPECT_EQ(s.pages_copied, kPages);
  EXPECT_EQ(s.prefetched, 0u);
  EXPECT_TRUE(lazy->server->fully_populated());
  // The restored memory holds the snapshot where the guest did not write.
  if (write_percent == 0) {
    EXPECT_EQ(std::memcmp(reinterpret_cast<const void*>(base.value), lazy->snapshot.data(),
                          lazy->snapshot.size()),
              0);
  }
}

TEST(KvmLazyRestore, RealGuestReadsTheSnapshotThroughThePageServer) {
  run_lazy(/*write_percent=*/0, /*random=*/false, /*passes=*/2);
}

TEST(KvmLazyRestore, RandomOrderWithWritesReadsSnapshotThenItsOwnWrites) {
  run_lazy(/*write_percent=*/40, /*random=*/true, /*passes=*/3);
}

// The runner's dirty log harvested between passes counts what the guest wrote after pass 1.
TEST(KvmRunner, DirtyLogAfterFirstPassHarvestsEveryLaterWrite) {
  GFNMAP_REQUIRE_KVM();
  RunConfig c;
  c.vcpus = 2;
  c.bytes_per_vcpu = 4ull << 20;
  c.passes = 3;
  c.write_percent = 100;
  c.dirty = DirtyMode::kBitmap;
  c.dirty_after_first_pass = true;
  std::atomic<unsigned> reports{0};
  c.on_pass = [&](unsigned, uint32_t) { reports.fetch_add(1); };
  auto st = run_guest_workload(c);
  ASSERT_TRUE(st.ok()) << error_to_string(st.error());
  EXPECT_EQ(st->dirty_harvests, 2u);
  EXPECT_EQ(st->dirty_pages_harvested, 2 * st->pages);
  EXPECT_EQ(reports.load(), 2u * 3u);
  EXPECT_GT(st->first_touch_seconds, 0);
  EXPECT_GT(st->after_seconds, 0);
}

// With overlap every vCPU walks the same slice; read-only, the checksums are all equal.
TEST(KvmRunner, OverlapSharesOneSlice) {
  GFNMAP_REQUIRE_KVM();
  RunConfig c;
  c.vcpus = 2;
  c.bytes_per_vcpu = 4ull << 20;
  c.passes = 1;
  c.write_percent = 0;
  c.overlap = true;
  auto st = run_guest_workload(c);
  ASSERT_TRUE(st.ok()) << error_to_string(st.error());
  EXPECT_EQ(st->pages, 2048u);  // 1024 pages visited by each of 2 vCPUs
  EXPECT_EQ(st->pages_faulted, 1024u);  // distinct pages
  EXPECT_EQ(st->checksums[0], st->checksums[1]);  // zero memory read by both: 0 and 0
}

}  // namespace
}  // namespace gfnmap::kvm
