// gfnmap uffd page server: reads userfaultfd messages, applies events in order, serves missing
// faults from a PageSource with UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_POISON, prefetches.
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "../host/linux/abi.h"
#include "gfnmap/uffd.h"

namespace gfnmap::uffd {

namespace detail {

// Page states of a range.
inline constexpr uint8_t kMissing = 0;   // never placed: fill from the source
inline constexpr uint8_t kPresent = 1;   // placed
inline constexpr uint8_t kRemoved = 2;   // discarded (REMOVE): place a zero page when touched
inline constexpr uint8_t kPoisoned = 3;  // UFFDIO_POISON: touching it fails
inline constexpr uint8_t kGone = 4;      // unmapped or moved away

struct ServerRange {
  Hva start;
  Hva end;
  uint64_t source_offset = 0;
  uint64_t npages = 0;
  bool owned = false;  // mapped by map_lazy: unmapped by the server
  bool in_host = false;
  std::unique_ptr<std::atomic<uint8_t>[]> state;
  std::atomic<uint64_t> prefetch_cursor{0};  // next chunk of the first pass
  std::atomic<uint64_t> sweep_cursor{0};     // second pass: pages the first pass jumped over
  std::atomic<uint64_t> demand_next{0};      // index after the latest demand fault

  ServerRange(Hva s, uint64_t size, uint64_t off)
      : start(s),
        end(s + size),
        source_offset(off),
        npages(size >> kPageShift),
        state(new std::atomic<uint8_t>[size >> kPageShift]()) {}
  Hva page(uint64_t i) const { return start + i * kPageSize; }
};

}  // namespace detail

using detail::kGone;
using detail::kMissing;
using detail::kPoisoned;
using detail::kPresent;
using detail::kRemoved;
using detail::ServerRange;

namespace {

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

void signal_fd(int fd) {
  uint64_t one = 1;
  ssize_t r = write(fd, &one, sizeof one);
  (void)r;
}

void drain_fd(int fd) {
  uint64_t v;
  ssize_t r = read(fd, &v, sizeof v);
  (void)r;
}

bool all_zero(const std::byte* p, size_t n) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < n / 8; ++i) {
    if (w[i]) return false;
  }
  return true;
}

// The calling thread's eventfd for wait_ready.
struct ThreadEventFd {
  int fd = -1;
  ~ThreadEventFd() {
    if (fd >= 0) close(fd);
  }
  int get() {
    if (fd < 0) fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd;
  }
};
thread_local ThreadEventFd t_waitfd;

int open_userfaultfd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return fd;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -1;
  constexpr unsigned long kUserfaultfdIocNew = _IO(0xAA, 0x00);  // USERFAULTFD_IOC_NEW
  fd = ioctl(dev, kUserfaultfdIocNew, O_CLOEXEC | O_NONBLOCK);
  close(dev);
  return fd;
}

}  // namespace

uint64_t PageServerStats::latency_p50_ns() const {
  uint64_t total = 0;
  for (uint64_t c : latency_ns) total += c;
  if (total == 0) return 0;
  uint64_t acc = 0;
  for (int i = 0; i < kLatencyBuckets; ++i) {
    acc += latency_ns[i];
    if (acc * 2 >= total) return uint64_t{2} << i;
  }
  return 0;
}

PageServer::PageServer(PageSource& source, PageServerOptions options)
    : source_(source), options_(std::move(options)) {}

