// gfnmap tests: restores served by a ServeServer to real VMM processes (tools/uffd_vmm_peer):
// every byte checked against the memory file, sequential and random touching, balloon REMOVEs
// giving zeros, several VMs at once from one file, a VM exiting mid-restore, a memory file
// shorter than the regions, the server stopped mid-restore, 2M pages.
#include "serve_test_util.h"

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::ServerHarness;
using serve_test::TempDir;

TEST(ServeRestore, SequentialRestoreWithBalloonMatchesTheFile) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 16 << 20);
  ServerHarness h;
  // One page per fault (fault-around off): every page faults once.
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [](uffd::ServeOptions& o) { o.fault_around_bytes = 4096; }).ok());
  // Three regions with gaps, not starting at file offset 0.
  auto peer = serve_test::spawn_peer(
      dir, sock, mem, {"--regions", "2M,4M,1M", "--file-offset", "1M", "--balloon"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  ASSERT_EQ(peer.exit_code(), 0) << peer.output();
  EXPECT_NE(peer.output().find("balloon reads zero"), std::string::npos) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_TRUE(r.accepted);
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_EQ(r.end_reason, "peer hung up");
  ASSERT_EQ(r.regions.size(), 3u);
  EXPECT_EQ(r.regions[0].offset, 1u << 20);
  EXPECT_EQ(r.regions[1].offset, 3u << 20);
  const uint64_t pages = (7 << 20) / 4096;
  // Every page faulted once; the balloon's pages once more (they read as zero pages).
  EXPECT_GE(r.faults, pages);
  EXPECT_EQ(r.faults_served, r.faults);
  EXPECT_GE(r.pages_copied + r.pages_zeroed + r.eexist_wakes, pages);
  EXPECT_GT(r.pages_zeroed, pages / 5 - 10);  // every fifth page of the file is zero
  EXPECT_GE(r.removes, 1u);
  EXPECT_GT(r.latency_p50_ns, 0u);
  EXPECT_LE(r.latency_p50_ns, r.latency_p99_ns);
  EXPECT_LE(r.latency_p99_ns, r.latency_max_ns);
  EXPECT_GT(r.handshake_ns, 0u);
  EXPECT_GT(r.last_fault_ns, 0u);
  EXPECT_NE(uffd::to_json(r).find("\"removes\":"), std::string::npos);
  EXPECT_EQ(h.server->active_sessions(), 0u);
}

TEST(ServeRestore, RandomOrderManyThreadsLegacyAndSplitHandshake) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 3).ok());
  auto a = serve_test::spawn_peer(
      dir, sock, mem, {"--regions", "3M,5M", "--threads", "4", "--order", "random", "--legacy"},
      "legacy");
  ASSERT_TRUE(a.wait(60s)) << a.output();
  EXPECT_EQ(a.exit_code(), 0) << a.output();
  auto b = serve_test::spawn_peer(
      dir, sock, mem, {"--regions", "4M", "--threads", "3", "--order", "random", "--split"},
      "split");
  ASSERT_TRUE(b.wait(60s)) << b.output();
  EXPECT_EQ(b.exit_code(), 0) << b.output();
  auto reports = h.wait_reports(2);
  ASSERT_EQ(reports.size(), 2u);
  for (auto& r : reports) {
    EXPECT_TRUE(r.accepted) << r.end_reason;
    EXPECT_FALSE(r.failed) << r.end_reason;
    for (auto& g : r.regions) EXPECT_EQ(g.page_size, 4096u);
  }
}

TEST(ServeRestore, RemoveMakesLaterFaultsZeroNeverSnapshotContent) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 4 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 1, 5000, [](uffd::ServeOptions& o) { o.fault_around_bytes = 4096; }).ok());
  // The peer touches everything, discards the middle half of region 0 and reads it again: the
  // second faults must be zero pages, and the rest still matches the file.
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M", "--balloon", "--threads", "1"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  ASSERT_EQ(peer.exit_code(), 0) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uint64_t pages = (4 << 20) / 4096;
  EXPECT_EQ(reports[0].removes, 1u);
  EXPECT_EQ(reports[0].faults, pages + pages / 2);
  // The discarded half came back as zero pages only: no more copies than the first pass made.
  EXPECT_LE(reports[0].pages_copied, pages - pages / 5 + 1);
}

