// gfnmap benchmark: lazy restore of 1 GiB from a file snapshot through userfaultfd. The page
// server (without and with sequential prefetch) against a minimal handler in the same run; the
// medians of faults/s and their ratios to the minimal handler are printed after the table.
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

// Keeps one repetition's rate under `key` for the ratios printed after the table.
void record_rate(const char* key, uint64_t pages, std::chrono::steady_clock::time_point t0) {
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bench::record(key, static_cast<double>(pages) / secs);
}

void set_counters(benchmark::State& state, uint64_t pages) {
  state.counters["faults_per_s"] = benchmark::Counter(
      static_cast<double>(pages) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
}

// The peer: one thread, one message per read, one pread + one UFFDIO_COPY per fault.
void BM_MinimalHandler(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0)) * kMiB;
  int snap = snapshot_fd(size);
  for (auto _ : state) {
    state.PauseTiming();
    int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    uffdio_api api{UFFD_API, 0, 0};
    ioctl(uffd, UFFDIO_API, &api);
    char* p = static_cast<char*>(map_lazy_raw(size));
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(p), size};
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    ioctl(uffd, UFFDIO_REGISTER, &reg);
    bench::MinimalUffdHandler handler(uffd, p, snap);
    state.ResumeTiming();
    const auto t0 = std::chrono::steady_clock::now();
    touch_all(p, size);
    record_rate("minimal handler", size / kPageSize, t0);
    state.PauseTiming();
    handler.stop();
    close(uffd);
    munmap(p, size);
    state.ResumeTiming();
  }
  set_counters(state, size / kPageSize);
}

// The page server with a FileSource. Arg 1: prefetch (0 off, 1 sequential).
void BM_PageServer(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0)) * kMiB;
  const bool prefetch = state.range(1) != 0;
  int snap = snapshot_fd(size);
  auto source = uffd::FileSource::from_fd(snap);
  if (!source.ok()) {
    state.SkipWithError("FileSource");
    return;
  }
  uffd::PageServerStats last;
  for (auto _ : state) {
    state.PauseTiming();
    uffd::PageServerOptions o;
    o.handler_threads = 1;
    o.prefetch = prefetch ? uffd::PrefetchMode::kSequential : uffd::PrefetchMode::kOff;
    o.prefetch_threads = 1;
    o.prefetch_chunk_pages = 512;
    auto server = uffd::PageServer::create(**source, o);
    if (!server.ok()) {
      state.SkipWithError("PageServer::create");
      return;
    }
    auto base = (*server)->map_lazy(nullptr, size);
    state.ResumeTiming();
    const auto t0 = std::chrono::steady_clock::now();
    if (!(*server)->start().ok()) state.SkipWithError("start");
    touch_all(reinterpret_cast<const char*>(base->value), size);
    record_rate(prefetch ? "page server, sequential prefetch" : "page server, no prefetch",
                size / kPageSize, t0);
    state.PauseTiming();
    last = (*server)->stats();
    server->reset();
    state.ResumeTiming();
  }
  set_counters(state, size / kPageSize);
  state.counters["demand_faults"] = static_cast<double>(last.faults);
  state.counters["prefetched"] = static_cast<double>(last.prefetched);
  state.counters["p50_fault_ns"] = static_cast<double>(last.latency_p50_ns());
}

int mib() {
  const char* env = std::getenv("GFNMAP_BENCH_UFFD_MIB");
  return env ? std::atoi(env) : 1024;
}

const bool registered = [] {
  benchmark::RegisterBenchmark("BM_MinimalHandler", BM_MinimalHandler)
      ->Arg(mib())
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("BM_PageServer", BM_PageServer)
      ->Args({mib(), 0})
      ->Args({mib(), 1})
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  return true;
}();

void print_restore_ratios() {
  if (bench::samples().empty()) return;
  bench::print_samples("pages restored per second");
  std::printf("Medians over repetitions (this run), %d MiB:\n", mib());
  const std::pair<const char*, std::string> minimal{"minimal handler", "minimal handler"};
  bench::print_ratios("minimal handler", "minimal handler", {}, "faults/s");
  bench::print_ratios("page server, no prefetch", "page server, no prefetch", {minimal},
                      "faults/s");
  bench::print_ratios("page server, sequential prefetch", "page server, sequential prefetch",
                      {minimal}, "pages/s");
}

}  // namespace
}  // namespace gfnmap

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  gfnmap::bench::add_host_facts_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  gfnmap::print_restore_ratios();
  return 0;
}
