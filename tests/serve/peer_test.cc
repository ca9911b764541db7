// gfnmap tests: the VMM peer itself (tools/uffd_vmm_peer): bad usage exits 2, wrong bytes are
// found and exit 1 naming the byte, a server that never serves makes it time out (3).
#include <sys/socket.h>
#include <sys/un.h>

#include "serve_test_util.h"

namespace gfnmap {
namespace {

using namespace std::chrono_literals;
using serve_test::Child;
using serve_test::ServerHarness;
using serve_test::TempDir;

TEST(VmmPeer, BadUsageExitsTwo) {
  TempDir dir;
  const std::string p = serve_test::peer_path();
  const std::vector<std::vector<std::string>> cases = {
      {p},
      {p, "--socket", dir / "s"},
      {p, "--socket", dir / "s", "--memfile", dir / "m", "--page-size", "8K"},
      {p, "--socket", dir / "s", "--memfile", dir / "m", "--order", "backwards"},
      {p, "--socket", dir / "s", "--memfile", dir / "m", "--regions", "5000"},
      {p, "--socket", dir / "s", "--memfile", dir / "m", "--bogus"},
      {p, "--socket", dir / "s", "--memfile", dir / "missing"},
  };
  int i = 0;
  for (const auto& argv : cases) {
    auto c = Child::spawn(argv, dir / ("usage" + std::to_string(i++) + ".out"));
    ASSERT_TRUE(c.wait(30s));
    EXPECT_EQ(c.exit_code(), 2) << argv.back() << ": " << c.output();
  }
  auto help = Child::spawn({p, "--help"}, dir / "help.out");
  ASSERT_TRUE(help.wait(30s));
  EXPECT_EQ(help.exit_code(), 0);
  EXPECT_NE(help.output().find("--balloon"), std::string::npos);
}

TEST(VmmPeer, FindsWrongBytes) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", other = dir / "other", sock = dir / "sock";
  serve_test::write_memfile(mem, 4 << 20);
  {
    std::vector<char> bytes(4 << 20, 'x');
    FILE* f = std::fopen(other.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, other).ok());  // serves other bytes than the peer expects
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "4M", "--threads", "1"});
  ASSERT_TRUE(peer.wait(60s)) << peer.output();
  EXPECT_EQ(peer.exit_code(), 1) << peer.output();
  EXPECT_NE(peer.output().find("byte 0 of region 0 (file offset 0) is 120, the memory file has"),
            std::string::npos)
      << peer.output();
}

TEST(VmmPeer, TimesOutWhenNobodyServes) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 1 << 20);
  // A socket that accepts connections (the backlog) but never reads them.
  int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, sock.c_str(), sock.size() + 1);
  ASSERT_EQ(bind(l, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  ASSERT_EQ(listen(l, 4), 0);
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "1M", "--timeout", "1"});
  ASSERT_TRUE(peer.wait(30s));
  EXPECT_EQ(peer.exit_code(), 3) << peer.output();
  EXPECT_NE(peer.output().find("timed out"), std::string::npos) << peer.output();
  close(l);
}

}  // namespace
}  // namespace gfnmap
