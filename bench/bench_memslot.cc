// gfnmap memslot benchmarks: gfn -> memslot lookup (cache hit, cache miss, per-vCPU hit) at 1 to
// 32,764 slots beside floors over the same starts (std::upper_bound, branch-free binary search),
// the read section, and create/delete cost.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "gfnmap/memslot.h"
#include "host_facts_banner.h"
#include "memslot/test_peer.h"

namespace {

using namespace gfnmap;

constexpr uint64_t kSlotPages = 512;    // 2 MiB per slot
constexpr uint64_t kStridePages = 1024;  // a 2 MiB hole after every slot
constexpr uint64_t kHvaBase = 0x100000000000ULL;
// Queries per stream (a power of two: the loops index with a mask). Long enough that the branch
// predictor cannot learn the stream: with 4,096 random gfns replayed in a loop, this host's
// predictor learned every branch of a branchy std::upper_bound (16 slots: 2.4 ns against 21 ns
// for 16,384 or more queries), which measures the benchmark's loop, not a search of random gfns.
constexpr size_t kQueries = size_t{1} << 16;
// The old stream length, kept for the floor that shows the effect (BM_Floor_UpperBound_Replay4K).
constexpr size_t kReplayQueries = 4096;

Memslot make_slot(uint32_t i) {
  Memslot m;
  m.id = static_cast<uint16_t>(i);
  m.base_gfn = Gfn(uint64_t{i} * kStridePages);
  m.npages = kSlotPages;
  m.userspace_addr = Hva(kHvaBase + uint64_t{i} * kSlotPages * kPageSize);
  return m;
}

// `n` slots (ids 0..n-1) published in one swap, plus the same layout as plain arrays for the
// floor, and kQueries random gfns, each inside a random slot.
struct Layout {
  std::unique_ptr<Memslots> slots;
  std::vector<uint64_t> starts;  // the floor's sorted array of slot starts
  std::vector<uint64_t> ends;
  std::vector<Gfn> random_gfns;  // spread over every slot: the last-used cache misses
  std::vector<Gfn> one_slot_gfns;  // all inside one slot: the cache hits