TEST(ServeRestore, SeveralVmsAtOnceFromOneFile) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2).ok());
  std::vector<serve_test::Child> peers;
  for (int i = 0; i < 5; ++i) {
    peers.push_back(serve_test::spawn_peer(
        dir, sock, mem,
        {"--regions", "2M,6M", "--threads", "2", "--order", i % 2 ? "random" : "seq"},
        "peer" + std::to_string(i)));
  }
  for (auto& p : peers) {
    ASSERT_TRUE(p.wait(90s)) << p.output();
    EXPECT_EQ(p.exit_code(), 0) << p.output();
  }
  auto reports = h.wait_reports(5);
  ASSERT_EQ(reports.size(), 5u);
  for (auto& r : reports) {
    EXPECT_TRUE(r.accepted);
    EXPECT_FALSE(r.failed) << r.end_reason;
    // Fault-around (the default) and two threads on five VMs: every page placed exactly once.
    EXPECT_EQ(r.faults_served, r.faults);
    EXPECT_EQ(r.pages_copied + r.pages_zeroed, (8u << 20) / 4096) << uffd::to_string(r);
  }
  EXPECT_EQ(h.server->sessions_started(), 5u);
  EXPECT_EQ(h.server->sessions_failed(), 0u);
}

TEST(ServeRestore, VmExitingMidRestoreEndsItsSessionOnly) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 1).ok());
  // A slow VM stays connected mid-restore (it is killed later); one exits after 100 pages;
  // the next VM is served in full meanwhile.
  auto slow = serve_test::spawn_peer(dir, sock, mem, {"--regions", "8M", "--hold"}, "slow");
  ASSERT_TRUE(h.wait_started(1));
  auto quitter = serve_test::spawn_peer(dir, sock, mem, {"--regions", "8M", "--exit-after", "100"},
                                        "quitter");
  ASSERT_TRUE(quitter.wait(30s)) << quitter.output();
  EXPECT_EQ(quitter.exit_code(), 0);
  EXPECT_NE(quitter.output().find("mid-restore"), std::string::npos);
  auto next = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M,4M"}, "next");
  ASSERT_TRUE(next.wait(60s)) << next.output();
  EXPECT_EQ(next.exit_code(), 0) << next.output();
  auto reports = h.wait_reports(2);
  ASSERT_GE(reports.size(), 2u);
  int hung_up = 0;
  for (auto& r : reports) {
    EXPECT_FALSE(r.failed) << r.end_reason;
    if (r.end_reason.find("peer hung up") != std::string::npos) ++hung_up;
  }
  EXPECT_EQ(hung_up, static_cast<int>(reports.size()));
  slow.kill_now();
  reports = h.wait_reports(3);
  EXPECT_EQ(reports.size(), 3u);
  EXPECT_EQ(h.server->active_sessions(), 0u);
}

TEST(ServeRestore, MemoryFileShorterThanRegionsIsRefused) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 3 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem).ok());
  // The VMM's faults are never served; it gives up after its timeout.
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "2M,2M", "--timeout", "1"});
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_FALSE(reports[0].accepted);
  EXPECT_NE(reports[0].end_reason.find("region 1: offset 2097152 + size 2097152 reaches past the "
                                       "end of the memory file (3145728 bytes)"),
            std::string::npos)
      << reports[0].end_reason;
  ASSERT_TRUE(peer.wait(30s));
  EXPECT_EQ(peer.exit_code(), 3) << peer.output();
}

TEST(ServeRestore, ServerStoppedMidRestore) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 64 << 20);
  auto h = std::make_unique<ServerHarness>();
  ASSERT_TRUE(h->start(sock, mem, 2).ok());
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "64M", "--threads", "2", "--hold"});
  ASSERT_TRUE(h->wait_started(1));
  std::this_thread::sleep_for(20ms);
  const auto t0 = std::chrono::steady_clock::now();
  h->server->stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  auto reports = h->wait_reports(1, 1s);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].end_reason, "server stopped");
  EXPECT_FALSE(reports[0].failed);
  h.reset();  // unlinks the socket
  // The VMM's remaining faults are unserved: it waits (killable), or it finished first.
  if (!peer.wait(200ms)) {
    peer.kill_now();
    EXPECT_EQ(peer.exit_code(), 128 + SIGKILL);
  }
  // A new server on the same path serves the next restore.
  ServerHarness again;
  ASSERT_TRUE(again.start(sock, mem).ok());
  auto next = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M"}, "next");
  ASSERT_TRUE(next.wait(60s)) << next.output();
  EXPECT_EQ(next.exit_code(), 0) << next.output();
}

