// gfnmap tests: working sets: the file format (round trip, bad files named by line), a restore
// recorded and replayed (fewer demand faults, the same bytes), sequential prefetch, prefetch
// never filling pages the VMM discarded, and the CLI's --record / --prefetch.
#include <sys/stat.h>

#include <set>

#include "serve_test_util.h"

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::ServerHarness;
using serve_test::TempDir;

void write_text(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs(text.c_str(), f);
  std::fclose(f);
}

TEST(ServeWorkingSet, FileRoundTripAndBadFiles) {
  TempDir dir;
  std::vector<uffd::WorkingSetEntry> set{{8192, 10}, {0, 20}, {4096, 35}};
  ASSERT_TRUE(uffd::write_working_set(dir / "ws", set).ok());
  auto back = uffd::read_working_set(dir / "ws");
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(*back, set);
  EXPECT_EQ(serve_test::read_file(dir / "ws").rfind("gfnmap-working-set 1\n", 0), 0u);

  struct Case {
    std::string text;
    std::string expect;
  } cases[] = {
      {"", "empty file"},
      {"hello\n", "line 1: not a gfnmap working-set file"},
      {"gfnmap-working-set 2\n", "line 1: unsupported version"},
      {"gfnmap-working-set 1\n0 1\n4096\n", "line 3: expected \"OFFSET TIME_NS\""},
      {"gfnmap-working-set 1\n# c\n100 1\n", "line 3: offset 100 is not 4K-aligned"},
      {"gfnmap-working-set 1\n4096 1 x\n", "line 2: trailing text"},
  };
  for (const Case& c : cases) {
    write_text(dir / "bad", c.text);
    auto r = uffd::read_working_set(dir / "bad");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find(c.expect), std::string::npos) << r.error().message;
  }
  auto missing = uffd::read_working_set(dir / "missing");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ENOENT);
}

TEST(ServeWorkingSet, RecordedRestoreReplayedHasFewerDemandFaultsSameBytes) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 8 << 20);
  const uint64_t pages = (6 << 20) / 4096;
  std::vector<uffd::WorkingSetEntry> recorded;
  {
    ServerHarness h;
    ASSERT_TRUE(h.start(sock, mem, 2, 5000, [](uffd::ServeOptions& o) {
                   o.record_working_set = true;
                 }).ok());
    auto peer = serve_test::spawn_peer(dir, sock, mem,
                                       {"--regions", "2M,4M", "--file-offset", "1M", "--order",
                                        "random", "--threads", "1"});
    ASSERT_TRUE(peer.wait(60s)) << peer.output();
    ASSERT_EQ(peer.exit_code(), 0) << peer.output();
    auto reports = h.wait_reports(1);
    ASSERT_EQ(reports.size(), 1u);
    recorded = reports[0].working_set;
    EXPECT_EQ(reports[0].pages_prefetched, 0u);
  }
  // Every page once, in first-touch order, at its file offset, times non-decreasing.
  ASSERT_EQ(recorded.size(), pages);
  std::set<uint64_t> offsets;
  for (size_t i = 0; i < recorded.size(); ++i) {
    EXPECT_GE(recorded[i].offset, 1u << 20);
    EXPECT_LT(recorded[i].offset, 7u << 20);
    if (i) {
      EXPECT_GE(recorded[i].time_ns, recorded[i - 1].time_ns);
    }
    offsets.insert(recorded[i].offset);
  }
  EXPECT_EQ(offsets.size(), pages);
  ASSERT_TRUE(uffd::write_working_set(dir / "ws", recorded).ok());
  auto ws = uffd::read_working_set(dir / "ws");
  ASSERT_TRUE(ws.ok());

  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [&](uffd::ServeOptions& o) {
                 for (auto& e : *ws) o.prefetch_working_set.push_back(e.offset);
               }).ok());
  // The VMM waits a little before running, as a restored guest's first touches do; the
  // prefetch is done by then.
  auto peer = serve_test::spawn_peer(dir, sock, mem,
                                     {"--regions", "2M,4M", "--file-offset", "1M", "--order",
                                      "random", "--threads", "2", "--delay-touch", "300"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  auto reports = h.wait_reports(1);
  ASSERT_EQ(reports.size(), 1u);
  const uffd::SessionReport& r = reports[0];
  EXPECT_FALSE(r.failed) << r.end_reason;
  EXPECT_GT(r.pages_prefetched, pages / 2);
  EXPECT_LT(r.faults, pages / 2);
  EXPECT_LE(r.pages_prefetched + r.pages_copied + r.pages_zeroed, pages);  // never twice
}

TEST(ServeWorkingSet, SequentialPrefetchNeverFillsDiscardedPages) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 32 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 2, 5000, [](uffd::ServeOptions& o) {
                 o.prefetch_sequential = true;
               }).ok());
  // The VMM discards the middle of region 0 right after the handshake, while the prefetch
  // runs: those pages must read zero, everything else the file.
  for (int i = 0; i < 3; ++i) {
    auto peer = serve_test::spawn_peer(
        dir, sock, mem,
        {"--regions", "16M,16M", "--balloon-first", "--delay-touch", "100", "--threads", "2"},
        "peer" + std::to_string(i));
    ASSERT_TRUE(peer.wait(60s)) << peer.output();
    EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  }
  auto reports = h.wait_reports(3);
  ASSERT_EQ(reports.size(), 3u);
  for (auto& r : reports) {
    EXPECT_FALSE(r.failed) << r.end_reason;
    EXPECT_EQ(r.removes, 1u);
    EXPECT_GT(r.pages_prefetched, 0u);
    EXPECT_LE(r.pages_prefetched, (32u << 20) / 4096);
  }
}