Result<std::unique_ptr<PageServer>> PageServer::create(PageSource& source,
                                                       PageServerOptions options) {
  if (options.handler_threads == 0 || options.handler_threads > 64) {
    return make_error(EINVAL, "PageServer: handler_threads must be 1..64, not ",
                      std::to_string(options.handler_threads));
  }
  if (options.prefetch != PrefetchMode::kOff &&
      (options.prefetch_threads == 0 || options.prefetch_threads > 64)) {
    return make_error(EINVAL, "PageServer: prefetch_threads must be 1..64");
  }
  if (options.prefetch_chunk_pages == 0 || options.prefetch_chunk_pages > 4096) {
    return make_error(EINVAL, "PageServer: prefetch_chunk_pages must be 1..4096");
  }
  for (uint64_t off : options.hot_set) {
    if (off & (kPageSize - 1)) {
      return make_error(EINVAL, "PageServer: hot-set offset ", std::to_string(off),
                        " is not page aligned");
    }
  }
  std::unique_ptr<PageServer> s(new PageServer(source, std::move(options)));
  s->uffd_ = open_userfaultfd();
  if (s->uffd_ < 0) {
    int e = errno;
    return make_error(e, "userfaultfd unavailable: ", std::strerror(e));
  }
  // Probe the features, then enable the ones we use (UFFDIO_API may be called once per fd, so
  // probe on a scratch fd).
  uint64_t wanted = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |
                    UFFD_FEATURE_EVENT_REMAP | linux_abi::kUffdFeaturePoison;
  uint64_t available = 0;
  if (int probe = open_userfaultfd(); probe >= 0) {
    uffdio_api api{UFFD_API, 0, 0};
    if (ioctl(probe, UFFDIO_API, &api) == 0) available = api.features;
    close(probe);
  }
  uffdio_api api{UFFD_API, wanted & available, 0};
  if (ioctl(s->uffd_, UFFDIO_API, &api) != 0) {
    int e = errno;
    return make_error(e, "UFFDIO_API: ", std::strerror(e));
  }
  s->features_.features = api.features;
  s->features_.poison = api.features & linux_abi::kUffdFeaturePoison;
  s->features_.event_remove = api.features & UFFD_FEATURE_EVENT_REMOVE;
  s->features_.event_unmap = api.features & UFFD_FEATURE_EVENT_UNMAP;
  s->features_.event_remap = api.features & UFFD_FEATURE_EVENT_REMAP;
  s->stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  s->queue_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->stop_fd_ < 0 || s->queue_fd_ < 0) {
    int e = errno;
    return make_error(e, "eventfd: ", std::strerror(e));
  }
  return s;
}

PageServer::~PageServer() {
  stop();
  std::vector<std::pair<Hva, uint64_t>> owned;
  {
    std::lock_guard lk(ranges_mu_);
    for (auto& r : ranges_) {
      if (r->in_host && host_) (void)host_->unregister_region(r->start);
      if (r->owned) owned.emplace_back(r->start, r->end - r->start);
    }
  }
  // Close first: with no reader, an UNMAP event would block munmap forever.
  if (uffd_ >= 0) close(uffd_);
  for (auto& [start, size] : owned) munmap(reinterpret_cast<void*>(start.value), size);
  if (stop_fd_ >= 0) close(stop_fd_);
  if (queue_fd_ >= 0) close(queue_fd_);
}

// ---------------------------------------------------------------------------------------------
// Ranges.

Result<void> PageServer::add_range(Hva start, uint64_t size, uint64_t source_offset) {
  if (size == 0 || (start.value | size | source_offset) & (kPageSize - 1)) {
    return make_error(EINVAL, "add_range: [", std::to_string(start.value), ", +",
                      std::to_string(size), ") at source offset ", std::to_string(source_offset),
                      " is empty or not page aligned");
  }
  std::lock_guard lk(ranges_mu_);
  for (auto& r : ranges_) {
    if (r->start < start + size && start < r->end) {
      bool gone = true;
      for (uint64_t i = 0; i < r->npages && gone; ++i) gone = r->state[i].load() == kGone;
      if (!gone) {
        return make_error(EEXIST, "add_range: overlaps the range at ",
                          std::to_string(r->start.value));
      }
    }
  }
  uffdio_register reg{};
  reg.range.start = start.value;
  reg.range.len = size;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) {
    int e = errno;
    return make_error(e, "UFFDIO_REGISTER of [", std::to_string(start.value), ", +",
                      std::to_string(size), "): ", std::strerror(e),
                      e == EINVAL ? " (not mapped, or not anonymous/shmem memory)" : "");
  }
  if (!(reg.ioctls & (uint64_t{1} << _UFFDIO_COPY))) {
    return make_error(EINVAL, "UFFDIO_COPY is not available on this range");
  }
  ranges_.push_back(std::make_unique<ServerRange>(start, size, source_offset));
  return {};
}

