// gfnmap tests, LinuxHost helpers: a recording MMU notifier and small memory utilities shared
// by the host_linux, uffd and conformance suites.
#pragma once

#include <sys/mman.h>
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

inline void* hva_ptr(Hva h) { return reinterpret_cast<void*>(h.value); }
inline unsigned char* hva_bytes(Hva h) { return reinterpret_cast<unsigned char*>(h.value); }

}  // namespace gfnmap::testing
