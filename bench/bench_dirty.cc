// gfnmap dirty-log benchmarks: KVM_GET_DIRTY_LOG and manual GET+CLEAR of a 1 GiB slot (262,144
// pages, sparse and dense bitmaps) against a memcpy+memset floor, and dirty-ring push/harvest/reset.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"
#include "host_facts_banner.h"

namespace {

using namespace gfnmap;

constexpr uint64_t kPages = uint64_t{1} << 18;  // 1 GiB of 4 KiB pages
constexpr uint64_t kWords = kPages / 64;        // 32 KiB of bitmap
constexpr uint64_t kGpa = uint64_t{1} << 32;
constexpr uint64_t kHva = 0x7f0000000000ULL;
constexpr uint16_t kSlot = 1;

// Counts the reported bits and nothing else: the MMU's write-protect cost is not measured here.
class CountingProtector : public DirtyWriteProtector {
 public:
  void write_protect(const Memslot& /*slot*/, Gfn /*base*/, uint64_t mask) override {
    bits += static_cast<uint64_t>(__builtin_popcountll(mask));
  }
  uint64_t bits = 0;
};

// Page offsets to dirty: every page (dense) or one in 1024 at random (sparse, ~6% of the
// bitmap words non-zero).
std::vector<uint64_t> dirty_pages(bool dense) {
  std::vector<uint64_t> pages;
  if (dense) {
    pages.resize(kPages);
    for (uint64_t i = 0; i < kPages; ++i) pages[i] = i;
    return pages;
  }
  std::mt19937_64 rng(7);
  for (uint64_t i = 0; i < kPages / 1024; ++i) pages.push_back(rng() % kPages);
  return pages;
}

// The set-up between timed regions (re-dirtying up to 262,144 pages) costs far more than the
// operations measured, so these benchmarks time each operation by hand (UseManualTime) with a
// fixed iteration count instead of pausing the timer: the run takes seconds, not minutes.
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
// Iterations per repetition: sparse set-ups are cheap, dense ones mark every page (~ms each).
constexpr int64_t kSparseIters = 2000;
constexpr int64_t kDenseIters = 200;

// A VM with one 1 GiB slot logging dirty pages.
struct Vm {
  Memslots slots;
  DirtyLog log{slots};
  CountingProtector wp;
  Memslot slot;

