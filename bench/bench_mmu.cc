// gfnmap MMU benchmarks: table hit (gpa -> host pointer) against a flat array and a binary search
// in one interleaved run; 1 GiB fault-in vs its floor, MADV_POPULATE_WRITE plus one write per
// page (and vs populate only); invalidation; dirty-log get+clear. The medians of the fault-ins
// and their ratios to the floors of the same run are printed after the table.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "host_facts_banner.h"
#include "same_run.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace {

using namespace gfnmap;

constexpr uint64_t kGuestBase = uint64_t{1} << 32;
constexpr uint64_t kGiB = uint64_t{1} << 30;

// Real memory + memslots + MMU for `bytes` of guest memory split into `nr_slots` slots.
struct Guest {
  std::unique_ptr<LinuxHost> host;
  Memslots slots;
  std::unique_ptr<DirtyLog> dirty;
  std::unique_ptr<Mmu> mmu;
  std::unique_ptr<Vcpu> vcpu;
  Hva base;
  uint64_t bytes = 0;

  // fault_around: LinuxHost's policy, with fault_around_pages for kFixed (the default options:
  // sequential); pte_prefetch: MmuOptions; manual: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on the
  // dirty log (before any slot exists).
  bool init(uint64_t size, unsigned nr_slots, RegionKind kind, benchmark::State& state,
            FaultAround fault_around = FaultAround::kSequential, uint32_t fault_around_pages = 0,
            bool pte_prefetch = false, bool manual = false) {
    bytes = size;
    LinuxHost::Options lo;
    lo.pfn_source = PfnSource::kVirtual;  // pfns are labels here; no pagemap pread per fault
    lo.fault_around = fault_around;
    if (fault_around_pages != 0) lo.fault_around_pages = fault_around_pages;
    auto h = LinuxHost::create(lo);
    if (!h) {
      state.SkipWithError("LinuxHost unavailable");
      return false;
    }
    host = std::move(*h);
    RegionSpec spec;
    spec.kind = kind;
    spec.size = size;
    auto r = host->create_region(spec);
    if (!r) {
      state.SkipWithError(error_to_string(r.error()).c_str());
      return false;
    }
    base = r->start;
    dirty = std::make_unique<DirtyLog>(slots);
    if (manual && !dirty->enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable)) {
      state.SkipWithError("manual dirty-log protect unavailable");
      return false;
    }
    MmuOptions o;
    o.dirty = dirty.get();
    o.pte_prefetch = pte_prefetch;
    mmu = std::make_unique<Mmu>(slots, *host, o);
    uint64_t per = size / nr_slots;
    for (unsigned s = 0; s < nr_slots; ++s) {
      UserspaceMemoryRegion region;
      region.slot = s;
      region.guest_phys_addr = kGuestBase + s * per;
      region.memory_size = per;
      region.userspace_addr = base.value + s * per;
      if (!slots.set_memory_region(region)) {
        state.SkipWithError("set_memory_region failed");
        return false;
      }
    }
    vcpu = std::make_unique<Vcpu>(*mmu, 0);
    return true;
  }
  void touch_all() {
    for (uint64_t off = 0; off < bytes; off += kPageSize) {
      if (!vcpu->try_write_u64(Gpa(kGuestBase + off), off)) {
        (void)vcpu->write_u64(Gpa(kGuestBase + off), off);
      }
    }
  }
  ~Guest() {
    vcpu.reset();
    mmu.reset();
    dirty.reset();
    if (host) (void)host->unregister_region(base);
  }
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// The median of per-iteration timed seconds, in ms (robust to a preempted iteration, unlike
// the mean Google Benchmark reports).
double median_ms(std::vector<double> v) { return 1e3 * median(std::move(v)); }

std::vector<uint64_t> random_offsets(uint64_t bytes, size_t n) {
  std::mt19937_64 rng(42);
  std::vector<uint64_t> v(n);
  for (auto& x : v) x = (rng() % (bytes / 8)) * 8;
  return v;
}

