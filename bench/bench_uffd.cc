// gfnmap benchmark: lazy restore of 1 GiB from a file snapshot through userfaultfd. The page
// server (without and with sequential prefetch) against a minimal handler, the three in each
// repetition; the medians of their rates and of the per-repetition ratios to the minimal handler
// are printed after the table.
//
//   build/release/bench/bench_uffd --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
// Arg: MiB restored (1024 by default registration; smaller for quick runs with --benchmark_filter).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "gfnmap/uffd.h"
#include "host_facts_banner.h"
#include "minimal_uffd_handler.h"
#include "same_run.h"

namespace gfnmap {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

// A snapshot file of `size` bytes with a non-zero pattern (so no page is a zero page), created
// once in /var/tmp and kept in the page cache across repetitions.
int snapshot_fd(uint64_t size) {
  static int fd = -1;
  static uint64_t have = 0;
  if (fd >= 0 && have >= size) return fd;
  if (fd >= 0) close(fd);
  char path[] = "/var/tmp/gfnmap-bench-snapshot-XXXXXX";
  fd = mkstemp(path);
  unlink(path);
  std::vector<char> buf(kMiB);
  for (uint64_t off = 0; off < size; off += kMiB) {
    for (uint64_t i = 0; i < kMiB; i += 64) buf[i] = static_cast<char>((off + i) / 4096 + 1);
    if (pwrite(fd, buf.data(), kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB)) {
      return -1;
    }
  }
  have = size;
  return fd;
}

void* map_lazy_raw(uint64_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  madvise(p, size, MADV_NOHUGEPAGE);
  return p;
}

// Touches every page once (a read), the guest's first pass over restored memory.
void touch_all(const char* p, uint64_t size) {
  for (uint64_t off = 0; off < size; off += kPageSize) {
    benchmark::DoNotOptimize(*reinterpret_cast<const volatile char*>(p + off));
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The peer: one thread, one message per read, one pread + one UFFDIO_COPY per fault. Returns the
// seconds of the restore (the first touch of every page), < 0 on failure.
double restore_minimal(uint64_t size, int snap) {
  int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  uffdio_api api{UFFD_API, 0, 0};
  if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0) return -1;
  char* p = static_cast<char*>(map_lazy_raw(size));
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(p), size};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return -1;
  double secs = 0;
  {
    bench::MinimalUffdHandler handler(uffd, p, snap);
    const auto t0 = std::chrono::steady_clock::now();
    touch_all(p, size);
    secs = seconds_since(t0);
  }
  close(uffd);
  munmap(p, size);
  return secs;
}

// The page server with a FileSource, one handler thread, with or without sequential prefetch
// (one prefetch thread, 512-page chunks). Returns the seconds of the restore from start()
// through the first touch of every page, < 0 on failure; its stats in *stats.
double restore_server(uint64_t size, uffd::PageSource& source, bool prefetch,
                      uffd::PageServerStats* stats) {
  uffd::PageServerOptions o;
  o.handler_threads = 1;
  o.prefetch = prefetch ? uffd::PrefetchMode::kSequential : uffd::PrefetchMode::kOff;
  o.prefetch_threads = 1;
  o.prefetch_chunk_pages = 512;
  auto server = uffd::PageServer::create(source, o);
  if (!server.ok()) return -1;
  auto base = (*server)->map_lazy(nullptr, size);
  if (!base.ok()) return -1;
  const auto t0 = std::chrono::steady_clock::now();
  if (!(*server)->start().ok()) return -1;
  touch_all(reinterpret_cast<const char*>(base->value), size);
  const double secs = seconds_since(t0);
  *stats = (*server)->stats();
  server->reset();
  return secs;
}

// Lazy restore of Arg MiB, the three ways in each repetition, in an order that rotates between
// repetitions (so the ratios compare runs made under the same load; the rate of one way drifts
// up to 3x between repetitions on a busy 2-core VM). Counters: each way's rate and this
// repetition's ratios to the minimal handler; the time column is the page server's (no prefetch).
void BM_LazyRestore(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0)) * kMiB;
  const double pages = static_cast<double>(size / kPageSize);
  const int snap = snapshot_fd(size);
  if (snap < 0) {
    state.SkipWithError("snapshot file");
    return;
  }
  auto source = uffd::FileSource::from_fd(snap);
  if (!source.ok()) {
    state.SkipWithError("FileSource");
    return;
  }
  static unsigned rotation = 0;
  for (auto _ : state) {
    double secs[3] = {-1, -1, -1};  // minimal, server, server with prefetch
    uffd::PageServerStats stats[3];
    const unsigned first = rotation++ % 3;
    for (unsigned k = 0; k < 3; ++k) {
      const unsigned i = (first + k) % 3;
      secs[i] = i == 0 ? restore_minimal(size, snap)
                       : restore_server(size, **source, i == 2, &stats[i]);
      if (secs[i] < 0) {
        state.SkipWithError("userfaultfd / page server setup failed");
        return;
      }
    }
    state.SetIterationTime(secs[1]);
    const double minimal = pages / secs[0], server = pages / secs[1], prefetch = pages / secs[2];
    state.counters["minimal_faults_per_s"] = minimal;
    state.counters["server_faults_per_s"] = server;
    state.counters["prefetch_pages_per_s"] = prefetch;
    state.counters["server_x_minimal"] = server / minimal;
    state.counters["prefetch_x_minimal"] = prefetch / minimal;
    state.counters["server_p50_fault_ns"] = static_cast<double>(stats[1].latency_p50_ns());
    state.counters["prefetch_demand_faults"] = static_cast<double>(stats[2].faults);
    state.counters["prefetched"] = static_cast<double>(stats[2].prefetched);
    bench::record("minimal handler, faults/s", minimal);
    bench::record("page server, no prefetch, faults/s", server);
    bench::record("page server, sequential prefetch, pages/s", prefetch);
    bench::record("page server, no prefetch x minimal", server / minimal);
    bench::record("page server, sequential prefetch x minimal", prefetch / minimal);
  }
}

int mib() {
  const char* env = std::getenv("GFNMAP_BENCH_UFFD_MIB");
  return env ? std::atoi(env) : 1024;
}

const bool registered = [] {
  benchmark::RegisterBenchmark("BM_LazyRestore", BM_LazyRestore)
      ->ArgName("MiB")
      ->Arg(mib())
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime();
  return true;
}();

// The medians over repetitions of each way's rate and of the per-repetition ratios.
void print_restore_ratios() {
  if (bench::samples().empty()) return;
  bench::print_samples("per repetition");
  std::printf("Medians over repetitions (this run), %d MiB, ratios taken within each repetition:\n",
              mib());
  for (const char* way : {"minimal handler, faults/s", "page server, no prefetch, faults/s",
                          "page server, sequential prefetch, pages/s"}) {
    std::printf("  %-44s %9.0f\n", way, bench::median_of(way));
  }
  for (const char* r : {"page server, no prefetch x minimal",
                        "page server, sequential prefetch x minimal"}) {
    std::printf("  %-44s %9.2fx\n", r, bench::median_of(r));
  }
}

}  // namespace
}  // namespace gfnmap

int main(int argc, char** argv) {
  return gfnmap::bench::run_benchmarks(argc, argv, gfnmap::print_restore_ratios);
}
