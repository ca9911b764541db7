// gfnmap tests: demand fault-around and several handler threads serving one session: a run
// placed around a fault stays inside its region and out of removed ranges (this process plays
// the VMM, so the test sees every byte), and concurrent handlers place every page exactly once.
#include <sys/mman.h>

#include "serve_test_util.h"

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::ServerHarness;
using serve_test::TempDir;

constexpr uint64_t kK = 1024;

// Two regions adjacent in memory but not in the file: region 0 is [A, A+100K) backed by file
// offset 0, region 1 is [A+100K, A+500K) backed by file offset 2M. The 64K block
// [A+64K, A+128K) straddles both, and 8K of region 1 inside it ([A+120K, A+128K)) is removed
// before any touch. A run that crossed the region end would put file bytes of offset 100K.. at
// A+100K (not 2M..); one that crossed the removed range would put file bytes where zeros
// belong.
TEST(ServeFaultAround, NeverCrossesARegionEndOrARemovedRange) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 4 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [](uffd::ServeOptions& o) {
                 o.fault_around_bytes = 64 * kK;
               }).ok());
  // A 2M-aligned area, so the 64K blocks are where the comment says.
  const uint64_t span = 500 * kK;
  void* raw = mmap(nullptr, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(raw, MAP_FAILED);
  auto* area = reinterpret_cast<uint8_t*>((reinterpret_cast<uint64_t>(raw) + (2 << 20) - 1) &
                                          ~uint64_t{(2 << 20) - 1});
  ASSERT_EQ(madvise(area, span, MADV_NOHUGEPAGE), 0);
  const int uffd = serve_test::make_uffd();
  ASSERT_GE(uffd, 0);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(area), span};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(ioctl(uffd, UFFDIO_REGISTER, &reg), 0) << std::strerror(errno);
  const uint64_t a = reinterpret_cast<uint64_t>(area);
  const std::string json = "[{\"base_host_virt_addr\":" + std::to_string(a) +
                           ",\"size\":" + std::to_string(100 * kK) +
                           ",\"offset\":0,\"page_size\":4096},{\"base_host_virt_addr\":" +
                           std::to_string(a + 100 * kK) + ",\"size\":" +
                           std::to_string(400 * kK) + ",\"offset\":" + std::to_string(2 << 20) +
                           ",\"page_size\":4096}]";
  const int s = serve_test::connect_to(sock);
  ASSERT_GE(s, 0);
  ASSERT_TRUE(serve_test::send_with_fds(s, json, {uffd}));
  ASSERT_TRUE(h.wait_started(1));
  // Returns once the server has read the REMOVE.
  ASSERT_EQ(madvise(area + 120 * kK, 8 * kK, MADV_DONTNEED), 0);

  auto expected = [&](uint64_t i) -> uint8_t {
    if (i < 100 * kK) return serve_test::pattern_byte(i);
    if (i >= 120 * kK && i < 128 * kK) return 0;
    return serve_test::pattern_byte((2 << 20) + (i - 100 * kK));
  };
  // The last page of region 0 first, then the first of region 1, then everything in order.
  auto touch = [&](uint64_t i) { return *reinterpret_cast<volatile uint8_t*>(area + i); };
  (void)touch(96 * kK);
  (void)touch(100 * kK);
  uint64_t bad = 0;
  for (uint64_t i = 0; i < span; ++i) {
    if (touch(i) != expected(i) && bad++ < 5) {
      ADD_FAILURE() << "byte at +" << i << " is " << unsigned{area[i]} << ", not "
                    << unsigned{expected(i)};
    }
  }
  EXPECT_EQ(bad, 0u);
  close(s);
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_EQ(r.removes, 1u);
  const uint64_t pages = span / 4096;
  // Every page placed exactly once, by far fewer faults than pages.
  EXPECT_EQ(r.pages_copied + r.pages_zeroed, pages) << uffd::to_string(r);
  EXPECT_EQ(r.faults_served, r.faults);
  EXPECT_LT(r.faults, pages / 3) << uffd::to_string(r);
  close(uffd);
  munmap(raw, 4 << 20);
}

// Invalid fault-around sizes are refused when the server is created.
TEST(ServeFaultAround, SizeMustBeAPowerOfTwoFrom4KTo2M) {
  TempDir dir;
  const std::string mem = dir / "mem";
  serve_test::write_memfile(mem, 1 << 20);
  for (uint64_t bad : {uint64_t{0}, uint64_t{2048}, uint64_t{48 * kK}, uint64_t{4 << 20}}) {
    uffd::ServeOptions o;
    o.socket_path = dir / "sock";
    o.memory_file = mem;
    o.fault_around_bytes = bad;
    auto s = uffd::ServeServer::create(o);
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.error().code, EINVAL);
    EXPECT_NE(s.error().message.find("fault-around"), std::string::npos) << s.error().message;
  }
}

// Four handler threads, one VMM with four threads touching in random order: the session's
// faults are served by several threads at once (copies in flight together), every byte matches
// (the peer checks), and every page is placed exactly once: none lost (the peer would time
// out), none copied twice. With fault-around off and on; a balloon at the end must read zero.
TEST(ServeFaultAround, ConcurrentHandlersOnOneSessionLoseNoPageAndBytesMatch) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 16 << 20);
  for (uint64_t fa : {uint64_t{4096}, uint64_t{64 * kK}}) {
    SCOPED_TRACE("fault-around " + std::to_string(fa));
    ServerHarness h;
    ASSERT_TRUE(h.start(sock, mem, 4, 5000, [fa](uffd::ServeOptions& o) {
                   o.fault_around_bytes = fa;
                 }).ok());
    // Concurrency is likely in one run, not certain on a loaded 2-core host: up to 4 VMMs,
    // one after another, until one session had two copies in flight at once.
    uint64_t most = 0;
    for (int run = 0; run < 4 && most < 2; ++run) {
      auto peer = serve_test::spawn_peer(
          dir, sock, mem,
          {"--regions", "5M,3M,4M", "--file-offset", "2M", "--threads", "4", "--order",
           "random", "--balloon"},
          "peer" + std::to_string(run));
      ASSERT_TRUE(peer.wait(90s)) << peer.output();
      ASSERT_EQ(peer.exit_code(), 0) << peer.output();
      auto reports = h.wait_reports(static_cast<size_t>(run) + 1);
      ASSERT_EQ(reports.size(), static_cast<size_t>(run) + 1);
      const uffd::SessionReport& r = reports.back();
      EXPECT_FALSE(r.failed) << r.end_reason;
      EXPECT_EQ(r.faults_served, r.faults);
      EXPECT_GE(r.removes, 1u);
      // 12 MiB placed once each, then the balloon's half of region 0 (2.5 MiB) once more as
      // zero pages when it is read again.
      const uint64_t pages = (12u << 20) / 4096, balloon = (5u << 20) / 2 / 4096;
      EXPECT_EQ(r.pages_copied + r.pages_zeroed, pages + balloon) << uffd::to_string(r);
      if (fa == 4096) {
        EXPECT_GE(r.faults, pages + balloon) << uffd::to_string(r);
      } else {
        EXPECT_LT(r.faults, pages / 2) << uffd::to_string(r);
      }
      most = std::max(most, r.max_copies_in_flight);
    }
    EXPECT_GE(most, 2u) << "no session had two copies in flight at once in 4 restores";
  }
}

}  // namespace
}  // namespace gfnmap
