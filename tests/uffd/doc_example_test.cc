// gfnmap tests: the example of docs/uffd.md, compiled and run as written there (with a small
// snapshot file created first).
#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include <gtest/gtest.h>

#include "gfnmap/linux_host.h"
#include "gfnmap/uffd.h"

namespace {

using namespace gfnmap;  // NOLINT(google-build-using-namespace): as in the doc

int doc_main() {
  auto host = LinuxHost::create();
  auto snapshot = uffd::FileSource::open("/var/tmp/guest-memory.snap");
  if (!host.ok() || !snapshot.ok()) return 1;
  uffd::PageServerOptions options;
  options.handler_threads = 1;
  options.prefetch = uffd::PrefetchMode::kSequential;  // fill everything in the background
  auto server = uffd::PageServer::create(**snapshot, options);
  if (!server.ok()) return 1;
  // 1 GiB of lazily restored memory, page i = snapshot offset i * 4096; also a kLazy region
  // of the LinuxHost, so the resolver can use it.
  auto base = (*server)->map_lazy(host->get(), 1ull << 30, /*source_offset=*/0);
  if (!base.ok() || !(*server)->start().ok()) return 1;

  auto* memory = reinterpret_cast<volatile char*>(base->value);
  char first = memory[12345];  // any thread may touch it: the server serves the fault
  (void)first;

  uffd::PageServerStats s = (*server)->stats();  // faults, prefetched, latency histogram
  (void)s;
  server->reset();  // stop threads, close the userfaultfd, unmap; before the LinuxHost goes
  return 0;
}

TEST(DocUffd, ExampleRuns) {
  int fd = open("/var/tmp/guest-memory.snap", O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  std::vector<char> page(4096, 7);
  for (int i = 0; i < 16; ++i) ASSERT_EQ(write(fd, page.data(), page.size()), 4096);
  close(fd);
  EXPECT_EQ(doc_main(), 0);
  unlink("/var/tmp/guest-memory.snap");
}

}  // namespace
