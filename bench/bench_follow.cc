// gfnmap follow benchmarks: the resolver's fast, slow and remapped paths on SimHost, ns per call,
// each next to its floor in the same run (the bare SimHost calls the path is built from).
#include <benchmark/benchmark.h>

#include "gfnmap/follow.h"
#include "gfnmap/memslot.h"
#include "gfnmap/sim_host.h"
#include "host_facts_banner.h"

namespace {

using namespace gfnmap;

constexpr uint64_t kPages = 16;

// A SimHost with one 16-page VMA of `kind` and a slot over it; page 1 is the page under test.
struct Rig {
  SimHost host;
  Memslot slot;
  Gfn gfn{0x101};
  Hva hva;

  bool init(benchmark::State& state, VmaKind kind, bool populate_write, bool populate_read) {
    Result<Hva> start = host.mmap(kPages * kPageSize, kProtRW, kind);
    if (!start.ok()) {
      state.SkipWithError(error_to_string(start.error()).c_str());
      return false;
    }
    slot.id = 1;
    slot.base_gfn = Gfn(0x100);
    slot.npages = kPages;
    slot.userspace_addr = *start;
    hva = *start + kPageSize;
    if (populate_write && !host.populate(hva, kPageSize, true).ok()) {
      state.SkipWithError("populate(write) failed");
      return false;
    }
    if (populate_read && !host.populate(hva, kPageSize, false).ok()) {
      state.SkipWithError("populate(read) failed");
      return false;
    }
    return true;
  }
  // Every benchmark must leave the model balanced, or its numbers measure a broken path.
  void finish(benchmark::State& state) {
    if (host.outstanding_refs() != 0 || host.violations() != 0) {
      state.SkipWithError("references left or protocol violations");
    }
  }
};

// ------------------------------------------------------------------------ fast path

// Floor: what the fast path costs at least, the lockless write lookup and the put.
void BM_Floor_FastOnlyPut(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    Page page;
    if (!r.host.get_user_page_fast_only(r.hva, kFollWrite, &page)) {
      state.SkipWithError("fast lookup missed");
      break;
    }
    r.host.put_page(page);
  }
  r.finish(state);
}
BENCHMARK(BM_Floor_FastOnlyPut);

// faultin_pfn (merged, map_writable) write fault on a present writable page (row 5), released
// unused: the same host calls as the floor, plus the resolver.
void BM_FaultinFast_ReleaseUnused(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    bool writable = false;
    Page page;
    Pfn pfn = faultin_pfn(r.host, &r.slot, r.gfn, kFollWrite, &writable, &page);
    benchmark::DoNotOptimize(pfn);
    release_faultin_page(page, /*unused=*/true, writable);
  }
  r.finish(state);
}
BENCHMARK(BM_FaultinFast_ReleaseUnused);

// The same, released as an installed fault would be (dirty + accessed + put, spec 6).
void BM_FaultinFast_ReleaseDirty(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    bool writable = false;
    Page page;
    Pfn pfn = faultin_pfn(r.host, &r.slot, r.gfn, kFollWrite, &writable, &page);
    benchmark::DoNotOptimize(pfn);
    release_faultin_page(page, /*unused=*/false, writable);
  }
  r.finish(state);
}
BENCHMARK(BM_FaultinFast_ReleaseDirty);

// [v7] follow_pfn with FOLL_GET on the same page, released with release_pfn_dirty (which finds
// the page again by the pfn heuristic).
void BM_V7FollowPfnFast_ReleasePfnDirty(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    FollowPfn foll;
    foll.slot = &r.slot;
    foll.gfn = r.gfn;
    foll.flags = kFollGet | kFollWrite;
    foll.allow_write_mapping = true;
    Pfn pfn = follow_pfn(r.host, foll);
    benchmark::DoNotOptimize(pfn);
    release_pfn_dirty(r.host, pfn, foll.hva);
  }
  r.finish(state);
}
BENCHMARK(BM_V7FollowPfnFast_ReleasePfnDirty);

// ------------------------------------------------------------------------ slow path

// Floor: one GUP of a present page and the put.
void BM_Floor_GupPut(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    Page page;
    if (r.host.get_user_pages_unlocked(r.hva, kFollHwpoison | kFollHonorNumaFault, &page) != 1) {
      state.SkipWithError("GUP failed");
      break;
    }
    r.host.put_page(page);
  }
  r.finish(state);
}
BENCHMARK(BM_Floor_GupPut);

// kvm_follow_pfn read without map_writable (row 6: fast path skipped, one GUP), released
// unused: the same host calls as BM_Floor_GupPut.
void BM_FollowSlowRead_ReleaseUnused(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, true, false)) return;
  for (auto _ : state) {
    Page page;
    KvmFollowPfn kfp;
    kfp.slot = &r.slot;
    kfp.gfn = r.gfn;
    kfp.refcounted_page = &page;
    Pfn pfn = kvm_follow_pfn(r.host, kfp);
    benchmark::DoNotOptimize(pfn);
    release_page_unused(page);
  }
  r.finish(state);
}
BENCHMARK(BM_FollowSlowRead_ReleaseUnused);

// faultin_pfn read of a page mapped to the zero page (row 9): fast miss, GUP, a failed upgrade
// lookup; released clean (the zero page is reserved: not marked).
void BM_FaultinSlowZeroPage_ReleaseClean(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kAnonPrivate, false, true)) return;
  for (auto _ : state) {
    bool writable = false;
    Page page;
    Pfn pfn = faultin_pfn(r.host, &r.slot, r.gfn, 0, &writable, &page);
    benchmark::DoNotOptimize(pfn);
    release_faultin_page(page, /*unused=*/false, writable);
  }
  r.finish(state);
}
BENCHMARK(BM_FaultinSlowZeroPage_ReleaseClean);

// ------------------------------------------------------------------------ remapped path

// faultin_pfn write on a present VM_PFNMAP PTE (row 21): fast miss, failing GUP, VMA lookup,
// follow_pfnmap; nothing to release.
void BM_FaultinRemapped(benchmark::State& state) {
  Rig r;
  if (!r.init(state, VmaKind::kPfnmap, false, false)) return;
  for (auto _ : state) {
    bool writable = false;
    Page page;
    Pfn pfn = faultin_pfn(r.host, &r.slot, r.gfn, kFollWrite, &writable, &page);
    benchmark::DoNotOptimize(pfn);
    if (page) {
      state.SkipWithError("a remapped pfn was refcounted");
      break;
    }
  }
  r.finish(state);
}
BENCHMARK(BM_FaultinRemapped);

}  // namespace

int main(int argc, char** argv) { return gfnmap::bench::run_benchmarks(argc, argv); }
