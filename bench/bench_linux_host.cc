// gfnmap benchmark: LinuxHost on real memory. Fault-in of 1 GiB through faultin_pfn against the
// kernel floors, measured beside each repetition (one MADV_POPULATE_WRITE of a GiB followed by
// one write per page, populate only, and per page), and the fast-path hit per call. The medians
// of the 1 GiB rows and of their per-repetition ratios are printed after the table.
//
//   build/release/bench/bench_linux_host --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

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

// One 8-byte write to the start of the page at `p`: the first user touch of a populated page.
// The guest's (or gfnmap's Vcpu's) first write does this after the fault; on some VMs it costs
// as much as the populate or more (a shadow-page fill by the outer hypervisor).
inline void touch_page(char* p) { *reinterpret_cast<volatile uint64_t*>(p) = 1; }

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

// The floors a 1 GiB row runs beside itself in each repetition (bench/same_run.h): a row that
// writes every page against MADV_POPULATE_WRITE of the GiB + one write per page (and populate
// only, labelled); a row that does not write against populate only. Fault-around off makes one
// system call per page, so it also gets the per-page floor of its kind.
std::vector<bench::FloorSpec> floors_for(int64_t fault_around, bool touch) {
  std::vector<bench::FloorSpec> f;
  if (fault_around == 0) {
    f.push_back(touch ? bench::kPerPagePopulateTouch : bench::kPerPagePopulateOnly);
  }
  if (touch) f.push_back(bench::kPopulateTouch);
  f.push_back(bench::kPopulateOnly);
  return f;
}

// Every key of a 1 GiB row and its floors, for the summary after the table.
std::vector<std::pair<std::string, std::vector<bench::FloorSpec>>>& rows() {
  static std::vector<std::pair<std::string, std::vector<bench::FloorSpec>>> r;
  return r;
}
void add_row(const std::string& key, const std::vector<bench::FloorSpec>& floors) {
  for (const auto& [k, f] : rows()) {
    if (k == key) return;
  }
  rows().emplace_back(key, floors);
}

// Runs one 1 GiB row: each iteration creates a 1 GiB anonymous region on `mm` (not timed),
// times `body(host_base)` over it beside the row's floors, and unregisters it (not timed).
template <class Body>
void run_row(benchmark::State& state, LinuxHost& mm, const std::string& key,
             const std::vector<bench::FloorSpec>& floors, Body&& body) {
  warm_up();
  add_row(key, floors);
  for (auto _ : state) {
    auto subject = [&]() -> double {
      RegionSpec spec;
      spec.kind = RegionKind::kAnonymous;
      spec.size = kGiB;
      auto region = mm.create_region(spec);
      if (!region) return -1;
      const auto t0 = std::chrono::steady_clock::now();
      body(region->start);
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      (void)mm.unregister_region(region->start);
      return secs;
    };
    const std::vector<double> secs = bench::run_paired(subject, floors, kGiB);
    if (secs.empty()) {
      state.SkipWithError("mmap / create_region failed");
      return;
    }
    bench::report_paired(state, key, kGiB / kPageSize, secs, floors);
  }
}

// faultin_pfn (write) of every page of a 1 GiB slot on LinuxHost, each released dirty, as the
// MMU does. Arg 0: pfns from /proc/self/pagemap (one extra pread per page; 1: virtual pfns).
// Arg 1: fault-around (set_fault_around). Arg 2 (touch): after each fault-in, one write to the
// page, as the guest's access that faulted does: the work of the populate + touch floor.
void BM_FaultinPfn1G(benchmark::State& state) {
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
  const std::string label = std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") +
                            ", " + fault_around_label(state.range(1)) + (touch ? ", touch" : "");
  state.SetLabel(label);
  run_row(state, mm, "faultin_pfn, " + label, floors_for(state.range(1), touch), [&](Hva start) {
    Memslot slot;
    slot.id = 1;
    slot.base_gfn = Gfn(0x100000);
    slot.npages = kGiB / kPageSize;
    slot.userspace_addr = start;
    auto* host_base = reinterpret_cast<char*>(start.value);
    for (uint64_t i = 0; i < slot.npages; ++i) {
      bool writable = false;
      Page page;
      Pfn pfn = faultin_pfn(mm, &slot, slot.base_gfn + i, kFollWrite, &writable, &page);
      benchmark::DoNotOptimize(pfn);
      if (touch) touch_page(host_base + i * kPageSize);
      release_faultin_page(page, false, writable);
    }
  });
}
BENCHMARK(BM_FaultinPfn1G)
    ->ArgNames({"virtual", "fault_around", "touch"})
    ->Args({0, 1, 1})
    ->Args({1, 1, 1})
    ->Args({0, 0, 1})
    ->Args({1, 0, 1})
    ->Args({0, 64, 1})
    ->Args({0, 1, 0})
    ->Args({1, 1, 0})
    ->Args({0, 0, 0})
    ->Args({1, 0, 0})
    ->Args({0, 16, 0})
    ->Args({0, 64, 0})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// The same fault-in without the touch, calling only the HostMm operations faultin_pfn makes
// (fast lookup, slow GUP, put): LinuxHost's share of BM_FaultinPfn1G; the rest is the
// resolver's. Arg: fault-around.
void BM_HostGup1G(benchmark::State& state) {
  LinuxHost::Options opt;
  set_fault_around(opt, state.range(0));
  auto host = LinuxHost::create(opt);
  if (!host.ok()) {
    state.SkipWithError("LinuxHost::create failed");
    return;
  }
  LinuxHost& mm = **host;
  const std::string label = std::string(mm.pfns_are_physical() ? "pagemap pfns" : "virtual pfns") +
                            ", " + fault_around_label(state.range(0));
  state.SetLabel(label);
  run_row(state, mm, "host calls, " + label, floors_for(state.range(0), false), [&](Hva start) {
    for (uint64_t off = 0; off < kGiB; off += kPageSize) {
      Page page;
      Hva hva = start + off;
      if (!mm.get_user_page_fast_only(hva, kFollWrite, &page)) {
        long r = mm.get_user_pages_unlocked(hva, kFollWrite | kFollHwpoison | kFollHonorNumaFault,
                                            &page);
        benchmark::DoNotOptimize(r);
      }
      mm.put_page(page);
    }
  });
}
BENCHMARK(BM_HostGup1G)->ArgName("fault_around")->Arg(0)->Arg(1)->Arg(64)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

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

// The 1 GiB rows' medians over repetitions and the medians of their per-repetition ratios to
// the floors measured beside them.
void print_fault_in_ratios() {
  if (bench::samples().empty()) return;
  bench::print_samples("ns per 4K page, and ratios");
  std::printf("Medians over repetitions (this run), 1 GiB, ns per 4K page; ratios to the floors "
              "measured beside each repetition:\n");
  auto sorted = rows();
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [key, floors] : sorted) bench::print_paired(key, floors);
}

}  // namespace
}  // namespace gfnmap

int main(int argc, char** argv) {
  return gfnmap::bench::run_benchmarks(argc, argv, gfnmap::print_fault_in_ratios);
}
