// gfnmap userfaultfd page server: lazy population of memory (snapshot restore, post-copy) from a
// pluggable PageSource, with handler threads, prefetch, poison, events and statistics.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "gfnmap/linux_host.h"
#include "gfnmap/types.h"

namespace gfnmap::uffd {

// ---------------------------------------------------------------------------------------------
// Page sources.

// What a source did with a request.
enum class Fill {
  kServed,  // dst holds the content
  kZero,    // the content is all zeros: the server maps zero pages (UFFDIO_ZEROPAGE)
  kRetry,   // not available yet (e.g. still in flight over the network): ask again later
  kFailed,  // cannot be provided: the page is poisoned so the faulting access fails
};
std::string_view to_string(Fill fill);

// The content of the guest memory being restored, addressed by byte offset (page aligned).
// fill() may be called from several server threads at once and must be thread safe.
class PageSource {
 public:
  virtual ~PageSource() = default;
  // Fills dst (a whole number of pages) with the content at [offset, offset + dst.size()).
  virtual Fill fill(uint64_t offset, std::span<std::byte> dst) = 0;
};

// Every page reads as zero.
class ZeroSource final : public PageSource {
 public:
  Fill fill(uint64_t offset, std::span<std::byte> dst) override;
};

// A snapshot file read with pread. Offsets at or past the end of the file read as zero.
class FileSource final : public PageSource {
 public:
  // Opens path read-only. ENOENT/EACCES/... with the path in the message.
  static Result<std::unique_ptr<FileSource>> open(const std::string& path);
  // Uses fd (not owned, must stay open). EBADF when fd is not an open file.
  static Result<std::unique_ptr<FileSource>> from_fd(int fd);
  ~FileSource() override;
  Fill fill(uint64_t offset, std::span<std::byte> dst) override;
  uint64_t size() const { return size_; }

 private:
  FileSource(int fd, bool owned, uint64_t size) : fd_(fd), owned_(owned), size_(size) {}
  int fd_;
  bool owned_;
  uint64_t size_;
};

// A snapshot held in memory (not copied: the bytes must outlive the source). Past the end: zero.
class MemorySource final : public PageSource {
 public:
  explicit MemorySource(std::span<const std::byte> bytes) : bytes_(bytes) {}
  Fill fill(uint64_t offset, std::span<std::byte> dst) override;

 private:
  std::span<const std::byte> bytes_;
};

// ---------------------------------------------------------------------------------------------
// The server.

enum class PrefetchMode {
  kOff,         // serve demand faults only
  kSequential,  // fill every registered range front to back in the background
  kHotSet,      // replay a recorded order of pages first (PageServerOptions::hot_set), then stop
};

struct PageServerOptions {
  unsigned handler_threads = 1;  // threads that serve faults (>= 1); one of them reads the fd
  PrefetchMode prefetch = PrefetchMode::kOff;
  unsigned prefetch_threads = 1;     // background fillers when prefetch is on
  uint64_t prefetch_chunk_pages = 512;  // pages per UFFDIO_COPY when prefetching (2 MiB)
  // kHotSet: source offsets (bytes, page aligned) in the order to load them, usually
  // PageServer::recorded_hot_set() of an earlier run.
  std::vector<uint64_t> hot_set;
  bool record_hot_set = false;  // remember the order of demand faults (recorded_hot_set)
  bool zero_detect = true;      // a served page that is all zero goes in as UFFDIO_ZEROPAGE
};

// Latency histogram of demand faults: bucket i counts faults served in [2^i, 2^(i+1)) ns
// from the moment the server read the fault to the wake-up.
inline constexpr int kLatencyBuckets = 40;

struct PageServerStats {
  uint64_t faults = 0;           // demand faults read from the userfaultfd
  uint64_t faults_served = 0;    // demand faults served (copy, zero page, or already present)
  uint64_t pages_copied = 0;     // pages placed with UFFDIO_COPY (demand + prefetch)
  uint64_t pages_zeroed = 0;     // pages placed with UFFDIO_ZEROPAGE
  uint64_t prefetched = 0;       // pages placed by prefetch
  uint64_t eexist_wakes = 0;     // EEXIST: another thread placed it first, the faulter woken
  uint64_t eagain_retries = 0;   // EAGAIN: the mm was changing, retried
  uint64_t source_retries = 0;   // Fill::kRetry from the source
  uint64_t source_failures = 0;  // Fill::kFailed (page poisoned)
  uint64_t removes = 0;          // UFFD_EVENT_REMOVE handled
  uint64_t unmaps = 0;           // UFFD_EVENT_UNMAP handled
  uint64_t remaps = 0;           // UFFD_EVENT_REMAP handled
  uint64_t poisoned = 0;         // pages poisoned with UFFDIO_POISON
  uint64_t latency_ns[kLatencyBuckets] = {};
  // Median of the demand-fault latency histogram (upper bound of its bucket), 0 if none.
  uint64_t latency_p50_ns() const;
};

// Kernel features found when the server opened its userfaultfd.
struct UffdFeatures {
  uint64_t features = 0;  // UFFD_FEATURE_* the kernel accepted
  bool poison = false;    // UFFDIO_POISON
  bool event_remove = false;
  bool event_unmap = false;
  bool event_remap = false;
};

namespace detail {
struct ServerRange;
}

// A userfaultfd page server. It serves missing-page faults of every thread of this process on
// its ranges (gfnmap's own slow path, any other thread touching the memory, a KVM guest through
// KVM's GUP). Pages come from the PageSource; REMOVE events make a page read as zero when it is
// next touched; UNMAP and REMAP events update the ranges; each event also reaches the LinuxHost
// given to map_lazy as an MMU-notifier invalidation.
//
// Ordering: messages are read by one thread at a time; a batch's events are applied before its
// faults are served, and every UFFDIO_COPY/ZEROPAGE happens under a shared lock that reading
// takes exclusively, so a page is never filled from the source after a REMOVE of it was read.
//
// Threads: handler_threads serve demand faults; prefetch_threads fill in the background and
// yield to demand faults. Destruction stops all threads; faults pending then stay unserved (the
// ranges should be unmapped first, or the faulting threads will wait forever).
class PageServer final : public LazyBacking {
 public:
  // Opens a userfaultfd (the syscall, else /dev/userfaultfd) with the events it needs; starts
  // no thread. EINVAL for bad options; the errno of the syscall when userfaultfd is unavailable.
  static Result<std::unique_ptr<PageServer>> create(PageSource& source, PageServerOptions options);
  ~PageServer() override;
  PageServer(const PageServer&) = delete;
  PageServer& operator=(const PageServer&) = delete;