// A large sequential prefetch (96 MiB) runs while the VMM touches pages in random order from
// the start: its demand faults are read and served while the prefetch still has work left (a
// prefetch copy never holds the session, so they do not queue behind it), every byte is the
// file's, and no page is placed twice. Counts, not wall-clock speed.
TEST(ServeWorkingSet, DemandFaultsServedWhileALargePrefetchRuns) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 96 << 20);
  const uint64_t pages = (96u << 20) / 4096;
  for (unsigned threads : {1u, 2u}) {
    ServerHarness h;
    ASSERT_TRUE(h.start(sock, mem, threads, 5000, [](uffd::ServeOptions& o) {
                   o.prefetch_sequential = true;
                 }).ok());
    // Region 1 comes last in the prefetch; the peer touches it first, in random order.
    auto peer = serve_test::spawn_peer(
        dir, sock, mem, {"--regions", "32M,64M", "--order", "random", "--threads", "2"},
        "peer" + std::to_string(threads));
    ASSERT_TRUE(peer.wait(120s)) << peer.output();
    EXPECT_EQ(peer.exit_code(), 0) << peer.output();
    auto reports = h.wait_reports(1);
    ASSERT_EQ(reports.size(), 1u);
    const uffd::SessionReport& r = reports[0];
    EXPECT_FALSE(r.failed) << r.end_reason;
    EXPECT_GT(r.pages_prefetched, 0u);
    EXPECT_GT(r.prefetch_done_ns, 0u);
    // Demand faults were read and served while the prefetch still had work left, not after it
    // (how many depends on how soon the peer starts touching: 19 under TSan, hundreds without).
    EXPECT_GT(r.faults_during_prefetch, 0u) << uffd::to_string(r);
    EXPECT_GT(r.faults_served, 0u);
    EXPECT_EQ(r.faults_served, r.faults);
    // Every page placed exactly once, by the prefetch or by a demand fault.
    EXPECT_EQ(r.pages_prefetched + r.pages_copied + r.pages_zeroed, pages) << uffd::to_string(r);
  }
}

TEST(ServeWorkingSet, CliRecordThenPrefetch) {
#ifndef GFNMAP_CLI
  GTEST_SKIP() << "the gfnmap CLI is not built in this preset";
#else
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock", ws = dir / "ws";
  serve_test::write_memfile(mem, 4 << 20);
  auto wait_sock = [&] {
    struct stat st {};
    for (int i = 0; i < 2000 && stat(sock.c_str(), &st) != 0; ++i) std::this_thread::sleep_for(5ms);
  };
  {
    auto srv = serve_test::Child::spawn({GFNMAP_CLI, "serve", sock, mem, "--once", "--record", ws},
                                        dir / "rec.out");
    wait_sock();
    auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M"});
    ASSERT_TRUE(peer.wait(60s)) << peer.output();
    ASSERT_TRUE(srv.wait(30s)) << srv.output();
    EXPECT_EQ(srv.exit_code(), 0) << srv.output();
    EXPECT_NE(srv.output().find("working set of 1024 pages written to"), std::string::npos)
        << srv.output();
  }
  auto srv = serve_test::Child::spawn(
      {GFNMAP_CLI, "serve", sock, mem, "--once", "--prefetch", ws, "--json"}, dir / "pre.out");
  wait_sock();
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M", "--delay-touch", "200"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  ASSERT_TRUE(srv.wait(30s)) << srv.output();
  EXPECT_EQ(srv.exit_code(), 0) << srv.output();
  EXPECT_EQ(srv.output().find("\"pages_prefetched\":0,"), std::string::npos) << srv.output();
  // A bad working-set file is bad input: exit 2 with the line named.
  write_text(dir / "bad", "gfnmap-working-set 1\n12 0\n");
  auto bad = serve_test::Child::spawn({GFNMAP_CLI, "serve", sock, mem, "--prefetch", dir / "bad"},
                                      dir / "bad.out");
  ASSERT_TRUE(bad.wait(30s));
  EXPECT_EQ(bad.exit_code(), 2);
  EXPECT_NE(bad.output().find("line 2: offset 12 is not 4K-aligned"), std::string::npos)
      << bad.output();
#endif
}

}  // namespace
}  // namespace gfnmap