// 2M page size over plain anonymous memory: every fault copies 2 MiB; the balloon's zero pages
// are 2 MiB copies of zeros; a 4K discard inside a placed 2M page is served as one 4K page.
TEST(ServeRestore, TwoMegPagesOverAnonymousMemory) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 16 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem).ok());
  auto peer = serve_test::spawn_peer(
      dir, sock, mem,
      {"--regions", "8M,4M", "--page-size", "2M", "--no-hugetlb", "--balloon", "--threads", "3"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_EQ(r.regions[0].page_size, 2u << 20);
  EXPECT_EQ(r.pages_copied, 6u);  // 12 MiB in 2M pages, each placed once
  EXPECT_EQ(r.pages_zeroed, 2u);  // the balloon: 2 of region 0's 4 pages
  EXPECT_EQ(r.removes, 1u);
}

// A VMM with UNMAP and REMAP events: region 0 moves half-restored (its later faults come at the
// new address and must get the same file offsets), then the last region is unmapped.
TEST(ServeRestore, RemapAndUnmapEvents) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [](uffd::ServeOptions& o) { o.fault_around_bytes = 4096; }).ok());
  auto peer = serve_test::spawn_peer(dir, sock, mem,
                                     {"--regions", "2M,1M", "--file-offset", "4M", "--remap"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  EXPECT_NE(peer.output().find("ok: remap and unmap"), std::string::npos) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_EQ(r.remaps, 1u);
  EXPECT_GE(r.unmaps, 1u);  // the munmap (and the move's source range, on some kernels)
  EXPECT_EQ(r.faults, (2u << 20) / 4096);
}

TEST(ServeRestore, HugePages2M) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  const HostFacts& f = host_facts();
  if (f.hugetlb_2m_free < 4) {
    GTEST_SKIP() << "hugetlb 2M pool has " << f.hugetlb_2m_free << " free pages (of "
                 << f.hugetlb_2m_total << "); needs 4 (vm.nr_hugepages)";
  }
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem).ok());
  auto peer = serve_test::spawn_peer(dir, sock, mem,
                                     {"--regions", "2M,2M", "--page-size", "2M", "--balloon"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_FALSE(reports[0].failed) << reports[0].end_reason;
  EXPECT_EQ(reports[0].regions[0].page_size, 2u << 20);
}

}  // namespace
}  // namespace gfnmap

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::ServerHarness;
using serve_test::TempDir;

// The memory file truncated under a running restore: the session fails naming the file; the
// VMM is killed with kill_peer_on_fatal, and left waiting without it. The server lives on.
void truncated_memory_file(bool kill_peer) {
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [&](uffd::ServeOptions& o) {
                 o.kill_peer_on_fatal = kill_peer;
               }).ok());
  auto peer = serve_test::spawn_peer(
      dir, sock, mem, {"--regions", "8M", "--delay-touch", "300", "--timeout", "2"});
  ASSERT_TRUE(h.wait_started(1));
  ASSERT_EQ(truncate(mem.c_str(), 4096), 0);
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_TRUE(reports[0].failed);
  EXPECT_NE(reports[0].end_reason.find("the memory file cannot be read at offset"),
            std::string::npos)
      << reports[0].end_reason;
  EXPECT_EQ(reports[0].peer_killed, kill_peer);
  ASSERT_TRUE(peer.wait(30s));
  EXPECT_EQ(peer.exit_code(), kill_peer ? 128 + SIGKILL : 3) << peer.output();
  // The server still accepts (and refuses: the regions are now past the end of the file).
  auto next = serve_test::spawn_peer(dir, sock, mem, {"--regions", "8M", "--timeout", "1"}, "next");
  reports = h.wait_reports(2);
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_NE(reports[1].end_reason.find("past the end of the memory file"), std::string::npos);
  EXPECT_FALSE(reports[1].peer_killed);  // refused handshakes never kill
}

TEST(ServeRestore, FatalErrorKillsTheVmmWhenAsked) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  truncated_memory_file(true);
}

TEST(ServeRestore, FatalErrorLeavesTheVmmByDefault) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  truncated_memory_file(false);
}

}  // namespace
}  // namespace gfnmap
