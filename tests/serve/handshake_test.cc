// gfnmap tests: the serve handshake: parsing Firecracker's region array (current, deprecated
// and three-field forms), validation with the field named, and every malformed handshake sent
// over a real socket (the session is refused and closed; the server serves the next one).
#include <sys/eventfd.h>

#include "serve_test_util.h"

namespace gfnmap {
namespace {

using serve_test::ServerHarness;
using serve_test::TempDir;
using uffd::ServeRegion;

TEST(ServeHandshake, ParsesCurrentDeprecatedAndThreeFieldForms) {
  auto r = uffd::parse_handshake(
      R"([{"base_host_virt_addr":140000000000000,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096},)"
      R"( {"base_host_virt_addr":140000002097152,"size":2097152,"offset":8192,"page_size_kib":2097152},)"
      R"( {"offset":4096,"size":4096,"base_host_virt_addr":4096,"unknown":[1,{"x":"y"}],"b":true}])");
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0].base_host_virt_addr, 140000000000000u);
  EXPECT_EQ((*r)[0].size, 8192u);
  EXPECT_EQ((*r)[0].page_size, 4096u);
  EXPECT_EQ((*r)[1].page_size, 2097152u);  // page_size_kib holds bytes despite its name
  EXPECT_EQ((*r)[1].offset, 8192u);
  EXPECT_EQ((*r)[2].page_size, 4096u);  // the old three-field form
  EXPECT_EQ((*r)[2].offset, 4096u);
  // page_size wins over page_size_kib.
  auto both = uffd::parse_handshake(
      R"([{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2097152}])");
  ASSERT_TRUE(both.ok());
  EXPECT_EQ((*both)[0].page_size, 4096u);
}

TEST(ServeHandshake, ParseErrorsNameTheFieldAndRegion) {
  struct Case {
    const char* json;
    const char* expect;
  } cases[] = {
      {R"({"base_host_virt_addr":0})", "expected '['"},
      {R"([{"base_host_virt_addr":0,"size":4096}])", "region 0: missing field \"offset\""},
      {R"([{"base_host_virt_addr":0,"size":4096,"offset":0},{"size":1,"offset":0}])",
       "region 1: missing field \"base_host_virt_addr\""},
      {R"([{"base_host_virt_addr":"0x1000","size":4096,"offset":0}])",
       "\"base_host_virt_addr\" is not an unsigned integer"},
      {R"([{"base_host_virt_addr":0,"size":-4096,"offset":0}])", "\"size\" is not an unsigned"},
      {R"([{"base_host_virt_addr":0,"size":4096.5,"offset":0}])", "\"size\" is not an unsigned"},
      {R"([{"base_host_virt_addr":0,"size":99999999999999999999,"offset":0}])", "64 bits"},
      {R"([{"base_host_virt_addr":0,"size":4096,"offset":0})", "expected ',' or ']'"},
      {R"([{"base_host_virt_addr":0,"size":4096,"offset":0}] x)", "trailing bytes"},
      {R"([{"base_host_virt_addr" 0}])", "expected ':'"},
      {"", "expected '['"},
  };
  for (const Case& c : cases) {
    auto r = uffd::parse_handshake(c.json);
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.error().code, EINVAL);
    EXPECT_NE(r.error().message.find(c.expect), std::string::npos)
        << c.json << " -> " << r.error().message;
  }
}

