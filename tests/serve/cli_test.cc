// gfnmap tests: the `gfnmap serve` CLI as a real process with real VMM peers: --help, bad
// usage (2), --once with --stats and --json (0), a refused session (1), --connect-timeout (1),
// SIGTERM stopping cleanly.
#include <sys/stat.h>

#include <algorithm>

#include "serve_test_util.h"

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::Child;
using serve_test::TempDir;

#ifdef GFNMAP_CLI
std::string cli() { return GFNMAP_CLI; }
#define GFNMAP_SKIP_WITHOUT_CLI() (void)0
#else
std::string cli() { return ""; }
#define GFNMAP_SKIP_WITHOUT_CLI() GTEST_SKIP() << "the gfnmap CLI is not built in this preset"
#endif

bool wait_for_socket(const std::string& path, std::chrono::milliseconds t = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + t;
  struct stat st {};
  while (std::chrono::steady_clock::now() < deadline) {
    if (stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

bool wait_for_output(const Child& c, const std::string& what, std::chrono::milliseconds t = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + t;
  while (std::chrono::steady_clock::now() < deadline) {
    if (c.output().find(what) != std::string::npos) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

TEST(ServeCli, HelpAndBadUsage) {
  GFNMAP_SKIP_WITHOUT_CLI();
  TempDir dir;
  auto help = Child::spawn({cli(), "serve", "--help"}, dir / "help.out");
  ASSERT_TRUE(help.wait(30s));
  EXPECT_EQ(help.exit_code(), 0);
  EXPECT_NE(help.output().find("SCM_RIGHTS"), std::string::npos) << help.output();
  EXPECT_NE(help.output().find("--connect-timeout"), std::string::npos);
  auto missing = Child::spawn({cli(), "serve", dir / "sock"}, dir / "missing.out");
  ASSERT_TRUE(missing.wait(30s));
  EXPECT_EQ(missing.exit_code(), 2) << missing.output();
  auto nofile = Child::spawn({cli(), "serve", dir / "sock", dir / "nofile"}, dir / "nofile.out");
  ASSERT_TRUE(nofile.wait(30s));
  EXPECT_EQ(nofile.exit_code(), 2) << nofile.output();
  EXPECT_NE(nofile.output().find("nofile"), std::string::npos) << nofile.output();
  auto threads = Child::spawn({cli(), "serve", dir / "sock", dir / "nofile", "--threads", "0"},
                              dir / "threads.out");
  ASSERT_TRUE(threads.wait(30s));
  EXPECT_EQ(threads.exit_code(), 2) << threads.output();
  auto fatal = Child::spawn({cli(), "serve", dir / "sock", dir / "nofile", "--on-fatal", "bogus"},
                            dir / "fatal.out");
  ASSERT_TRUE(fatal.wait(30s));
  EXPECT_EQ(fatal.exit_code(), 2) << fatal.output();
}

TEST(ServeCli, OnceServesOneVmWithStatsAndJson) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  GFNMAP_SKIP_WITHOUT_CLI();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock", stats = dir / "stats.jsonl";
  serve_test::write_memfile(mem, 8 << 20);
  auto srv = Child::spawn({cli(), "serve", sock, mem, "--once", "--stats", stats, "--json",
                           "--threads", "2"},
                          dir / "serve.out");
  ASSERT_TRUE(wait_for_socket(sock)) << srv.output();
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "2M,4M", "--balloon"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  ASSERT_TRUE(srv.wait(30s)) << srv.output();
  EXPECT_EQ(srv.exit_code(), 0) << srv.output();
  const std::string out = srv.output();
  EXPECT_NE(out.find("\"event\":\"session_start\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"event\":\"session_end\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"end_reason\":\"peer hung up\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"event\":\"exit\",\"sessions\":1,\"failed\":0"), std::string::npos) << out;
  const std::string s = serve_test::read_file(stats);
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 1) << s;
  EXPECT_NE(s.find("\"accepted\":true"), std::string::npos) << s;
  EXPECT_NE(s.find("\"latency_p99_ns\":"), std::string::npos) << s;
  EXPECT_EQ(s.find("\"removes\":0,"), std::string::npos) << s;  // the balloon was seen
  struct stat st {};
  EXPECT_NE(stat(sock.c_str(), &st), 0) << "the socket file is removed on exit";
}

TEST(ServeCli, RefusedSessionExitsOne) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  GFNMAP_SKIP_WITHOUT_CLI();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 1 << 20);
  auto srv = Child::spawn({cli(), "serve", sock, mem, "--once"}, dir / "serve.out");
  ASSERT_TRUE(wait_for_socket(sock)) << srv.output();
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "2M", "--timeout", "1"});
  ASSERT_TRUE(srv.wait(30s)) << srv.output();
  EXPECT_EQ(srv.exit_code(), 1) << srv.output();
  EXPECT_NE(srv.output().find("refused: handshake: region 0: offset 0 + size 2097152 reaches past "
                              "the end of the memory file"),
            std::string::npos)
      << srv.output();
  ASSERT_TRUE(peer.wait(30s));
  EXPECT_EQ(peer.exit_code(), 3);
}

TEST(ServeCli, ConnectTimeoutExitsOne) {
  GFNMAP_SKIP_WITHOUT_CLI();
  TempDir dir;
  const std::string mem = dir / "mem";
  serve_test::write_memfile(mem, 1 << 20);
  const auto t0 = std::chrono::steady_clock::now();
  auto srv = Child::spawn({cli(), "serve", dir / "sock", mem, "--connect-timeout", "0.3"},
                          dir / "serve.out");
  ASSERT_TRUE(srv.wait(30s));
  EXPECT_EQ(srv.exit_code(), 1) << srv.output();
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 300ms);
  EXPECT_NE(srv.output().find("no VMM connected"), std::string::npos) << srv.output();
}

TEST(ServeCli, SigtermStopsCleanly) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  GFNMAP_SKIP_WITHOUT_CLI();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 4 << 20);
  auto srv = Child::spawn({cli(), "serve", sock, mem}, dir / "serve.out");
  ASSERT_TRUE(wait_for_socket(sock)) << srv.output();
  auto a = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M"}, "a");
  const pid_t apid = a.pid;
  ASSERT_TRUE(a.wait(60s)) << a.output();
  EXPECT_EQ(a.exit_code(), 0) << a.output();
  auto b = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M", "--hold"}, "b");
  ASSERT_TRUE(wait_for_output(b, "gfnmap-vmm-peer: ok")) << b.output();
  ASSERT_TRUE(wait_for_output(srv, "session 1 (pid ")) << srv.output();
  ASSERT_TRUE(wait_for_output(srv, "session 2 (pid ")) << srv.output();
  kill(srv.pid, SIGTERM);
  ASSERT_TRUE(srv.wait(10s)) << srv.output();
  EXPECT_EQ(srv.exit_code(), 0) << srv.output();
  const std::string out = srv.output();
  EXPECT_NE(out.find("SIGTERM, stopping"), std::string::npos) << out;
  EXPECT_NE(out.find("session 1 (pid " + std::to_string(apid) + "): serving 1 regions, 4 MiB"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("peer hung up"), std::string::npos) << out;
  EXPECT_NE(out.find("server stopped"), std::string::npos) << out;
  EXPECT_NE(out.find("2 sessions, 0 failed"), std::string::npos) << out;
}

}  // namespace
}  // namespace gfnmap
