// gfnmap benchmarks: the minimal userfaultfd handler that the page server is compared with:
// one thread, one message per read, one pread of the snapshot and one UFFDIO_COPY per fault.
#pragma once

#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstdint>
#include <thread>

namespace gfnmap::bench {

// Serves missing faults of [base, ...) registered on `uffd` from `snap` at the same offset,
// from construction until stop() (or destruction).
class MinimalUffdHandler {
 public:
  MinimalUffdHandler(int uffd, const char* base, int snap)
      : uffd_(uffd), base_(reinterpret_cast<uint64_t>(base)), snap_(snap),
        stop_(eventfd(0, EFD_CLOEXEC)), thread_([this] { serve(); }) {}
  ~MinimalUffdHandler() { stop(); }
  MinimalUffdHandler(const MinimalUffdHandler&) = delete;
  MinimalUffdHandler& operator=(const MinimalUffdHandler&) = delete;

  void stop() {
    if (!thread_.joinable()) return;
    uint64_t one = 1;
    (void)!write(stop_, &one, sizeof one);
    thread_.join();
    close(stop_);
  }
  // Faults resolved by a successful UFFDIO_COPY (read after stop()).
  uint64_t served() const { return served_; }

 private:
  void serve() {
    alignas(4096) static char page[4096];
    for (;;) {
      pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_, POLLIN, 0}};
      poll(fds, 2, -1);
      if (fds[1].revents) return;
      uffd_msg msg;
      if (read(uffd_, &msg, sizeof msg) != sizeof msg) continue;
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      const uint64_t addr = msg.arg.pagefault.address & ~uint64_t{4095};
      if (pread(snap_, page, 4096, static_cast<off_t>(addr - base_)) != 4096) continue;
      uffdio_copy c{addr, reinterpret_cast<uint64_t>(page), 4096, 0, 0};
      if (ioctl(uffd_, UFFDIO_COPY, &c) == 0) ++served_;
    }
  }

  int uffd_;
  uint64_t base_;
  int snap_;
  int stop_;
  uint64_t served_ = 0;
  std::thread thread_;  // last: starts once every other member is set
};

}  // namespace gfnmap::bench
