// gfnmap tests, LinuxHost helpers: a recording MMU notifier and small memory utilities shared
// by the host_linux, uffd and conformance suites.
#pragma once

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gfnmap/host.h"

namespace gfnmap::testing {

// Records every invalidation it sees; checks that start/end pair up.
class RecordingNotifier final : public MmuNotifier {
 public:
  void invalidate_range_start(Hva start, Hva end) override {
    std::lock_guard lk(mu);
    starts.emplace_back(start.value, end.value);
    ++in_progress;
  }
  void invalidate_range_end(Hva start, Hva end) override {
    std::lock_guard lk(mu);
    ends.emplace_back(start.value, end.value);
    --in_progress;
  }
  bool covered(uint64_t addr) {
    std::lock_guard lk(mu);
    for (auto& [s, e] : starts) {
      if (addr >= s && addr < e) return true;
    }
    return false;
  }
  size_t nr_starts() {
    std::lock_guard lk(mu);
    return starts.size();
  }
  size_t nr_ends() {
    std::lock_guard lk(mu);
    return ends.size();
  }
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> starts, ends;
  int in_progress = 0;
};

// A temporary file on a disk file system (not tmpfs, so its pages can leave the page cache).
struct TempFile {
  int fd = -1;
  std::string path;
  explicit TempFile(size_t size, unsigned char fill = 0) {
    char tmpl[] = "/var/tmp/gfnmap-test-XXXXXX";
    fd = mkstemp(tmpl);
    path = tmpl;
    unlink(tmpl);
    if (fd >= 0) {
      std::vector<unsigned char> buf(size, fill);
      for (size_t i = 0; i < size; i += 4096) buf[i] = static_cast<unsigned char>(i / 4096);
      ssize_t w = write(fd, buf.data(), size);
      (void)w;
    }
  }
  ~TempFile() {
    if (fd >= 0) close(fd);
  }
};

// A forked child that shares this process's private memory until destroyed: every private
// anonymous page present at the fork is then mapped twice (not exclusive), so a read fault of it
// maps it read-only and a write breaks CoW, on every kernel (with or without the zero page).
// The child only blocks on a pipe and exits (async-signal-safe in a threaded parent).
struct ForkedSharer {
  pid_t pid = -1;
  int wake = -1;
  ForkedSharer() {
    int p[2];
    if (pipe(p) != 0) return;
    pid = fork();
    if (pid == 0) {
      close(p[1]);
      char c;
      while (read(p[0], &c, 1) < 0) {
      }
      _exit(0);
    }
    close(p[0]);
    wake = p[1];
  }
  ~ForkedSharer() {
    if (wake >= 0) close(wake);
    if (pid > 0) {
      int status = 0;
      waitpid(pid, &status, 0);
    }
  }
  ForkedSharer(const ForkedSharer&) = delete;
  ForkedSharer& operator=(const ForkedSharer&) = delete;
  bool ok() const { return pid > 0; }
};

inline void* hva_ptr(Hva h) { return reinterpret_cast<void*>(h.value); }
inline unsigned char* hva_bytes(Hva h) { return reinterpret_cast<unsigned char*>(h.value); }

}  // namespace gfnmap::testing
