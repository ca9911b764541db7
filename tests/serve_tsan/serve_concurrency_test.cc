// gfnmap tests (TSan): one session served by four handler threads with fault-around while four
// threads of this process (the VMM) touch its memory in random order and a fifth discards a
// range (MADV_DONTNEED) in the middle of it: no page is lost or copied twice, every byte
// outside the range matches the file, and after the discard the range reads zero only.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <random>

#include "serve/serve_test_util.h"

namespace gfnmap {
namespace {

using serve_test::ServerHarness;
using serve_test::TempDir;

TEST(ServeConcurrency, RemoveDuringConcurrentCopiesNeverLeavesSnapshotContent) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  constexpr uint64_t kSize = 8u << 20, kPages = kSize / 4096;
  // The discarded range: one page after 2 MiB to one page before 6 MiB, so the 64K
  // fault-around blocks at both ends straddle it.
  constexpr uint64_t kFrom = 512 * 4096 + 4096, kTo = 1536 * 4096 - 4096;
  serve_test::write_memfile(mem, kSize);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 4, 5000, [](uffd::ServeOptions& o) {
                 o.fault_around_bytes = 64u << 10;
               }).ok());
  void* raw = mmap(nullptr, kSize + (2u << 20), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(raw, MAP_FAILED);
  auto* area = reinterpret_cast<uint8_t*>((reinterpret_cast<uint64_t>(raw) + (2u << 20) - 1) &
                                          ~uint64_t{(2u << 20) - 1});
  ASSERT_EQ(madvise(area, kSize, MADV_NOHUGEPAGE), 0);
  const int uffd = serve_test::make_uffd();
  ASSERT_GE(uffd, 0);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(area), kSize};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(ioctl(uffd, UFFDIO_REGISTER, &reg), 0) << std::strerror(errno);
  const std::string json = "[{\"base_host_virt_addr\":" +
                           std::to_string(reinterpret_cast<uint64_t>(area)) + ",\"size\":" +
                           std::to_string(kSize) + ",\"offset\":0,\"page_size\":4096}]";
  const int s = serve_test::connect_to(sock);
  ASSERT_GE(s, 0);
  ASSERT_TRUE(serve_test::send_with_fds(s, json, {uffd}));
  ASSERT_TRUE(h.wait_started(1));

  std::vector<uint32_t> order(kPages);
  for (uint32_t i = 0; i < kPages; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  std::atomic<uint64_t> bad{0}, touched{0};
  // A page outside the range must match the file. Inside it, while the discard may land in the
  // middle of a read, each byte is the file's or zero; the check after the discard is below.
  auto check_page = [&](uint64_t p) {
    const auto* page = reinterpret_cast<const volatile uint8_t*>(area + p * 4096);
    const bool in_range = p * 4096 >= kFrom && p * 4096 < kTo;
    for (uint64_t i = 0; i < 4096; ++i) {
      const uint8_t got = page[i], want = serve_test::pattern_byte(p * 4096 + i);
      if (got != want && !(in_range && got == 0)) {
        bad.fetch_add(1);
        return;
      }
    }
  };
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      for (size_t k = t; k < order.size(); k += 4) {
        check_page(order[k]);
        touched.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  // The discard lands while the touching threads are about a quarter through.
  while (touched.load(std::memory_order_relaxed) < kPages / 4) std::this_thread::yield();
  ASSERT_EQ(madvise(area + kFrom, kTo - kFrom, MADV_DONTNEED), 0);
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0u);
  // After the discard the range reads zero, never snapshot content.
  uint64_t nonzero = 0;
  for (uint64_t i = kFrom; i < kTo; ++i) nonzero += area[i] != 0;
  EXPECT_EQ(nonzero, 0u);
  close(s);
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_EQ(r.removes, 1u);
  EXPECT_EQ(r.faults_served, r.faults);
  // Every page placed once before the discard or after it, the discarded ones at most twice.
  EXPECT_GE(r.pages_copied + r.pages_zeroed, kPages) << uffd::to_string(r);
  EXPECT_LE(r.pages_copied + r.pages_zeroed, kPages + (kTo - kFrom) / 4096) << uffd::to_string(r);
  close(uffd);
  munmap(raw, kSize + (2u << 20));
}

}  // namespace
}  // namespace gfnmap