  explicit Layout(uint32_t n) : slots(std::make_unique<Memslots>()) {
    std::vector<Memslot> all;
    for (uint32_t i = 0; i < n; ++i) {
      all.push_back(make_slot(i));
      starts.push_back(all.back().base_gfn.value);
      ends.push_back(all.back().end_gfn().value);
    }
    detail::MemslotsTestPeer::bulk_insert(*slots, 0, all);
    std::mt19937_64 rng(42);
    for (size_t q = 0; q < kQueries; ++q) {
      random_gfns.push_back(Gfn((rng() % n) * kStridePages + rng() % kSlotPages));
      one_slot_gfns.push_back(Gfn((n / 2) * kStridePages + rng() % kSlotPages));
    }
  }
};

// Built once per size (32,764 slots take a moment) and shared by the benchmarks of that size.
Layout& layout(uint32_t n) {
  static std::vector<std::pair<uint32_t, std::unique_ptr<Layout>>> cache;
  for (auto& [k, v] : cache) {
    if (k == n) return *v;
  }
  cache.emplace_back(n, std::make_unique<Layout>(n));
  return *cache.back().second;
}

void check_found(benchmark::State& state, size_t found, size_t lookups) {
  if (found != lookups) state.SkipWithError("a lookup missed its slot: layout bug");
}

// ------------------------------------------------------------------------ lookups

// The floors compute what a lookup does, on the same slots and the same random gfns: the index
// of the last slot starting at or below gfn in a sorted std::vector<uint64_t> of slot starts,
// then the bounds test against a parallel array of ends. They pay no cache and return no slot
// pointer. The lookups are held to the faster of the two.

// Floor: std::upper_bound (GCC emits one conditional branch per halving).
template <size_t kStream>
void floor_upper_bound(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const uint64_t gfn = l.random_gfns[i++ & (kStream - 1)].value;
    auto it = std::upper_bound(l.starts.begin(), l.starts.end(), gfn);
    const size_t idx = static_cast<size_t>(it - l.starts.begin());
    const bool hit = idx > 0 && gfn < l.ends[idx - 1];
    found += hit;
    benchmark::DoNotOptimize(idx);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

void BM_Floor_UpperBound(benchmark::State& state) { floor_upper_bound<kQueries>(state); }

// The same floor replaying the first 4,096 gfns (the stream length before the streams grew):
// shows how much of a branchy search the predictor learns when the stream repeats.
void BM_Floor_UpperBound_Replay4K(benchmark::State& state) {
  floor_upper_bound<kReplayQueries>(state);
}

// Floor: branch-free binary search (each halving a conditional move), same array, same result.
void BM_Floor_BranchFree(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const uint64_t gfn = l.random_gfns[i++ & (kQueries - 1)].value;
    const uint64_t* p = l.starts.data();
    size_t n = l.starts.size();
    while (n > 1) {
      const size_t half = n / 2;
      p = p[half] <= gfn ? p + half : p;
      n -= half;
    }
    const size_t idx = static_cast<size_t>(p - l.starts.data()) + (n && *p <= gfn);
    const bool hit = idx > 0 && gfn < l.ends[idx - 1];
    found += hit;
    benchmark::DoNotOptimize(idx);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// gfn_to_memslot with the VM-wide last-used cache missing (random slots).
void BM_GfnToMemslot_Miss(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  auto lock = l.slots->read_lock();
  const MemslotSet& set = lock.set();
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const Memslot* s = set.gfn_to_memslot(l.random_gfns[i++ & (kQueries - 1)]);
    found += s != nullptr;
    benchmark::DoNotOptimize(s);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// search_memslots alone (no cache read or update): the search the miss path pays.
void BM_SearchMemslots(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  auto lock = l.slots->read_lock();
  const MemslotSet& set = lock.set();
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const Memslot* s = set.search_memslots(l.random_gfns[i++ & (kQueries - 1)]);
    found += s != nullptr;
    benchmark::DoNotOptimize(s);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// gfn_to_memslot hitting the VM-wide last-used cache (every gfn in one slot).
void BM_GfnToMemslot_CacheHit(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  auto lock = l.slots->read_lock();
  const MemslotSet& set = lock.set();
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const Memslot* s = set.gfn_to_memslot(l.one_slot_gfns[i++ & (kQueries - 1)]);
    found += s != nullptr;
    benchmark::DoNotOptimize(s);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// The floor of a cache hit: one range test against a remembered slot.
void BM_Floor_CachedRangeTest(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  const Memslot remembered = make_slot(static_cast<uint32_t>(state.range(0)) / 2);
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const Gfn gfn = l.one_slot_gfns[i++ & (kQueries - 1)];
    const bool hit = remembered.contains(gfn);
    found += hit;
    benchmark::DoNotOptimize(hit);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// vcpu_gfn_to_memslot hitting the per-vCPU cache (generation check + range test).
void BM_VcpuGfnToMemslot_Hit(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  auto lock = l.slots->read_lock();
  const MemslotSet& set = lock.set();
  VcpuMemslotCache cache;
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    const Memslot* s = set.vcpu_gfn_to_memslot(cache, l.one_slot_gfns[i++ & (kQueries - 1)]);
    found += s != nullptr;
    benchmark::DoNotOptimize(s);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// An empty read section: srcu_read_lock + srcu_read_unlock, uncontended.
void BM_ReadLock(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  for (auto _ : state) {
    auto lock = l.slots->read_lock();
    benchmark::DoNotOptimize(lock);
  }
}

// The same with MemslotsConfig::membarrier = false (a process whose seccomp filter will deny
// membarrier): the lock count is a seq_cst read-modify-write.
void BM_ReadLock_NoMembarrier(benchmark::State& state) {
  MemslotsConfig config;
  config.membarrier = false;
  Memslots slots(config);
  for (auto _ : state) {
    auto lock = slots.read_lock();
    benchmark::DoNotOptimize(lock);
  }
}

// The whole reader path of a vCPU fault: read section + per-vCPU lookup (cache hit).
void BM_ReadLockAndVcpuLookup(benchmark::State& state) {
  Layout& l = layout(static_cast<uint32_t>(state.range(0)));
  VcpuMemslotCache cache;
  size_t i = 0;
  size_t found = 0;
  for (auto _ : state) {
    auto lock = l.slots->read_lock();
    const Memslot* s =
        lock.set().vcpu_gfn_to_memslot(cache, l.one_slot_gfns[i++ & (kQueries - 1)]);
    found += s != nullptr;
    benchmark::DoNotOptimize(s);
  }
  check_found(state, found, static_cast<size_t>(state.iterations()));
}

// ------------------------------------------------------------------------ updates

// A slot past the end of the layout, with id n - 1 kept free for it: a create takes the set from
// n - 1 to n slots (the lookup benchmarks' size), a delete back.
UserspaceMemoryRegion extra_region(uint32_t n, bool create) {
  UserspaceMemoryRegion r;
  r.slot = n - 1;
  r.guest_phys_addr = (uint64_t{n} + 1) * kStridePages * kPageSize;
  r.memory_size = create ? kSlotPages * kPageSize : 0;
  r.userspace_addr = kHvaBase;
  return r;
}

struct UpdateRig {
  Memslots slots;
  explicit UpdateRig(uint32_t n) {
    std::vector<Memslot> all;
    for (uint32_t i = 0; i + 1 < n; ++i) all.push_back(make_slot(i));
    detail::MemslotsTestPeer::bulk_insert(slots, 0, all);
  }
};

// set_memory_region CREATE: checks, one O(n) set copy, one swap (grace period, no readers).
void BM_Create(benchmark::State& state) {
  const auto n = static_cast<uint32_t>(state.range(0));
  UpdateRig rig(n);
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = rig.slots.set_memory_region(extra_region(n, true));
    const auto t1 = std::chrono::steady_clock::now();
    if (!r.ok() || !rig.slots.set_memory_region(extra_region(n, false)).ok()) {
      state.SkipWithError("create/delete failed");
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
}

// set_memory_region DELETE: two O(n) set copies (INVALID copy, final), two swaps.
void BM_Delete(benchmark::State& state) {
  const auto n = static_cast<uint32_t>(state.range(0));
  UpdateRig rig(n);
  for (auto _ : state) {
    if (!rig.slots.set_memory_region(extra_region(n, true)).ok()) {
      state.SkipWithError("create failed");
      break;
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto r = rig.slots.set_memory_region(extra_region(n, false));
    const auto t1 = std::chrono::steady_clock::now();
    if (!r.ok()) {
      state.SkipWithError("delete failed");
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
}

// BM_Delete while another thread holds an SRCU reader slot (a vCPU thread that has taken a read
// section and idles): every swap's grace period then issues the membarrier, which the writer
// skips while no other thread can be inside a read section.
void BM_Delete_OtherReaderThread(benchmark::State& state) {
  const auto n = static_cast<uint32_t>(state.range(0));
  UpdateRig rig(n);
  std::atomic<bool> stop{false};
  std::atomic<bool> registered{false};
  std::thread vcpu([&] {
    { auto lock = rig.slots.read_lock(); }
    registered = true;
    while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (!registered.load()) std::this_thread::yield();
  for (auto _ : state) {
    if (!rig.slots.set_memory_region(extra_region(n, true)).ok()) {
      state.SkipWithError("create failed");
      break;
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto r = rig.slots.set_memory_region(extra_region(n, false));
    const auto t1 = std::chrono::steady_clock::now();
    if (!r.ok()) {
      state.SkipWithError("delete failed");
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  stop = true;
  vcpu.join();
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int n : {1, 16, 512, 32764}) b->Arg(n);
}

BENCHMARK(BM_Floor_UpperBound)->Apply(sizes);
BENCHMARK(BM_Floor_UpperBound_Replay4K)->Apply(sizes);
BENCHMARK(BM_Floor_BranchFree)->Apply(sizes);
BENCHMARK(BM_GfnToMemslot_Miss)->Apply(sizes);
BENCHMARK(BM_SearchMemslots)->Apply(sizes);
BENCHMARK(BM_Floor_CachedRangeTest)->Apply(sizes);
BENCHMARK(BM_GfnToMemslot_CacheHit)->Apply(sizes);
BENCHMARK(BM_VcpuGfnToMemslot_Hit)->Apply(sizes);
BENCHMARK(BM_ReadLock)->Arg(16);
BENCHMARK(BM_ReadLock_NoMembarrier);
BENCHMARK(BM_ReadLockAndVcpuLookup)->Apply(sizes);
BENCHMARK(BM_Create)->Apply(sizes)->UseManualTime();
BENCHMARK(BM_Delete)->Apply(sizes)->UseManualTime();
BENCHMARK(BM_Delete_OtherReaderThread)->Arg(16)->UseManualTime();

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  gfnmap::bench::add_host_facts_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