TEST(ServeHandshake, ValidationRefusesBadRegionsNamingTheField) {
  const uint64_t M = 1 << 20;
  struct Case {
    std::vector<ServeRegion> regions;
    const char* expect;
  } cases[] = {
      {{}, "the region array is empty"},
      {{{0x10000, 0, 0, 4096}}, "size is 0"},
      {{{0x10100, 4096, 0, 4096}}, "base_host_virt_addr 0x10100 is not aligned"},
      {{{0x10000, 4000, 0, 4096}}, "size 4000 is not a multiple of page_size"},
      {{{0x10000, 4096, 100, 4096}}, "offset 100 is not aligned"},
      {{{0x10000, 4096, 0, 8192}}, "page_size 8192 is not 4096 (4K) or 2097152 (2M)"},
      {{{0x10000, 4096, 0, 1073741824}}, "page_size 1073741824"},
      {{{0x200000, 2 * M, 0, 4096}, {0x200000 + M, 4096, 0, 4096}}, "region 1: [0x300000, +4096) overlaps region 0"},
      {{{0x200000, 4096, 0, 2 * M}}, "size 4096 is not a multiple of page_size 2097152"},
      {{{0x10000, 8 * M, 4 * M, 4096}}, "reaches past the end of the memory file (8388608 bytes)"},
  };
  for (const Case& c : cases) {
    auto v = uffd::validate_regions(c.regions, 8 * M);
    ASSERT_FALSE(v.ok()) << c.expect;
    EXPECT_NE(v.error().message.find(c.expect), std::string::npos)
        << c.expect << " -> " << v.error().message;
  }
  EXPECT_TRUE(uffd::validate_regions({{0x200000, 2 * M, 0, 2 * M}, {0x600000, 4096, 2 * M, 4096}},
                                     8 * M)
                  .ok());
}

// Every malformed handshake over a real socket: refused with the reason, the connection
// closed, other sessions unaffected.
TEST(ServeHandshake, MalformedHandshakesAreRefusedAndTheServerServesTheNext) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 4 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem).ok());
  const std::string good = R"([{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":4096}])";
  struct Case {
    std::string name;
    std::string json;
    int nfds;  // uffds to send; -1: an eventfd; -2: a userfaultfd without UFFDIO_API
    std::string expect;
  } cases[] = {
      {"no fd", good, 0, "no file descriptor in SCM_RIGHTS"},
      {"two fds", good, 2, "2 file descriptors in SCM_RIGHTS"},
      {"not a userfaultfd", good, -1, "not a userfaultfd"},
      {"UFFDIO_API not called", good, -2, "the userfaultfd is not initialised"},
      {"malformed JSON", "[{\"base_host_virt_addr\":1073741824,,}]", 1, "malformed JSON"},
      {"not an array", "{\"regions\":[]}", 1, "expected '['"},
      {"missing size", R"([{"base_host_virt_addr":1073741824,"offset":0}])", 1,
       "missing field \"size\""},
      {"missing offset", R"([{"base_host_virt_addr":1073741824,"size":4096}])", 1,
       "missing field \"offset\""},
      {"unaligned base", R"([{"base_host_virt_addr":1073741825,"size":4096,"offset":0}])", 1,
       "base_host_virt_addr 0x40000001 is not aligned"},
      {"unaligned offset", R"([{"base_host_virt_addr":1073741824,"size":4096,"offset":12}])", 1,
       "offset 12 is not aligned"},
      {"empty region", R"([{"base_host_virt_addr":1073741824,"size":0,"offset":0}])", 1,
       "size is 0"},
      {"empty array", "[]", 1, "the region array is empty"},
      {"overlap",
       R"([{"base_host_virt_addr":1073741824,"size":8192,"offset":0},{"base_host_virt_addr":1073745920,"size":4096,"offset":8192}])",
       1, "overlaps region 0"},
      {"page size 16K",
       R"([{"base_host_virt_addr":1073741824,"size":16384,"offset":0,"page_size":16384}])", 1,
       "page_size 16384 is not 4096"},
      {"past the end of the file",
       R"([{"base_host_virt_addr":1073741824,"size":8388608,"offset":0}])", 1,
       "reaches past the end of the memory file"},
  };
  size_t n = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    int s = serve_test::connect_to(sock);
    ASSERT_GE(s, 0);
    std::vector<int> fds;
    if (c.nfds == -1) fds.push_back(eventfd(0, EFD_CLOEXEC));
    if (c.nfds == -2) fds.push_back(static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC)));
    for (int i = 0; i < c.nfds; ++i) fds.push_back(serve_test::make_uffd());
    for (int fd : fds) ASSERT_GE(fd, 0);
    ASSERT_TRUE(serve_test::send_with_fds(s, c.json, fds));
    for (int fd : fds) close(fd);
    EXPECT_TRUE(serve_test::closed_by_server(s, std::chrono::seconds(5)));
    close(s);
    auto reports = h.wait_reports(++n);
    ASSERT_EQ(reports.size(), n);
    const uffd::SessionReport& r = reports.back();
    EXPECT_FALSE(r.accepted);
    EXPECT_TRUE(r.failed);
    EXPECT_EQ(r.peer_pid, getpid());
    EXPECT_NE(r.end_reason.find(c.expect), std::string::npos) << r.end_reason;
    EXPECT_NE(uffd::to_string(r).find("refused"), std::string::npos);
  }
  EXPECT_EQ(h.server->sessions_failed(), n);
  // A real VMM is served after all of that.
  auto peer = serve_test::spawn_peer(dir, sock, mem, {"--regions", "1M,2M"});
  ASSERT_TRUE(peer.wait(std::chrono::seconds(30))) << peer.output();
  EXPECT_EQ(peer.exit_code(), 0) << peer.output();
  auto reports = h.wait_reports(n + 1);
  ASSERT_EQ(reports.size(), n + 1);
  EXPECT_TRUE(reports.back().accepted);
  EXPECT_FALSE(reports.back().failed) << reports.back().end_reason;
}