  explicit Vm(bool manual) {
    log.set_write_protector(&wp);
    if (!log.enable_manual_dirty_log_protect(manual ? kDirtyLogManualProtectEnable : 0).ok()) {
      std::abort();
    }
    UserspaceMemoryRegion r;
    r.slot = kSlot;
    r.flags = kMemLogDirtyPages;
    r.guest_phys_addr = kGpa;
    r.memory_size = kPages * kPageSize;
    r.userspace_addr = kHva;
    if (!slots.set_memory_region(r).ok()) std::abort();
    auto lock = slots.read_lock();
    slot = *lock.set(0).id_to_memslot(kSlot);
  }
  void mark(const std::vector<uint64_t>& pages) {
    auto lock = slots.read_lock();
    const Memslot* s = lock.set(0).id_to_memslot(kSlot);
    for (uint64_t p : pages) log.mark_page_dirty_in_slot(*s, s->base_gfn + p);
  }
};

// The timed wall times of one repetition. On a loaded machine a preempted iteration inflates
// the mean (the time Google Benchmark reports); the median of the iterations does not.
struct Samples {
  std::vector<double> seconds;
  void add(benchmark::State& state, double dt) {
    state.SetIterationTime(dt);
    seconds.push_back(dt);
  }
  double median() {
    if (seconds.empty()) return 0;
    std::nth_element(seconds.begin(), seconds.begin() + seconds.size() / 2, seconds.end());
    return seconds[seconds.size() / 2];
  }
};

// us_median: the median timed iteration; ns_per_page: the same per guest page of the slot;
// dirty_per_iter: the pages reported per call, to check the sparse / dense set-up.
void set_page_counters(benchmark::State& state, uint64_t reported, Samples& timed) {
  const double med = timed.median();
  state.counters["us_median"] = 1e6 * med;
  state.counters["ns_per_page"] = 1e9 * med / static_cast<double>(kPages);
  state.counters["dirty_per_iter"] =
      static_cast<double>(reported) / static_cast<double>(state.iterations());
}

// The floor: what any get+clear must at least do, copy the bitmap out and zero it.
void BM_Floor_MemcpyMemset(benchmark::State& state) {
  const bool dense = state.range(0) != 0;
  // Source and destination 2 KiB apart modulo 4 KiB: when they are a multiple of 4 KiB (plus a
  // few bytes) apart, as two back-to-back allocations are, every load 4K-aliases a recent
  // store and the copy runs ~10x slower (measured here: 1.6 us vs 15-20 us).
  std::vector<uint64_t> storage(2 * kWords + 512);
  std::span<uint64_t> bitmap(storage.data(), kWords);
  std::span<uint64_t> out(storage.data() + kWords + 256, kWords);
  const std::vector<uint64_t> pages = dirty_pages(dense);
  Samples timed;
  for (auto _ : state) {
    for (uint64_t p : pages) bitmap[p / 64] |= uint64_t{1} << (p % 64);
    benchmark::ClobberMemory();
    const auto t0 = Clock::now();
    std::memcpy(out.data(), bitmap.data(), kWords * 8);
    std::memset(bitmap.data(), 0, kWords * 8);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    timed.add(state, seconds_since(t0));
  }
  set_page_counters(state, 0, timed);
}

// KVM_GET_DIRTY_LOG without manual protect: per-word atomic fetch-and-clear + write-protect.
void BM_GetDirtyLog(benchmark::State& state) {
  const bool dense = state.range(0) != 0;
  Vm vm(/*manual=*/false);
  std::vector<uint64_t> out(kWords);
  const std::vector<uint64_t> pages = dirty_pages(dense);
  uint64_t reported = 0;
  Samples timed;
  for (auto _ : state) {
    vm.mark(pages);
    const auto t0 = Clock::now();
    auto r = vm.log.get_dirty_log(kSlot, out);
    timed.add(state, seconds_since(t0));
    if (!r.ok()) state.SkipWithError("get_dirty_log failed");
    reported += r.ok() ? *r : 0;
    benchmark::DoNotOptimize(out.data());
  }
  set_page_counters(state, reported, timed);
}

// Manual protect: KVM_GET_DIRTY_LOG (copy) then KVM_CLEAR_DIRTY_LOG of the whole slot with the
// bits just read (atomic and-not + write-protect), as a migration loop does.
void BM_GetThenClearDirtyLog(benchmark::State& state) {
  const bool dense = state.range(0) != 0;
  Vm vm(/*manual=*/true);
  std::vector<uint64_t> out(kWords);
  const std::vector<uint64_t> pages = dirty_pages(dense);
  uint64_t reported = 0;
  Samples timed;
  for (auto _ : state) {
    vm.mark(pages);
    const auto t0 = Clock::now();
    auto g = vm.log.get_dirty_log(kSlot, out);
    auto c = vm.log.clear_dirty_log(kSlot, 0, static_cast<uint32_t>(kPages), out);
    timed.add(state, seconds_since(t0));
    if (!g.ok() || !c.ok()) state.SkipWithError("get/clear failed");
    reported += c.ok() ? *c : 0;
    benchmark::DoNotOptimize(out.data());
  }
  set_page_counters(state, reported, timed);
}

// The range-list view of a harvested bitmap.
void BM_BitmapToRanges(benchmark::State& state) {
  const bool dense = state.range(0) != 0;
  std::vector<uint64_t> bitmap(kWords);
  for (uint64_t p : dirty_pages(dense)) bitmap[p / 64] |= uint64_t{1} << (p % 64);
  for (auto _ : state) {
    auto ranges = dirty_bitmap_to_ranges(Gfn(kGpa >> kPageShift), bitmap, kPages);
    benchmark::DoNotOptimize(ranges.data());
  }
  state.counters["ns_per_page"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kPages),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Dirty ring: one vCPU pushes up to the soft limit (as mark_page_dirty_in_slot does), the VMM
// harvests, KVM_RESET_DIRTY_RINGS re-protects; ns per entry for the whole cycle. range(0):
// 0 = sequential gfns (reset batches 64 per window), 1 = random gfns.
void BM_RingPushHarvestReset(benchmark::State& state) {
  const bool random = state.range(0) != 0;
  Memslots slots;
  DirtyLog log(slots);
  CountingProtector wp;
  log.set_write_protector(&wp);
  if (!log.enable_dirty_ring(65536).ok()) std::abort();  // 4096 entries
  UserspaceMemoryRegion r;
  r.slot = kSlot;
  r.flags = kMemLogDirtyPages;
  r.guest_phys_addr = kGpa;
  r.memory_size = kPages * kPageSize;
  r.userspace_addr = kHva;
  if (!slots.set_memory_region(r).ok()) std::abort();
  DirtyRing* ring = *log.create_vcpu(0);
  const uint32_t n = ring->soft_limit();
  std::vector<uint64_t> offsets(n);
  std::mt19937_64 rng(3);
  for (uint32_t i = 0; i < n; ++i) offsets[i] = random ? rng() % kPages : i;
  uint64_t harvested = 0;
  for (auto _ : state) {
    {
      auto lock = slots.read_lock();
      const Memslot* s = lock.set(0).id_to_memslot(kSlot);
      for (uint64_t off : offsets) log.mark_page_dirty_in_slot(*s, s->base_gfn + off, ring);
    }
    harvested += ring->harvest([](uint32_t, uint64_t off) { benchmark::DoNotOptimize(off); });
    auto reset = log.reset_dirty_rings();
    if (!reset.ok() || *reset != n) state.SkipWithError("reset count");
  }
  state.counters["ns_per_entry"] = benchmark::Counter(
      static_cast<double>(harvested), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// The ring floor: write n 16-byte entries into an array, read them back, zero the flags.
void BM_RingFloor(benchmark::State& state) {
  constexpr uint32_t n = 4096 - kDirtyRingRsvdEntries;
  struct Entry {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
  };
  std::vector<Entry> entries(4096);
  uint64_t harvested = 0;
  for (auto _ : state) {
    for (uint32_t i = 0; i < n; ++i) entries[i] = Entry{1, kSlot, i};
    benchmark::ClobberMemory();
    uint64_t sum = 0;
    for (uint32_t i = 0; i < n; ++i) {
      sum += entries[i].offset;
      entries[i].flags = 0;
    }
    benchmark::DoNotOptimize(sum);
    harvested += n;
  }
  state.counters["ns_per_entry"] = benchmark::Counter(
      static_cast<double>(harvested), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

}  // namespace

// Arg: 0 = sparse (1 page in 1024), 1 = dense (every page).
// The three bitmap benchmarks time by hand with fixed iteration counts (see seconds_since).
void manual_args(benchmark::internal::Benchmark* b) {
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}
BENCHMARK(BM_Floor_MemcpyMemset)->Apply(manual_args)->Arg(0)->Iterations(kSparseIters);
BENCHMARK(BM_Floor_MemcpyMemset)->Apply(manual_args)->Arg(1)->Iterations(kDenseIters);
BENCHMARK(BM_GetDirtyLog)->Apply(manual_args)->Arg(0)->Iterations(kSparseIters);
BENCHMARK(BM_GetDirtyLog)->Apply(manual_args)->Arg(1)->Iterations(kDenseIters);
BENCHMARK(BM_GetThenClearDirtyLog)->Apply(manual_args)->Arg(0)->Iterations(kSparseIters);
BENCHMARK(BM_GetThenClearDirtyLog)->Apply(manual_args)->Arg(1)->Iterations(kDenseIters);
BENCHMARK(BM_BitmapToRanges)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RingFloor)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RingPushHarvestReset)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

int main(int argc, char** argv) { return gfnmap::bench::run_benchmarks(argc, argv); }
