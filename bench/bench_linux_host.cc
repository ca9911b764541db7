// gfnmap benchmark: LinuxHost on real memory. Fault-in of 1 GiB through faultin_pfn against the
// kernel floors (one MADV_POPULATE_WRITE of the same GiB, alone and followed by one write per
// page), and the fast-path hit per call. The medians of the 1 GiB rows and their ratios to the
// floors of the same run are printed after the table.
//
//   build/release/bench/bench_linux_host --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include <benchmark/benchmark.h>

#include "gfnmap/follow.h"
#include "gfnmap/linux_host.h"
#include "host_facts_banner.h"
#include "same_run.h"

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

// Times the 1 GiB rows by hand (wall time, like bench_mmu: a VM's CPU clock may not see the
// outer hypervisor's share of a fault) and keeps each repetition's ns per page under `key`.
class PageTimer {
 public:
  explicit PageTimer(std::string key) : key_(std::move(key)) {}
  void start() { t0_ = std::chrono::steady_clock::now(); }
  void stop(benchmark::State& state) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    state.SetIterationTime(secs);
    bench::record(key_, secs * 1e9 / static_cast<double>(kGiB / kPageSize));
  }

 private:
  std::string key_;
  std::chrono::steady_clock::time_point t0_;
};

// One 8-byte write to the start of the page at `p`: the first user touch of a populated page.
// The guest's (or gfnmap's Vcpu's) first write does this after the fault; on some VMs it costs
// as much as the populate or more (a shadow-page fill by the outer hypervisor).
inline void touch_page(char* p) { *reinterpret_cast<volatile uint64_t*>(p) = 1; }

