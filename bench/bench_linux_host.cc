// gfnmap benchmark: LinuxHost on real memory. Fault-in of 1 GiB through faultin_pfn against the
// kernel floor (one MADV_POPULATE_WRITE of the same GiB), and the fast-path hit per call.
//
//   build-linux/bench/bench_linux_host --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
#include <sys/mman.h>

#include <cstring>
#include <memory>
#include <string>

#include <benchmark/benchmark.h>

#include "gfnmap/follow.h"
#include "gfnmap/linux_host.h"

namespace gfnmap {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

void* map_anon(uint64_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  madvise(p, size, MADV_NOHUGEPAGE);  // 4K faults, like LinuxHost's anonymous regions
  return p;
}

// Memory freed and left idle is handed back to the outer host (MACHINE.md): touch and free a
// GiB once before measuring so the first repetition is not an outlier.
void warm_up() {
  static bool done = false;
  if (done) return;
  done = true;
  void* p = map_anon(kGiB);
  if (p) {
    madvise(p, kGiB, MADV_POPULATE_WRITE);
    munmap(p, kGiB);
  }
}

void set_page_counters(benchmark::State& state, uint64_t pages) {
  state.counters["ns_per_page"] = benchmark::Counter(
      static_cast<double>(pages) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetItemsProcessed(static_cast<int64_t>(pages * state.iterations()));
}

// The floor: the kernel populates the whole GiB in one call.
void BM_Floor_MadvPopulateWrite1G(benchmark::State& state) {
  warm_up();
  for (auto _ : state) {
    state.PauseTiming();
    void* p = map_anon(kGiB);
    state.ResumeTiming();
    int r = madvise(p, kGiB, MADV_POPULATE_WRITE);
    benchmark::DoNotOptimize(r);
    state.PauseTiming();
    munmap(p, kGiB);
    state.ResumeTiming();
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_Floor_MadvPopulateWrite1G)->Iterations(1)->Unit(benchmark::kMillisecond);

// What one system call per page costs on its own (the part of LinuxHost's slow path that the
// floor does not pay).
void BM_Floor_MadvPopulateWritePerPage1G(benchmark::State& state) {
  warm_up();
  for (auto _ : state) {
    state.PauseTiming();
    auto* p = static_cast<char*>(map_anon(kGiB));
    state.ResumeTiming();
    for (uint64_t off = 0; off < kGiB; off += kPageSize) {
      madvise(p + off, kPageSize, MADV_POPULATE_WRITE);
    }
    state.PauseTiming();
    munmap(p, kGiB);
    state.ResumeTiming();
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_Floor_MadvPopulateWritePerPage1G)->Iterations(1)->Unit(benchmark::kMillisecond);

// Fault-around as one benchmark argument: 0 off (one page per fault, KVM's GUP), 1 sequential
// (LinuxHost's default), N >= 2 a fixed aligned window of N pages.
void set_fault_around(LinuxHost::Options& opt, int64_t arg) {
  opt.fault_around = arg == 0   ? FaultAround::kOff
                     : arg == 1 ? FaultAround::kSequential
                                : FaultAround::kFixed;
  if (arg >= 2) opt.fault_around_pages = static_cast<uint32_t>(arg);
}
std::string fault_around_label(int64_t arg) {
  return arg == 0 ? "fault-around off" : arg == 1 ? "sequential fault-around"
                                                  : "fault-around " + std::to_string(arg);
}

// faultin_pfn (write) of every page of a 1 GiB slot on LinuxHost, each released dirty, as the
// MMU does. Arg 0: pfns from /proc/self/pagemap (one extra pread per page; 1: virtual pfns).
// Arg 1: fault-around (set_fault_around).
void BM_FaultinPfn1G(benchmark::State& state) {
  warm_up();
  LinuxHost::Options opt;
  opt.pfn_source = state.range(0) ? PfnSource::kVirtual : PfnSource::kAuto;
  set_fault_around(opt, state.range(1));
  auto host = LinuxHost::create(opt);
  if (!host.ok()) {
    state.SkipWithError("LinuxHost::create failed");
    return;
  }
  LinuxHost& mm = **host;
  state.SetLabel(std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") + ", " +
                 fault_around_label(state.range(1)));
  for (auto _ : state) {
    state.PauseTiming();
    RegionSpec spec;
    spec.kind = RegionKind::kAnonymous;
    spec.size = kGiB;
    auto region = mm.create_region(spec);
    Memslot slot;
    slot.id = 1;
    slot.base_gfn = Gfn(0x100000);
    slot.npages = kGiB / kPageSize;
    slot.userspace_addr = region->start;
    state.ResumeTiming();
    for (uint64_t i = 0; i < slot.npages; ++i) {
      bool writable = false;
      Page page;
      Pfn pfn = faultin_pfn(mm, &slot, slot.base_gfn + i, kFollWrite, &writable, &page);
      benchmark::DoNotOptimize(pfn);
      release_faultin_page(page, false, writable);
    }
    state.PauseTiming();
    (void)mm.unregister_region(region->start);
    state.ResumeTiming();
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_FaultinPfn1G)
    ->Args({0, 0})
    ->Args({1, 0})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({0, 16})
    ->Args({0, 64})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// The same fault-in, calling only the HostMm operations faultin_pfn makes (fast lookup, slow
// GUP, put): LinuxHost's share of BM_FaultinPfn1G; the rest is the resolver's.
void BM_HostGup1G(benchmark::State& state) {
  warm_up();
  LinuxHost::Options opt;
  set_fault_around(opt, state.range(0));
  auto host = LinuxHost::create(opt);
  if (!host.ok()) {
    state.SkipWithError("LinuxHost::create failed");
    return;
  }
  LinuxHost& mm = **host;
  state.SetLabel(std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") + ", " +
                 fault_around_label(state.range(0)));
  for (auto _ : state) {
    state.PauseTiming();
    RegionSpec spec;
    spec.kind = RegionKind::kAnonymous;
    spec.size = kGiB;
    auto region = mm.create_region(spec);
    state.ResumeTiming();
    for (uint64_t off = 0; off < kGiB; off += kPageSize) {
      Page page;
      Hva hva = region->start + off;
      if (!mm.get_user_page_fast_only(hva, kFollWrite, &page)) {
        long r = mm.get_user_pages_unlocked(hva, kFollWrite | kFollHwpoison | kFollHonorNumaFault,
                                            &page);
        benchmark::DoNotOptimize(r);
      }
      mm.put_page(page);
    }
    state.PauseTiming();
    (void)mm.unregister_region(region->start);
    state.ResumeTiming();
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_HostGup1G)->Arg(0)->Arg(1)->Arg(64)->Iterations(1)->Unit(benchmark::kMillisecond);

// Fast-path hit: HostMm::get_user_page_fast_only + put_page on a populated page.
void BM_FastPathHit(benchmark::State& state) {
  auto host = LinuxHost::create();
  LinuxHost& mm = **host;
  RegionSpec spec;
  spec.size = 64 * kPageSize;
  auto region = mm.create_region(spec);
  for (uint64_t i = 0; i < 64; ++i) {
    Page p;
    if (mm.get_user_pages_unlocked(region->start + i * kPageSize, kFollWrite, &p) == 1) {
      mm.put_page(p);
    }
  }
  uint64_t i = 0;
  for (auto _ : state) {
    Page p;
    bool ok = mm.get_user_page_fast_only(region->start + (i++ & 63) * kPageSize, kFollWrite, &p);
    benchmark::DoNotOptimize(ok);
    mm.put_page(p);
  }
}
BENCHMARK(BM_FastPathHit);

// The resolver's fast path on LinuxHost: faultin_pfn (write) hit + release_faultin_page.
void BM_FaultinPfnFastHit(benchmark::State& state) {
  auto host = LinuxHost::create();
  LinuxHost& mm = **host;
  RegionSpec spec;
  spec.size = 64 * kPageSize;
  auto region = mm.create_region(spec);
  Memslot slot;
  slot.id = 1;
  slot.base_gfn = Gfn(0x100);
  slot.npages = 64;
  slot.userspace_addr = region->start;
  for (uint64_t i = 0; i < 64; ++i) {
    bool w;
    Page p;
    (void)faultin_pfn(mm, &slot, slot.base_gfn + i, kFollWrite, &w, &p);
    release_page_unused(p);
  }
  uint64_t i = 0;
  for (auto _ : state) {
    bool writable;
    Page page;
    Pfn pfn = faultin_pfn(mm, &slot, slot.base_gfn + (i++ & 63), kFollWrite, &writable, &page);
    benchmark::DoNotOptimize(pfn);
    release_faultin_page(page, false, writable);
  }
}
BENCHMARK(BM_FaultinPfnFastHit);

}  // namespace
}  // namespace gfnmap

BENCHMARK_MAIN();