Result<Hva> PageServer::map_lazy(LinuxHost* host, uint64_t size, uint64_t source_offset,
                                 int prot) {
  if (size == 0 || (size | source_offset) & (kPageSize - 1)) {
    return make_error(EINVAL, "map_lazy: size ", std::to_string(size), " / offset ",
                      std::to_string(source_offset), " not page aligned or zero");
  }
  if (host && host_ && host != host_) {
    return make_error(EINVAL, "map_lazy: this server already feeds another LinuxHost");
  }
  void* p = mmap(nullptr, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    return make_error(e, "map_lazy: mmap: ", std::strerror(e));
  }
  madvise(p, size, MADV_NOHUGEPAGE);
  Hva start(reinterpret_cast<uint64_t>(p));
  if (auto ok = add_range(start, size, source_offset); !ok) {
    munmap(p, size);
    return ok.error();
  }
  {
    std::lock_guard lk(ranges_mu_);
    ranges_.back()->owned = true;
  }
  if (host) {
    RegionSpec spec;
    spec.kind = RegionKind::kLazy;
    spec.size = size;
    spec.prot = prot;
    spec.addr = start;
    spec.lazy = this;
    auto r = host->register_region(spec);
    if (!r) return r.error();
    host_ = host;
    std::lock_guard lk(ranges_mu_);
    ranges_.back()->in_host = true;
  }
  return start;
}

PageServer::Located PageServer::locate(Hva hva) const {
  std::lock_guard lk(ranges_mu_);
  for (auto it = ranges_.rbegin(); it != ranges_.rend(); ++it) {
    ServerRange& r = **it;
    if (hva >= r.start && hva < r.end) {
      uint64_t i = (hva - r.start) >> kPageShift;
      if (r.state[i].load(std::memory_order_acquire) == kGone) continue;
      return Located{&r, i};
    }
  }
  return {};
}