constexpr uint64_t kHitBytes = uint64_t{256} << 20;  // 65,536 pages
constexpr size_t kHitSamples = 1 << 16;
constexpr size_t kHitBurst = 100'000;  // accesses per timed burst
constexpr int kHitRounds = 100;

// ns per access of one burst of kHitBurst random 8-byte reads; access(gpa) returns the value.
template <class Access>
[[gnu::noinline]] double hit_burst(const std::vector<uint64_t>& offs, uint64_t* sink,
                                   Access&& access) {
  uint64_t sum = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < kHitBurst; ++i) sum += access(kGuestBase + offs[i & (kHitSamples - 1)]);
  const auto t1 = std::chrono::steady_clock::now();
  *sink += sum;
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / kHitBurst;
}

// Table hit, gpa -> host pointer, 8-byte random reads of 256 MiB of populated 4K pages split in
// N slots. Four ways over the same memory, in turn, kHitRounds rounds of one burst each:
//  - floor:     a flat array of host page pointers, one per guest page;
//  - bsearch:   vm-memory's find_region, a binary search over the N sorted regions;
//  - vcpu:      Vcpu::try_read_u64 (an access window per access);
//  - guest:     Vcpu::GuestMode::try_read_u64 (one window for the whole burst).
// Counters are medians over the rounds: ns per access, and ratios taken within each round
// (the machine's speed drifts by 2x between rounds; within a round it cancels).
void BM_TableHit(benchmark::State& state) {
  const auto nr = static_cast<unsigned>(state.range(0));
  Guest g;
  if (!g.init(kHitBytes, nr, RegionKind::kAnonymous, state)) return;
  g.touch_all();
  std::byte* mem = reinterpret_cast<std::byte*>(g.base.value);
  std::vector<std::byte*> flat(kHitBytes / kPageSize);
  for (size_t i = 0; i < flat.size(); ++i) flat[i] = mem + i * kPageSize;
  struct Region {
    uint64_t start, size;
    std::byte* host;
  };
  std::vector<Region> regions;
  const uint64_t per = kHitBytes / nr;
  for (unsigned s = 0; s < nr; ++s) regions.push_back({kGuestBase + s * per, per, mem + s * per});
  const auto offs = random_offsets(kHitBytes, kHitSamples);
  const uint64_t faults0 = g.mmu->stats().faults;
  uint64_t sink = 0;
  enum { kFloor, kBsearch, kVcpu, kGuest, kWays };
  std::vector<double> ns[kWays], ratio[kWays];
  for (auto _ : state) {
    for (int round = 0; round < kHitRounds; ++round) {
      double t[kWays];
      t[kFloor] = hit_burst(offs, &sink, [&](uint64_t gpa) {
        uint64_t x;
        std::memcpy(&x, flat[(gpa - kGuestBase) >> kPageShift] + (gpa & (kPageSize - 1)), 8);
        return x;
      });
      t[kBsearch] = hit_burst(offs, &sink, [&](uint64_t gpa) {
        auto it = std::upper_bound(regions.begin(), regions.end(), gpa,
                                   [](uint64_t a, const Region& r) { return a < r.start; });
        const Region& r = *(it - 1);
        uint64_t x;
        std::memcpy(&x, r.host + (gpa - r.start), 8);
        return x;
      });
      Vcpu& v = *g.vcpu;
      // The miss goes to a separate local: a hit's value then never goes through memory.
      t[kVcpu] = hit_burst(offs, &sink, [&](uint64_t gpa) {
        uint64_t x;
        if (v.try_read_u64(Gpa(gpa), &x)) return x;
        uint64_t y = 0;
        (void)v.read_u64(Gpa(gpa), &y);
        return y;
      });
      {
        Vcpu::GuestMode gm(v);
        t[kGuest] = hit_burst(offs, &sink, [&](uint64_t gpa) {
          uint64_t x;
          if (gm.try_read_u64(Gpa(gpa), &x)) return x;
          uint64_t y = 0;
          (void)gm.read_u64(Gpa(gpa), &y);
          return y;
        });
      }
      for (int k = 0; k < kWays; ++k) {
        ns[k].push_back(t[k]);
        ratio[k].push_back(t[k] / t[kFloor]);
      }
    }
  }
  benchmark::DoNotOptimize(sink);
  state.counters["floor_ns"] = median(ns[kFloor]);
  state.counters["bsearch_ns"] = median(ns[kBsearch]);
  state.counters["vcpu_ns"] = median(ns[kVcpu]);
  state.counters["guest_ns"] = median(ns[kGuest]);
  state.counters["bsearch_x_floor"] = median(ratio[kBsearch]);
  state.counters["vcpu_x_floor"] = median(ratio[kVcpu]);
  state.counters["guest_x_floor"] = median(ratio[kGuest]);
  std::vector<double> gb(ns[kGuest].size());
  for (size_t i = 0; i < gb.size(); ++i) gb[i] = ns[kGuest][i] / ns[kBsearch][i];
  state.counters["guest_x_bsearch"] = median(gb);
  state.counters["faults"] = static_cast<double>(g.mmu->stats().faults - faults0);
}
BENCHMARK(BM_TableHit)->Arg(1)->Arg(8)->Arg(64)->Iterations(1)->Unit(benchmark::kMillisecond);