// The floors: the kernel populates the whole GiB in one call (Arg 0), then one write per page
// (Arg 1: populate + touch, the floor of a fault-in that writes every page).
void BM_Floor_MadvPopulateWrite1G(benchmark::State& state) {
  warm_up();
  const bool touch = state.range(0) != 0;
  PageTimer timer(touch ? "floor: populate + touch" : "floor: populate only");
  for (auto _ : state) {
    auto* p = static_cast<char*>(map_anon(kGiB));
    timer.start();
    int r = madvise(p, kGiB, MADV_POPULATE_WRITE);
    benchmark::DoNotOptimize(r);
    if (touch) {
      for (uint64_t off = 0; off < kGiB; off += kPageSize) touch_page(p + off);
    }
    timer.stop(state);
    munmap(p, kGiB);
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_Floor_MadvPopulateWrite1G)->ArgName("touch")->Arg(1)->Arg(0)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

// What one system call per page costs on its own (the part of LinuxHost's slow path without
// fault-around that the floor does not pay); Arg 1: each page written after its populate.
void BM_Floor_MadvPopulateWritePerPage1G(benchmark::State& state) {
  warm_up();
  const bool touch = state.range(0) != 0;
  PageTimer timer(touch ? "floor: per-page populate + touch" : "floor: per-page populate only");
  for (auto _ : state) {
    auto* p = static_cast<char*>(map_anon(kGiB));
    timer.start();
    for (uint64_t off = 0; off < kGiB; off += kPageSize) {
      madvise(p + off, kPageSize, MADV_POPULATE_WRITE);
      if (touch) touch_page(p + off);
    }
    timer.stop(state);
    munmap(p, kGiB);
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_Floor_MadvPopulateWritePerPage1G)->ArgName("touch")->Arg(1)->Arg(0)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

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

std::string sample_key(const char* what, bool pagemap, int64_t fault_around, bool touch) {
  return std::string(what) + (pagemap ? ", pagemap pfns, " : ", virtual pfns, ") +
         fault_around_label(fault_around) + (touch ? ", touch" : "");
}

// faultin_pfn (write) of every page of a 1 GiB slot on LinuxHost, each released dirty, as the
// MMU does. Arg 0: pfns from /proc/self/pagemap (one extra pread per page; 1: virtual pfns).
// Arg 1: fault-around (set_fault_around). Arg 2 (touch): after each fault-in, one write to the
// page, as the guest's access that faulted does; its floor is populate + touch, and without
// the touch it is populate only.
void BM_FaultinPfn1G(benchmark::State& state) {
  warm_up();
  LinuxHost::Options opt;
  opt.pfn_source = state.range(0) ? PfnSource::kVirtual : PfnSource::kAuto;
  set_fault_around(opt, state.range(1));
  const bool touch = state.range(2) != 0;
  auto host = LinuxHost::create(opt);
  if (!host.ok()) {
    state.SkipWithError("LinuxHost::create failed");
    return;
  }
  LinuxHost& mm = **host;
  state.SetLabel(std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") + ", " +
                 fault_around_label(state.range(1)) + (touch ? ", touch" : ""));
  PageTimer timer(sample_key("faultin_pfn", mm.pfns_are_physical(), state.range(1), touch));
  for (auto _ : state) {
    RegionSpec spec;
    spec.kind = RegionKind::kAnonymous;
    spec.size = kGiB;
    auto region = mm.create_region(spec);
    Memslot slot;
    slot.id = 1;
    slot.base_gfn = Gfn(0x100000);
    slot.npages = kGiB / kPageSize;
    slot.userspace_addr = region->start;
    auto* host_base = reinterpret_cast<char*>(region->start.value);
    timer.start();
    for (uint64_t i = 0; i < slot.npages; ++i) {
      bool writable = false;
      Page page;
      Pfn pfn = faultin_pfn(mm, &slot, slot.base_gfn + i, kFollWrite, &writable, &page);
      benchmark::DoNotOptimize(pfn);
      if (touch) touch_page(host_base + i * kPageSize);
      release_faultin_page(page, false, writable);
    }
    timer.stop(state);
    (void)mm.unregister_region(region->start);
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_FaultinPfn1G)
    ->ArgNames({"virtual", "fault_around", "touch"})
    ->Args({0, 0, 1})
    ->Args({1, 0, 1})
    ->Args({0, 1, 1})
    ->Args({1, 1, 1})
    ->Args({0, 64, 1})
    ->Args({0, 0, 0})
    ->Args({1, 0, 0})
    ->Args({0, 1, 0})
    ->Args({1, 1, 0})
    ->Args({0, 16, 0})
    ->Args({0, 64, 0})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// The same fault-in, calling only the HostMm operations faultin_pfn makes (fast lookup, slow
// GUP, put): LinuxHost's share of BM_FaultinPfn1G; the rest is the resolver's. Arg 1: touch.
void BM_HostGup1G(benchmark::State& state) {
  warm_up();
  LinuxHost::Options opt;
  set_fault_around(opt, state.range(0));
  const bool touch = state.range(1) != 0;
  auto host = LinuxHost::create(opt);
  if (!host.ok()) {
    state.SkipWithError("LinuxHost::create failed");
    return;
  }
  LinuxHost& mm = **host;
  state.SetLabel(std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") + ", " +
                 fault_around_label(state.range(0)) + (touch ? ", touch" : ""));
  PageTimer timer(sample_key("host calls", mm.pfns_are_physical(), state.range(0), touch));
  for (auto _ : state) {
    RegionSpec spec;
    spec.kind = RegionKind::kAnonymous;
    spec.size = kGiB;
    auto region = mm.create_region(spec);
    timer.start();
    for (uint64_t off = 0; off < kGiB; off += kPageSize) {
      Page page;
      Hva hva = region->start + off;
      if (!mm.get_user_page_fast_only(hva, kFollWrite, &page)) {
        long r = mm.get_user_pages_unlocked(hva, kFollWrite | kFollHwpoison | kFollHonorNumaFault,
                                            &page);
        benchmark::DoNotOptimize(r);
      }
      if (touch) touch_page(reinterpret_cast<char*>(hva.value));
      mm.put_page(page);
    }
    timer.stop(state);
    (void)mm.unregister_region(region->start);
  }
  set_page_counters(state, kGiB / kPageSize);
}
BENCHMARK(BM_HostGup1G)
    ->ArgNames({"fault_around", "touch"})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({64, 1})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Args({64, 0})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

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

// The 1 GiB rows' medians over repetitions and their ratios to the floors of this run: rows that
// write every page against populate + touch (and populate only, labelled), rows that do not
// against populate only; fault-around off also against the per-page floors.
void print_fault_in_ratios() {
  if (bench::samples().empty()) return;
  bench::print_samples("ns per 4K page");
  std::printf("Medians over repetitions (this run), 1 GiB, ns per 4K page:\n");
  const std::pair<const char*, std::string> touch{"populate+touch", "floor: populate + touch"};
  const std::pair<const char*, std::string> only{"populate only", "floor: populate only"};
  const std::pair<const char*, std::string> pp_touch{"per-page populate+touch",
                                                     "floor: per-page populate + touch"};
  const std::pair<const char*, std::string> pp_only{"per-page populate only",
                                                    "floor: per-page populate only"};
  bench::print_ratios("floor: populate + touch", touch.second, {only});
  bench::print_ratios("floor: per-page populate + touch", pp_touch.second, {pp_only});
  for (const auto& [key, values] : bench::samples()) {
    if (key.rfind("floor", 0) == 0) continue;
    const bool touched = key.size() > 7 && key.compare(key.size() - 7, 7, ", touch") == 0;
    const bool off = key.find("fault-around off") != std::string::npos;
    if (touched && off) {
      bench::print_ratios(key.c_str(), key, {pp_touch, touch, only});
    } else if (touched) {
      bench::print_ratios(key.c_str(), key, {touch, only});
    } else if (off) {
      bench::print_ratios(key.c_str(), key, {pp_only, only});
    } else {
      bench::print_ratios(key.c_str(), key, {only});
    }
  }
}

}  // namespace
}  // namespace gfnmap

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  gfnmap::bench::add_host_facts_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  gfnmap::print_fault_in_ratios();
  return 0;
}