bool PageServer::fully_populated() const {
  std::lock_guard lk(ranges_mu_);
  for (auto& r : ranges_) {
    for (uint64_t i = 0; i < r->npages; ++i) {
      if (r->state[i].load(std::memory_order_relaxed) == kMissing) return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Threads.

Result<void> PageServer::start() {
  if (running_.exchange(true)) return make_error(EINVAL, "PageServer::start: already started");
  stopping_ = false;
  for (unsigned i = 0; i < options_.handler_threads; ++i) {
    threads_.emplace_back([this, i] { handler_loop(i); });
  }
  if (options_.prefetch != PrefetchMode::kOff) {
    for (unsigned i = 0; i < options_.prefetch_threads; ++i) {
      threads_.emplace_back([this, i] { prefetch_loop(i); });
    }
  }
  return {};
}

void PageServer::stop() {
  if (!running_.load()) return;
  stopping_ = true;
  signal_fd(stop_fd_);
  for (auto& t : threads_) t.join();
  threads_.clear();
  drain_fd(stop_fd_);
  running_ = false;
  notify_waiters();  // waiters see the server stopped
}

void PageServer::handler_loop(unsigned) {
  std::vector<std::byte> buf(kPageSize);
  while (!stopping_.load(std::memory_order_acquire)) {
    pollfd fds[3] = {{uffd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}, {queue_fd_, POLLIN, 0}};
    int n = poll(fds, 3, -1);
    if (n < 0) continue;
    if (fds[1].revents) break;
    if (fds[0].revents & POLLIN) read_and_dispatch();
    if (fds[0].revents & (POLLERR | POLLHUP)) break;
    if (fds[2].revents & POLLIN) {
      std::vector<Hva> work;
      {
        std::lock_guard lk(queue_mu_);
        work.swap(queue_);
        drain_fd(queue_fd_);
      }
      for (Hva h : work) serve_demand(h, 0);
    }
  }
}

// Reads one batch of messages. Events are applied under the exclusive place lock before any
// fault of the batch is served.
bool PageServer::read_and_dispatch() {
  std::unique_lock rd(read_mu_, std::try_to_lock);
  if (!rd.owns_lock()) return false;
  uffd_msg msgs[64];
  ssize_t n;
  struct Event {
    uint8_t kind;
    uint64_t a, b, c;
  };
  std::vector<Event> events;
  {
    std::unique_lock excl(place_lock_);
    n = read(uffd_, msgs, sizeof msgs);
    if (n <= 0) return false;
    const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
    for (size_t i = 0; i < count; ++i) {
      const uffd_msg& m = msgs[i];
      switch (m.event) {
        case UFFD_EVENT_REMOVE: {
          Hva s(m.arg.remove.start), e(m.arg.remove.end);
          for (Hva h = s; h < e; h = h + kPageSize) {
            Located loc = locate(h);
            if (!loc.range) continue;
            auto& st = loc.range->state[loc.index];
            uint8_t cur = st.load();
            if (cur == kPresent || cur == kMissing || cur == kPoisoned) st.store(kRemoved);
          }
          events.push_back({UFFD_EVENT_REMOVE, s.value, e.value, 0});
          removes_.fetch_add(1, std::memory_order_relaxed);
          break;
        }
        case UFFD_EVENT_UNMAP: {
          Hva s(m.arg.remove.start), e(m.arg.remove.end);
          for (Hva h = s; h < e; h = h + kPageSize) {
            Located loc = locate(h);
            if (loc.range) loc.range->state[loc.index].store(kGone);
          }
          events.push_back({UFFD_EVENT_UNMAP, s.value, e.value, 0});
          unmaps_.fetch_add(1, std::memory_order_relaxed);
          break;
        }
        case UFFD_EVENT_REMAP:
          events.push_back({UFFD_EVENT_REMAP, m.arg.remap.from, m.arg.remap.to, m.arg.remap.len});
          remaps_.fetch_add(1, std::memory_order_relaxed);
          handle_remap(Hva(m.arg.remap.from), Hva(m.arg.remap.to), m.arg.remap.len);
          break;
        default:
          break;
      }
    }
  }
  rd.unlock();  // another handler may read the next batch while this one serves
  for (const Event& ev : events) {
    if (ev.kind == UFFD_EVENT_REMOVE) handle_remove(Hva(ev.a), Hva(ev.b));
    if (ev.kind == UFFD_EVENT_UNMAP) handle_unmap(Hva(ev.a), Hva(ev.b));
    if (ev.kind == UFFD_EVENT_REMAP && host_) {
      int prot = PROT_READ | PROT_WRITE;
      for (const RegionInfo& info : host_->regions()) {
        if (info.start <= Hva(ev.a) && Hva(ev.a) < info.end) {
          prot = ((info.vm_flags & kVmRead) ? PROT_READ : 0) |
                 ((info.vm_flags & kVmWrite) ? PROT_WRITE : 0);
        }
      }
      host_->notify_external_unmap(Hva(ev.a), Hva(ev.a + ev.c));
      RegionSpec spec;
      spec.prot = prot;
      spec.kind = RegionKind::kLazy;
      spec.size = ev.c;
      spec.addr = Hva(ev.b);
      spec.lazy = this;
      (void)host_->register_region(spec);
    }
  }
  const uint64_t t = now_ns();
  const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
  for (size_t i = 0; i < count; ++i) {
    if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
    faults_.fetch_add(1, std::memory_order_relaxed);
    demand_epoch_.fetch_add(1, std::memory_order_relaxed);
    serve_demand(Hva(msgs[i].arg.pagefault.address & kPageMask), t);
  }
  return true;
}

void PageServer::handle_remove(Hva start, Hva end) {
  if (!host_) return;
  host_->notify_external_begin(start, end);
  // The zap runs after the event was read: wait (bounded) until every page of the range was
  // seen missing or was placed again after the REMOVE, then end the invalidation.
  const uint64_t deadline = now_ns() + 1000000000ULL;
  std::vector<unsigned char> vec;
  for (;;) {
    bool done = true;
    const uint64_t pages = (end - start) >> kPageShift;
    vec.resize(pages);
    if (mincore(reinterpret_cast<void*>(start.value), end - start, vec.data()) == 0) {
      for (uint64_t i = 0; i < pages && done; ++i) {
        if (!(vec[i] & 1)) continue;
        Located loc = locate(start + i * kPageSize);
        if (loc.range && loc.range->state[loc.index].load() == kRemoved) done = false;
      }
    }
    if (done || now_ns() > deadline) break;
    sched_yield();
  }
  host_->notify_external_end(start, end);
}

void PageServer::handle_unmap(Hva start, Hva end) {
  if (host_) host_->notify_external_unmap(start, end);
}

void PageServer::handle_remap(Hva from, Hva to, uint64_t len) {
  // Called with the place lock held exclusively. The registration moved with the mapping.
  std::lock_guard lk(ranges_mu_);
  for (auto& rp : ranges_) {
    ServerRange& r = *rp;
    if (!(from >= r.start && from < r.end)) continue;
    const uint64_t first = (from - r.start) >> kPageShift;
    const uint64_t n = std::min<uint64_t>(len >> kPageShift, r.npages - first);
    auto moved = std::make_unique<ServerRange>(to, n * kPageSize,
                                               r.source_offset + first * kPageSize);
    for (uint64_t i = 0; i < n; ++i) {
      moved->state[i].store(r.state[first + i].load());
      r.state[first + i].store(kGone);
    }
    moved->owned = false;  // the user moved it: the user unmaps it
    moved->in_host = host_ != nullptr;
    ranges_.push_back(std::move(moved));
    return;
  }
}

// ---------------------------------------------------------------------------------------------
// Placing pages.

void PageServer::wake(Hva start, uint64_t len) {
  uffdio_range range{start.value, len};
  ioctl(uffd_, UFFDIO_WAKE, &range);
}

void PageServer::notify_waiters() {
  if (nr_waiters_.load(std::memory_order_acquire) == 0) return;
  std::lock_guard lk(waiters_mu_);
  for (int fd : waiter_fds_) signal_fd(fd);
}

void PageServer::record_latency(uint64_t ns) {
  int b = 0;
  while (b + 1 < kLatencyBuckets && (uint64_t{2} << b) <= ns) ++b;
  latency_[b].fetch_add(1, std::memory_order_relaxed);
}

long PageServer::place(ServerRange& r, uint64_t index, uint64_t pages, bool demand,
                       std::byte* buf) {
  for (;;) {
    std::shared_lock lk(place_lock_);
    const uint8_t st = r.state[index].load(std::memory_order_acquire);
    if (st == kGone) return -ENOENT;
    if (st == kPresent || st == kPoisoned) {
      if (demand) {
        wake(r.page(index), kPageSize);
        eexist_wakes_.fetch_add(1, std::memory_order_relaxed);
      }
      return 1;
    }
    // Only a run of pages in the same state goes in one ioctl.
    uint64_t run = 1;
    while (run < pages && index + run < r.npages &&
           r.state[index + run].load(std::memory_order_relaxed) == st) {
      ++run;
    }
    const Hva dst = r.page(index);
    const uint64_t len = run * kPageSize;
    Fill fill = Fill::kZero;
    if (st == kMissing) {
      fill = source_.fill(r.source_offset + index * kPageSize, std::span<std::byte>(buf, len));
      if (fill == Fill::kServed && options_.zero_detect && all_zero(buf, len)) fill = Fill::kZero;
    }
    if (fill == Fill::kRetry) {
      source_retries_.fetch_add(1, std::memory_order_relaxed);
      if (!demand) return 0;
      lk.unlock();
      if (stopping_.load()) return -ESHUTDOWN;
      usleep(50);
      continue;
    }
    long rc;
    uint64_t placed_bytes = 0;
    if (fill == Fill::kFailed) {
      source_failures_.fetch_add(1, std::memory_order_relaxed);
      if (!features_.poison) {
        rc = -EIO;
      } else {
        linux_abi::UffdioPoison p{};
        p.range = {dst.value, len};
        rc = ioctl(uffd_, linux_abi::kUffdioPoison, &p) == 0 ? 0 : -errno;
        placed_bytes = p.updated > 0 ? static_cast<uint64_t>(p.updated) : 0;
        if (rc == 0) placed_bytes = len;
        for (uint64_t i = 0; i < placed_bytes / kPageSize; ++i) {
          r.state[index + i].store(kPoisoned, std::memory_order_release);
        }
        poisoned_.fetch_add(placed_bytes / kPageSize, std::memory_order_relaxed);
      }
    } else if (fill == Fill::kZero) {
      uffdio_zeropage z{};
      z.range = {dst.value, len};
      rc = ioctl(uffd_, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : -errno;
      placed_bytes = z.zeropage > 0 ? static_cast<uint64_t>(z.zeropage) : 0;
      if (rc == 0) placed_bytes = len;
      pages_zeroed_.fetch_add(placed_bytes / kPageSize, std::memory_order_relaxed);
    } else {
      uffdio_copy c{};
      c.dst = dst.value;
      c.src = reinterpret_cast<uint64_t>(buf);
      c.len = len;
      rc = ioctl(uffd_, UFFDIO_COPY, &c) == 0 ? 0 : -errno;
      placed_bytes = c.copy > 0 ? static_cast<uint64_t>(c.copy) : 0;
      if (rc == 0) placed_bytes = len;
      pages_copied_.fetch_add(placed_bytes / kPageSize, std::memory_order_relaxed);
    }
    const uint64_t placed = placed_bytes / kPageSize;
    if (fill != Fill::kFailed) {
      for (uint64_t i = 0; i < placed; ++i) {
        r.state[index + i].store(kPresent, std::memory_order_release);
      }
    }
    if (!demand) prefetched_.fetch_add(placed, std::memory_order_relaxed);
    lk.unlock();
    if (placed) notify_waiters();
    if (rc == 0 || placed > 0) return static_cast<long>(placed);
    if (rc == -EEXIST) {
      // Someone placed it first (another handler, prefetch, or the faulter's CoW): wake.
      r.state[index].store(kPresent, std::memory_order_release);
      wake(dst, kPageSize);
      eexist_wakes_.fetch_add(1, std::memory_order_relaxed);
      notify_waiters();
      return 1;
    }
    if (rc == -EAGAIN) {
      // The mm is changing (an event is pending): let the reader apply it, then look again.
      eagain_retries_.fetch_add(1, std::memory_order_relaxed);
      if (stopping_.load()) return -ESHUTDOWN;
      read_and_dispatch();
      sched_yield();
      continue;
    }
    if (rc == -ENOENT || rc == -ESRCH) {
      r.state[index].store(kGone, std::memory_order_release);
      return rc;
    }
    return rc;
  }
}

void PageServer::serve_demand(Hva addr, uint64_t t_read_ns) {
  Located loc = locate(addr);
  if (!loc.range) {
    // Not a page we know (a stale fault after an unmap): wake the faulter so it retries.
    wake(addr, kPageSize);
    return;
  }
  alignas(64) std::byte buf[kPageSize];
  if (options_.record_hot_set &&
      loc.range->state[loc.index].load(std::memory_order_acquire) == kMissing) {
    // Recorded before placing, so the order is the order the faults arrived in.
    std::lock_guard lk(hot_mu_);
    const uint64_t off = loc.range->source_offset + loc.index * kPageSize;
    if (std::find(hot_.begin(), hot_.end(), off) == hot_.end()) hot_.push_back(off);
  }
  loc.range->demand_next.store(loc.index + 1, std::memory_order_relaxed);
  long r = place(*loc.range, loc.index, 1, true, buf);
  if (r >= 0 && t_read_ns) {
    faults_served_.fetch_add(1, std::memory_order_relaxed);
    record_latency(now_ns() - t_read_ns);
  }
}

void PageServer::prefetch_loop(unsigned) {
  const uint64_t chunk = options_.prefetch_chunk_pages;
  std::vector<std::byte> buf(chunk * kPageSize);
  auto stopping = [this] { return stopping_.load(std::memory_order_acquire); };
  if (options_.prefetch == PrefetchMode::kHotSet) {
    for (size_t k = 0; k < options_.hot_set.size() && !stopping(); ++k) {
      const uint64_t off = options_.hot_set[k];
      ServerRange* target = nullptr;
      uint64_t idx = 0;
      {
        std::lock_guard lk(ranges_mu_);
        for (auto& r : ranges_) {
          if (off >= r->source_offset && off < r->source_offset + r->npages * kPageSize) {
            target = r.get();
            idx = (off - r->source_offset) >> kPageShift;
            break;
          }
        }
      }
      if (target && target->state[idx].load() == kMissing) place(*target, idx, 1, false, buf.data());
    }
    return;
  }
  // Sequential: every range front to back; threads share the cursors. The first pass jumps
  // ahead of the latest demand fault (a guest reading sequentially would otherwise race the
  // prefetcher for the same pages); a second pass sweeps up what it jumped over.
  for (;;) {
    if (stopping()) return;
    ServerRange* target = nullptr;
    uint64_t idx = 0;
    {
      std::lock_guard lk(ranges_mu_);
      for (auto& r : ranges_) {
        uint64_t c = r->prefetch_cursor.load();
        const uint64_t ahead = r->demand_next.load(std::memory_order_relaxed) + chunk / 4;
        while (c < ahead && ahead < r->npages &&
               !r->prefetch_cursor.compare_exchange_weak(c, ahead)) {
        }
        idx = r->prefetch_cursor.fetch_add(chunk);
        if (idx < r->npages) {
          target = r.get();
          break;
        }
        idx = r->sweep_cursor.fetch_add(chunk);
        if (idx < r->npages) {
          target = r.get();
          break;
        }
      }
    }
    if (!target) return;
    uint64_t end = std::min(idx + chunk, target->npages);
    while (idx < end && !stopping()) {
      if (target->state[idx].load(std::memory_order_relaxed) != kMissing) {
        ++idx;
        continue;
      }
      uint64_t run = 1;
      while (idx + run < end && target->state[idx + run].load(std::memory_order_relaxed) ==
                                    kMissing) {
        ++run;
      }
      long r = place(*target, idx, run, false, buf.data());
      if (r < 0) break;
      idx += r > 0 ? static_cast<uint64_t>(r) : 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// LazyBacking.

bool PageServer::page_ready(Hva hva) {
  Located loc = locate(hva);
  if (!loc.range) return true;  // not ours: nothing to wait for
  const uint8_t st = loc.range->state[loc.index].load(std::memory_order_acquire);
  return st == kPresent || st == kPoisoned;
}

void PageServer::request(Hva hva) {
  {
    std::lock_guard lk(queue_mu_);
    queue_.push_back(Hva(hva.value & kPageMask));
  }
  signal_fd(queue_fd_);
}

int PageServer::wait_ready(Hva hva, int interrupt_fd) {
  if (page_ready(hva)) return 0;
  if (!running_.load()) return -ENODEV;
  const int efd = t_waitfd.get();
  {
    std::lock_guard lk(waiters_mu_);
    waiter_fds_.push_back(efd);
    nr_waiters_.fetch_add(1, std::memory_order_release);
  }
  request(hva);
  int result = 0;
  for (;;) {
    if (page_ready(hva)) break;
    if (!running_.load() || stopping_.load()) {
      result = -ENODEV;
      break;
    }
    pollfd fds[2] = {{efd, POLLIN, 0}, {interrupt_fd, POLLIN, 0}};
    int n = poll(fds, interrupt_fd >= 0 ? 2 : 1, 100);
    if (n < 0 && errno == EINTR && interrupt_fd >= 0) {
      result = -EINTR;  // a signal handler ran
      break;
    }
    if (n > 0 && interrupt_fd >= 0 && (fds[1].revents & POLLIN)) {
      result = -EINTR;  // a blocked signal is pending
      break;
    }
    if (n > 0 && (fds[0].revents & POLLIN)) drain_fd(efd);
  }
  {
    std::lock_guard lk(waiters_mu_);
    waiter_fds_.erase(std::find(waiter_fds_.begin(), waiter_fds_.end(), efd));
    nr_waiters_.fetch_sub(1, std::memory_order_release);
  }
  return result;
}

int PageServer::poison(Hva start, Hva end) {
  if (!features_.poison) return -EOPNOTSUPP;
  if ((start.value | end.value) & (kPageSize - 1) || end <= start) return -EINVAL;
  std::shared_lock lk(place_lock_);
  for (Hva h = start; h < end; h = h + kPageSize) {
    if (!locate(h).range) return -EINVAL;
  }
  linux_abi::UffdioPoison p{};
  p.range = {start.value, end - start};
  int rc = ioctl(uffd_, linux_abi::kUffdioPoison, &p) == 0 ? 0 : -errno;
  uint64_t done = rc == 0 ? (end - start) : (p.updated > 0 ? static_cast<uint64_t>(p.updated) : 0);
  for (uint64_t off = 0; off < done; off += kPageSize) {
    Located loc = locate(start + off);
    if (loc.range) loc.range->state[loc.index].store(kPoisoned, std::memory_order_release);
  }
  poisoned_.fetch_add(done / kPageSize, std::memory_order_relaxed);
  return rc;
}

// ---------------------------------------------------------------------------------------------
// Statistics.

PageServerStats PageServer::stats() const {
  PageServerStats s;
  s.faults = faults_.load();
  s.faults_served = faults_served_.load();
  s.pages_copied = pages_copied_.load();
  s.pages_zeroed = pages_zeroed_.load();
  s.prefetched = prefetched_.load();
  s.eexist_wakes = eexist_wakes_.load();
  s.eagain_retries = eagain_retries_.load();
  s.source_retries = source_retries_.load();
  s.source_failures = source_failures_.load();
  s.removes = removes_.load();
  s.unmaps = unmaps_.load();
  s.remaps = remaps_.load();
  s.poisoned = poisoned_.load();
  for (int i = 0; i < kLatencyBuckets; ++i) s.latency_ns[i] = latency_[i].load();
  return s;
}

std::vector<uint64_t> PageServer::recorded_hot_set() const {
  std::lock_guard lk(hot_mu_);
  return hot_;
}

}  // namespace gfnmap::uffd