// gfnmap: first-touch write of every page of 1 GiB through Vcpu::write_u64 (8 bytes at the
// start of each 4K page): per page, the resolve (an MMU fault, then the table), the host's
// populate (one per page, or one per fault-around window) and one write. Its floors run beside
// it in each repetition (bench::run_paired): MADV_POPULATE_WRITE of 1 GiB plus one write per
// page, the same work without gfnmap, and populate only, labelled (bench/same_run.h says why
// populate only is no floor on some hosts). The counters x_<floor> are this repetition's ratios.
void fault_in(benchmark::State& state, const std::string& key,
              const std::vector<bench::FloorSpec>& floors, RegionKind kind,
              FaultAround fault_around = FaultAround::kSequential, uint32_t fault_around_pages = 0,
              bool pte_prefetch = false) {
  const uint64_t pages = kGiB / kPageSize;
  // THP: warm the huge pages before each of the three (bench::run_paired says why).
  const bench::FloorSpec* warm = kind == RegionKind::kThp ? &bench::kThpPopulateOnly : nullptr;
  for (auto _ : state) {
    double metadata_pct = 0;
    uint64_t faults = 0;
    uint64_t ahead = 0;
    auto subject = [&]() -> double {
      Guest g;
      if (!g.init(kGiB, 1, kind, state, fault_around, fault_around_pages, pte_prefetch)) return -1;
      auto t0 = std::chrono::steady_clock::now();
      g.touch_all();
      auto t1 = std::chrono::steady_clock::now();
      metadata_pct =
          100.0 * static_cast<double>(g.mmu->metadata_bytes()) / static_cast<double>(kGiB);
      faults = g.mmu->stats().faults;
      ahead = g.host->stats().populated_ahead;
      return std::chrono::duration<double>(t1 - t0).count();
    };
    const std::vector<double> secs = bench::run_paired(subject, floors, kGiB, warm);
    if (secs.empty()) {
      if (!state.error_occurred()) state.SkipWithError("mmap failed");
      return;
    }
    bench::report_paired(state, key, pages, secs, floors);
    state.counters["metadata_pct"] = metadata_pct;
    state.counters["faults_per_page"] = static_cast<double>(faults) / static_cast<double>(pages);
    // Host system calls per page: 1 without fault-around, 1/window with it.
    state.counters["populates_per_page"] =
        1.0 - static_cast<double>(ahead) / static_cast<double>(pages);
  }
}

// The floors of each fault-in below (bench/same_run.h).
constexpr std::initializer_list<bench::FloorSpec> kFloors4K = {bench::kPopulateTouch,
                                                               bench::kPopulateOnly};
// Fault-around off populates one page per system call: its like-for-like floors are per page
// (KVM's shape, one GUP per fault), and the whole-GiB populate + touch shows what the system
// calls cost.
constexpr std::initializer_list<bench::FloorSpec> kFloorsOff = {
    bench::kPerPagePopulateTouch, bench::kPerPagePopulateOnly, bench::kPopulateTouch};