TEST(ServeHandshake, SilentOrHalfMessagesTimeOut) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 1 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem, 1, /*handshake_timeout_ms=*/200).ok());
  int silent = serve_test::connect_to(sock);
  int half = serve_test::connect_to(sock);
  ASSERT_TRUE(serve_test::send_with_fds(half, "[{\"base_host_virt_addr\":", {}));
  EXPECT_TRUE(serve_test::closed_by_server(silent, std::chrono::seconds(5)));
  EXPECT_TRUE(serve_test::closed_by_server(half, std::chrono::seconds(5)));
  close(silent);
  close(half);
  auto reports = h.wait_reports(2);
  ASSERT_EQ(reports.size(), 2u);
  for (auto& r : reports) EXPECT_NE(r.end_reason.find("no complete message within 200 ms"), std::string::npos) << r.end_reason;
  EXPECT_EQ(h.server->active_sessions(), 0u);
}

TEST(ServeHandshake, PeerClosingBeforeTheMessageIsRefused) {
  GFNMAP_SKIP_WITHOUT_UFFD();
  TempDir dir;
  const std::string mem = dir / "mem", sock = dir / "sock";
  serve_test::write_memfile(mem, 1 << 20);
  ServerHarness h;
  ASSERT_TRUE(h.start(sock, mem).ok());
  close(serve_test::connect_to(sock));
  int half = serve_test::connect_to(sock);
  ASSERT_TRUE(serve_test::send_with_fds(half, "[{\"size\":", {}));
  close(half);
  auto reports = h.wait_reports(2);
  ASSERT_EQ(reports.size(), 2u);
  std::string all = reports[0].end_reason + " | " + reports[1].end_reason;
  EXPECT_NE(all.find("without a message"), std::string::npos) << all;
  EXPECT_NE(all.find("in the middle of the message"), std::string::npos) << all;
}

TEST(ServeServer, CreateRefusesBadOptions) {
  TempDir dir;
  const std::string mem = dir / "mem";
  serve_test::write_memfile(mem, 4096);
  uffd::ServeOptions o;
  o.socket_path = dir / "sock";
  o.memory_file = dir / "missing";
  auto r = uffd::ServeServer::create(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ENOENT);
  EXPECT_NE(r.error().message.find("missing"), std::string::npos);
  o.memory_file = mem;
  o.threads = 0;
  EXPECT_EQ(uffd::ServeServer::create(o).code(), EINVAL);
  o.threads = 1;
  o.socket_path = std::string(200, 'x');
  EXPECT_EQ(uffd::ServeServer::create(o).code(), EINVAL);
  o.socket_path = dir / "nodir/sock";
  EXPECT_EQ(uffd::ServeServer::create(o).code(), ENOENT);
}

}  // namespace
}  // namespace gfnmap