  // Creates a private anonymous mapping of size bytes, registers it for missing faults (page i
  // comes from source offset source_offset + i * 4096) and, with a host, registers it there as
  // a kLazy region. Returns its start.
  Result<Hva> map_lazy(LinuxHost* host, uint64_t size, uint64_t source_offset = 0, int prot = 3);
  // Registers an existing private anonymous mapping. EINVAL unaligned, EEXIST overlapping a
  // range of this server, the errno of UFFDIO_REGISTER otherwise.
  Result<void> add_range(Hva start, uint64_t size, uint64_t source_offset);

  // Starts the handler (and prefetch) threads. EINVAL when already started.
  Result<void> start();
  // Stops every thread and waits for them. Idempotent.
  void stop();

  PageServerStats stats() const;
  const UffdFeatures& features() const { return features_; }
  // Source offsets of demand faults in the order they were first served (record_hot_set).
  std::vector<uint64_t> recorded_hot_set() const;
  int fd() const { return uffd_; }
  // True once every page of every range has been placed (or removed/poisoned) at least once.
  bool fully_populated() const;

  // LazyBacking (used by LinuxHost for kLazy regions).
  bool page_ready(Hva hva) override;
  void request(Hva hva) override;
  int wait_ready(Hva hva, int interrupt_fd) override;
  int poison(Hva start, Hva end) override;

 private:
  PageServer(PageSource& source, PageServerOptions options);

  struct Located {
    detail::ServerRange* range = nullptr;
    uint64_t index = 0;  // page index inside the range
  };
  Located locate(Hva hva) const;
  void handler_loop(unsigned id);
  void prefetch_loop(unsigned id);
  bool read_and_dispatch();
  void serve_demand(Hva addr, uint64_t t_read_ns);
  // Places `pages` pages at r[index...]; returns the number placed, or -errno.
  long place(detail::ServerRange& r, uint64_t index, uint64_t pages, bool demand,
             std::byte* buf);
  void wake(Hva start, uint64_t len);
  void notify_waiters();
  void handle_remove(Hva start, Hva end);
  void handle_unmap(Hva start, Hva end);
  void handle_remap(Hva from, Hva to, uint64_t len);
  void record_latency(uint64_t ns);

  PageSource& source_;
  PageServerOptions options_;
  UffdFeatures features_;
  int uffd_ = -1;
  int stop_fd_ = -1;   // eventfd: wakes every thread for shutdown
  int queue_fd_ = -1;  // eventfd: queue_ is not empty
  LinuxHost* host_ = nullptr;

  mutable std::mutex ranges_mu_;
  std::vector<std::unique_ptr<detail::ServerRange>> ranges_;  // never shrinks while running

  // Shared by every UFFDIO_COPY/ZEROPAGE, exclusive while reading messages (see class comment).
  mutable std::shared_mutex place_lock_;
  std::mutex read_mu_;  // one reader at a time

  // Demand requests from LinuxHost (interruptible waits, NOWAIT kicks): served by handlers.
  std::mutex queue_mu_;
  std::vector<Hva> queue_;

  std::mutex waiters_mu_;
  std::vector<int> waiter_fds_;  // eventfds of threads in wait_ready
  std::atomic<int> nr_waiters_{0};

  std::atomic<bool> running_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> demand_epoch_{0};  // bumped per demand fault, prefetch yields to it
  std::vector<std::thread> threads_;

  mutable std::mutex hot_mu_;
  std::vector<uint64_t> hot_;

  mutable std::atomic<uint64_t> faults_{0}, faults_served_{0}, pages_copied_{0},
      pages_zeroed_{0}, prefetched_{0}, eexist_wakes_{0}, eagain_retries_{0},
      source_retries_{0}, source_failures_{0}, removes_{0}, unmaps_{0}, remaps_{0},
      poisoned_{0};
  mutable std::atomic<uint64_t> latency_[kLatencyBuckets] = {};
};

}  // namespace gfnmap::uffd