constexpr std::initializer_list<bench::FloorSpec> kFloorsThp = {bench::kThpPopulateTouch,
                                                                bench::kThpPopulateOnly};

// The defaults: LinuxHost's sequential fault-around, no PTE prefetch.
void BM_FaultIn1G_Gfnmap4K(benchmark::State& s) {
  fault_in(s, "gfnmap 4K, default (sequential fault-around)", kFloors4K, RegionKind::kAnonymous);
}
// KVM's shape: one GUP (one MADV_POPULATE_WRITE) per fault.
void BM_FaultIn1G_Gfnmap4KFaultAroundOff(benchmark::State& s) {
  fault_in(s, "gfnmap 4K, fault-around off", kFloorsOff, RegionKind::kAnonymous,
           FaultAround::kOff);
}
void BM_FaultIn1G_GfnmapThp(benchmark::State& s) {
  fault_in(s, "gfnmap THP", kFloorsThp, RegionKind::kThp);
}
// A fixed fault-around window (range(0) pages) with the MMU's PTE prefetch (KVM's
// direct_pte_prefetch): the fault that populates a window also maps the present neighbours of
// its aligned group of 8, so 7 of 8 pages take no fault.
void BM_FaultIn1G_Gfnmap4KFaultAroundPtePrefetch(benchmark::State& s) {
  fault_in(s, "gfnmap 4K, fault-around " + std::to_string(s.range(0)) + " + pte_prefetch",
           kFloors4K, RegionKind::kAnonymous, FaultAround::kFixed,
           static_cast<uint32_t>(s.range(0)), true);
}
BENCHMARK(BM_FaultIn1G_Gfnmap4K)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FaultIn1G_Gfnmap4KFaultAroundOff)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FaultIn1G_Gfnmap4KFaultAroundPtePrefetch)->Arg(64)->Arg(512)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FaultIn1G_GfnmapThp)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

// Invalidation of 1 GiB of 4K leaves (the notifier's work: zap + flush, no host munmap).
void BM_Invalidate1G(benchmark::State& state) {
  Guest g;
  if (!g.init(kGiB, 1, RegionKind::kAnonymous, state)) return;
  for (auto _ : state) {
    state.PauseTiming();
    g.touch_all();
    state.ResumeTiming();
    g.mmu->invalidate_range_start(g.base, g.base + kGiB);
    g.mmu->invalidate_range_end(g.base, g.base + kGiB);
  }
}
BENCHMARK(BM_Invalidate1G)->Iterations(3)->Unit(benchmark::kMillisecond);

// FLAGS_ONLY on the 1 GiB slot 0: dirty logging on (write-protects every leaf).
bool enable_dirty_logging(Guest& g, benchmark::State& state) {
  UserspaceMemoryRegion region;
  region.slot = 0;
  region.flags = kMemLogDirtyPages;
  region.guest_phys_addr = kGuestBase;
  region.memory_size = kGiB;
  region.userspace_addr = g.base.value;
  if (g.slots.set_memory_region(region)) return true;
  state.SkipWithError("enabling dirty logging failed");
  return false;
}

// KVM_GET_DIRTY_LOG of 1 GiB with every page dirty (fetch-and-clear + write-protect + flush).
void BM_DirtyLogGet1G(benchmark::State& state) {
  Guest g;
  if (!g.init(kGiB, 1, RegionKind::kAnonymous, state)) return;
  g.touch_all();
  if (!enable_dirty_logging(g, state)) return;
  std::vector<uint64_t> bm(dirty_bitmap_words(kGiB / kPageSize));
  uint64_t pages = 0;
  for (auto _ : state) {
    state.PauseTiming();
    g.touch_all();  // the fast path marks every page dirty again
    state.ResumeTiming();
    auto r = g.dirty->get_dirty_log(0, bm);
    if (r) pages += *r;
  }
  state.counters["pages_per_get"] =
      static_cast<double>(pages) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_DirtyLogGet1G)->Iterations(3)->Unit(benchmark::kMillisecond);

// Manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), every page dirty: KVM_GET_DIRTY_LOG (a
// copy) then KVM_CLEAR_DIRTY_LOG of the whole slot with the bits just read (clear + write-protect
// the 4K leaves + flush), as a migration round does. Floor: memcpy + memset of the bitmap.
void BM_DirtyLogGetClear1G(benchmark::State& state) {
  Guest g;
  if (!g.init(kGiB, 1, RegionKind::kAnonymous, state, FaultAround::kSequential, 0, false,
              /*manual=*/true)) {
    return;
  }
  g.touch_all();
  if (!enable_dirty_logging(g, state)) return;
  const uint64_t pages_per_slot = kGiB / kPageSize;
  std::vector<uint64_t> bm(dirty_bitmap_words(pages_per_slot));
  uint64_t cleared = 0;
  std::vector<double> times;
  for (auto _ : state) {
    g.touch_all();  // write faults on the protected leaves mark every page dirty again
    auto t0 = std::chrono::steady_clock::now();
    auto r = g.dirty->get_dirty_log(0, bm);
    auto c = g.dirty->clear_dirty_log(0, 0, static_cast<uint32_t>(pages_per_slot), bm);
    auto t1 = std::chrono::steady_clock::now();
    if (!r || !c) {
      state.SkipWithError("get/clear failed");
      return;
    }
    cleared += *c;
    times.push_back(std::chrono::duration<double>(t1 - t0).count());
    state.SetIterationTime(times.back());
  }
  state.counters["ms_median"] = median_ms(times);
  state.counters["pages_per_clear"] =
      static_cast<double>(cleared) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_DirtyLogGetClear1G)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

// The floor of a get+clear: copy the 32 KiB bitmap of 1 GiB out and zero it.
void BM_DirtyLogGetClear1G_MemcpyMemsetFloor(benchmark::State& state) {
  const size_t words = dirty_bitmap_words(kGiB / kPageSize);
  // 2 KiB apart modulo 4 KiB: no 4K aliasing between the copy's loads and stores (see
  // bench_dirty's floor), so this is the best case of the copy.
  std::vector<uint64_t> storage(2 * words + 512);
  std::span<uint64_t> bitmap(storage.data(), words);
  std::span<uint64_t> out(storage.data() + words + 256, words);
  std::vector<double> times;
  for (auto _ : state) {
    std::fill(bitmap.begin(), bitmap.end(), ~uint64_t{0});
    benchmark::ClobberMemory();
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(out.data(), bitmap.data(), words * 8);
    std::memset(bitmap.data(), 0, words * 8);
    benchmark::ClobberMemory();
    auto t1 = std::chrono::steady_clock::now();
    times.push_back(std::chrono::duration<double>(t1 - t0).count());
    state.SetIterationTime(times.back());
  }
  state.counters["ms_median"] = median_ms(times);
}
BENCHMARK(BM_DirtyLogGetClear1G_MemcpyMemsetFloor)->UseManualTime()->Iterations(100)->Unit(benchmark::kMillisecond);

// The fault-ins' medians over repetitions and the medians of their per-repetition ratios.
void print_fault_in_ratios() {
  if (bench::samples().empty()) return;
  bench::print_samples("ns per 4K page, and ratios");
  std::printf("Medians over repetitions (this run), 1 GiB, ns per 4K page; ratios to the floors "
              "measured beside each repetition:\n");
  bench::print_paired("gfnmap 4K, default (sequential fault-around)", kFloors4K);
  bench::print_paired("gfnmap 4K, fault-around off", kFloorsOff);
  bench::print_paired("gfnmap 4K, fault-around 64 + pte_prefetch", kFloors4K);
  bench::print_paired("gfnmap 4K, fault-around 512 + pte_prefetch", kFloors4K);
  bench::print_paired("gfnmap THP", kFloorsThp);
}

}  // namespace

int main(int argc, char** argv) {
  return gfnmap::bench::run_benchmarks(argc, argv, print_fault_in_ratios);
}
