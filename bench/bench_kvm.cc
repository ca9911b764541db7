// gfnmap benchmark: a real KVM guest against gfnmap's MMU in the same run. (a) First touch and
// re-touch of 1 GiB (4K anonymous, writes); (b) demand paging of a real guest from a snapshot
// through gfnmap's page server against a minimal one-UFFDIO_COPY-per-fault handler. The first
// touch also has its floor, which needs no /dev/kvm: one MADV_POPULATE_WRITE per page plus the
// page's write (the host work of a fault that populates one page and the access itself).
//
//   build/release/bench/bench_kvm --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
// GFNMAP_BENCH_KVM_MIB (default 1024): memory of (a); GFNMAP_BENCH_KVM_LAZY_MIB (default 256):
// memory of (b). The ratios of the medians are printed after the table.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <utility>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "gfnmap/kvm.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/uffd.h"
#include "host_facts_banner.h"
#include "minimal_uffd_handler.h"
#include "same_run.h"

namespace gfnmap {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGuestBase = uint64_t{1} << 32;  // the same layout as `gfnmap run`

// One vCPU running the built-in guest over `bytes` of `mem`, one slot at gpa kGuestBase.
kvm::RunConfig one_slot_guest(void* mem, uint64_t bytes, uint32_t passes,
                              uint32_t write_percent) {
  kvm::RunConfig c;
  c.slots.push_back(kvm::RunSlot{0, Gpa(kGuestBase), bytes, mem, 0});
  c.vcpus = 1;
  c.bytes_per_vcpu = bytes;
  c.slice_gpa = Gpa(kGuestBase);
  c.passes = passes;
  c.write_percent = write_percent;
  return c;
}

uint64_t env_mib(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  return v && std::atoi(v) > 0 ? static_cast<uint64_t>(std::atoi(v)) : def;
}
// Real memslots stay at or below 1 GiB (docs/kvm.md).
uint64_t touch_bytes() { return std::min<uint64_t>(env_mib("GFNMAP_BENCH_KVM_MIB", 1024), 1024) * kMiB; }
uint64_t lazy_bytes() { return std::min<uint64_t>(env_mib("GFNMAP_BENCH_KVM_LAZY_MIB", 256), 1024) * kMiB; }

// Every repetition's value per metric, for the same-run ratios printed at the end.
using bench::median;
using bench::samples;

bool need_kvm(benchmark::State& state) {
  std::string why;
  if (kvm::kvm_available(&why)) return true;
  state.SkipWithError(("no /dev/kvm: " + why).c_str());
  return false;
}

// ---------------------------------------------------------------------------------------------
// (a) First touch of the memory by writes, then one re-touch pass.

// The real guest: one vCPU, one 4K anonymous slot (MADV_NOHUGEPAGE), 2 passes.
void BM_FirstTouch_KvmGuest(benchmark::State& state) {
  if (!need_kvm(state)) return;
  const uint64_t bytes = touch_bytes();
  const double pages = static_cast<double>(bytes / kPageSize);
  for (auto _ : state) {
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      state.SkipWithError("mmap");
      return;
    }
    madvise(mem, bytes, MADV_NOHUGEPAGE);
    auto st = kvm::run_guest_workload(one_slot_guest(mem, bytes, /*passes=*/2, 100));
    munmap(mem, bytes);
    if (!st) {
      state.SkipWithError(error_to_string(st.error()).c_str());
      return;
    }
    state.SetIterationTime(st->first_touch_seconds);
    samples()["kvm_first_ns"].push_back(st->first_touch_seconds * 1e9 / pages);
    samples()["kvm_retouch_ns"].push_back(st->after_seconds * 1e9 / pages);
    state.counters["ns_per_page"] = st->first_touch_seconds * 1e9 / pages;
    state.counters["retouch_ns_per_page"] = st->after_seconds * 1e9 / pages;
  }
}

// The floor of both first touches, without /dev/kvm: over the same 4K anonymous memory
// (MADV_NOHUGEPAGE), one MADV_POPULATE_WRITE per page, then (Arg 1) the page's write, as the
// guest's or the Vcpu's first write does after its fault. Arg 0 (populate only) is no floor for
// a first touch on a host where the first user touch of a populated page is itself costly (a
// shadow-page fill by an outer hypervisor); it is kept, labelled, beside the real one.
void BM_FirstTouch_Floor_PopulatePerPage(benchmark::State& state) {
  const bool touch = state.range(0) != 0;
  const uint64_t bytes = touch_bytes();
  const double pages = static_cast<double>(bytes / kPageSize);
  for (auto _ : state) {
    auto* mem = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (mem == MAP_FAILED) {
      state.SkipWithError("mmap");
      return;
    }
    madvise(mem, bytes, MADV_NOHUGEPAGE);
    auto t0 = std::chrono::steady_clock::now();
    for (uint64_t off = 0; off < bytes; off += kPageSize) {
      madvise(mem + off, kPageSize, MADV_POPULATE_WRITE);
      if (touch) {
        *reinterpret_cast<volatile uint64_t*>(mem + off) =
            kvm::guest_write_value(Gpa(kGuestBase + off), 0);
      }
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    munmap(mem, bytes);
    state.SetIterationTime(secs);
    samples()[touch ? "floor_populate_touch_ns" : "floor_populate_only_ns"].push_back(
        secs * 1e9 / pages);
    state.counters["ns_per_page"] = secs * 1e9 / pages;
  }
}

// gfnmap's MMU: one Vcpu writing word 0 of every page (the guest's value) over LinuxHost 4K
// anonymous memory, then a second pass that hits the second-level table. Fault-around off: one
// populate per fault, the host work KVM's GUP does for the real guest (LinuxHost's default
// would populate ahead of this sequential pass; bench_mmu measures that).
void BM_FirstTouch_GfnmapMmu(benchmark::State& state) {
  const uint64_t bytes = touch_bytes();
  const double pages = static_cast<double>(bytes / kPageSize);
  for (auto _ : state) {
    LinuxHost::Options lo;
    lo.pfn_source = PfnSource::kVirtual;
    lo.fault_around = FaultAround::kOff;
    auto host = LinuxHost::create(lo);
    if (!host) {
      state.SkipWithError("LinuxHost unavailable");
      return;
    }
    RegionSpec spec;
    spec.kind = RegionKind::kAnonymous;
    spec.size = bytes;
    auto region = (*host)->create_region(spec);
    if (!region) {
      state.SkipWithError(error_to_string(region.error()).c_str());
      return;
    }
    Memslots slots;
    MmuOptions mo;
    auto mmu = std::make_unique<Mmu>(slots, **host, mo);
    UserspaceMemoryRegion r;
    r.slot = 0;
    r.guest_phys_addr = kGuestBase;
    r.memory_size = bytes;
    r.userspace_addr = region->start.value;
    if (!slots.set_memory_region(r)) {
      state.SkipWithError("set_memory_region");
      return;
    }
    auto vcpu = std::make_unique<Vcpu>(*mmu, 0);
    double secs[2] = {0, 0};
    for (uint32_t pass = 0; pass < 2; ++pass) {
      auto t0 = std::chrono::steady_clock::now();
      for (uint64_t off = 0; off < bytes; off += kPageSize) {
        const Gpa gpa(kGuestBase + off);
        const uint64_t v = kvm::guest_write_value(gpa, pass);
        if (!vcpu->try_write_u64(gpa, v)) (void)vcpu->write_u64(gpa, v);
      }
      secs[pass] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    vcpu.reset();
    mmu.reset();
    state.SetIterationTime(secs[0]);
    samples()["mmu_first_ns"].push_back(secs[0] * 1e9 / pages);
    samples()["mmu_retouch_ns"].push_back(secs[1] * 1e9 / pages);
    state.counters["ns_per_page"] = secs[0] * 1e9 / pages;
    state.counters["retouch_ns_per_page"] = secs[1] * 1e9 / pages;
  }
}

// ---------------------------------------------------------------------------------------------
// (b) Demand paging of a real guest: one vCPU reads every page of a slot that starts empty and
// is filled from a snapshot file (in the page cache) on each fault KVM's GUP raises.

// A snapshot file with no zero page, created once and kept across repetitions.
int snapshot_fd(uint64_t size) {
  static int fd = -1;
  if (fd >= 0) return fd;
  char path[] = "/var/tmp/gfnmap-bench-kvm-snapshot-XXXXXX";
  fd = mkstemp(path);
  if (fd < 0) return -1;
  unlink(path);
  std::vector<uint64_t> buf(kMiB / 8);
  for (uint64_t off = 0; off < size; off += kMiB) {
    for (uint64_t i = 0; i < buf.size(); i += 8) buf[i] = (off / 8 + i) | 1;
    if (pwrite(fd, buf.data(), kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB)) {
      return -1;
    }
  }
  return fd;
}

// Runs the read-only guest over `mem` (size bytes at gpa 4 GiB); pages per second of the pass.
Result<double> guest_reads(void* mem, uint64_t size) {
  auto st = kvm::run_guest_workload(one_slot_guest(mem, size, /*passes=*/1, 0));
  if (!st) return st.error();
  return static_cast<double>(size / kPageSize) / st->first_touch_seconds;
}

// The peer: one thread, one message per read, one pread + one UFFDIO_COPY per fault.
void BM_LazyRestore_KvmGuest_MinimalHandler(benchmark::State& state) {
  if (!need_kvm(state)) return;
  const uint64_t size = lazy_bytes();
  const int snap = snapshot_fd(size);
  if (snap < 0) {
    state.SkipWithError("snapshot file");
    return;
  }
  for (auto _ : state) {
    int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    uffdio_api api{UFFD_API, 0, 0};
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0) {
      state.SkipWithError("userfaultfd");
      return;
    }
    char* p = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    madvise(p, size, MADV_NOHUGEPAGE);
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(p), size};
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
      state.SkipWithError("UFFDIO_REGISTER");
      return;
    }
    bench::MinimalUffdHandler handler(uffd, p, snap);
    auto pps = guest_reads(p, size);
    handler.stop();
    const uint64_t served = handler.served();
    close(uffd);
    munmap(p, size);
    if (!pps) {
      state.SkipWithError(error_to_string(pps.error()).c_str());
      return;
    }
    state.SetIterationTime(static_cast<double>(size / kPageSize) / *pps);
    samples()["minimal_pages_per_s"].push_back(*pps);
    state.counters["pages_per_s"] = *pps;
    state.counters["faults"] = static_cast<double>(served);
  }
}

// gfnmap's page server (FileSource, 1 handler thread, no prefetch) serving the guest's faults.
void BM_LazyRestore_KvmGuest_PageServer(benchmark::State& state) {
  if (!need_kvm(state)) return;
  const uint64_t size = lazy_bytes();
  const int snap = snapshot_fd(size);
  auto source = uffd::FileSource::from_fd(snap);
  if (snap < 0 || !source) {
    state.SkipWithError("snapshot file");
    return;
  }
  for (auto _ : state) {
    uffd::PageServerOptions o;
    o.handler_threads = 1;
    auto server = uffd::PageServer::create(**source, o);
    if (!server) {
      state.SkipWithError(error_to_string(server.error()).c_str());
      return;
    }
    auto base = (*server)->map_lazy(nullptr, size);
    if (!base || !(*server)->start()) {
      state.SkipWithError("map_lazy/start");
      return;
    }
    auto pps = guest_reads(reinterpret_cast<void*>(base->value), size);
    uffd::PageServerStats s = (*server)->stats();
    server->reset();
    if (!pps) {
      state.SkipWithError(error_to_string(pps.error()).c_str());
      return;
    }
    state.SetIterationTime(static_cast<double>(size / kPageSize) / *pps);
    samples()["server_pages_per_s"].push_back(*pps);
    state.counters["pages_per_s"] = *pps;
    state.counters["faults"] = static_cast<double>(s.faults);
    state.counters["p50_fault_ns"] = static_cast<double>(s.latency_p50_ns());
  }
}

BENCHMARK(BM_FirstTouch_Floor_PopulatePerPage)->ArgName("touch")->Arg(1)->Arg(0)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FirstTouch_GfnmapMmu)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FirstTouch_KvmGuest)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LazyRestore_KvmGuest_MinimalHandler)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LazyRestore_KvmGuest_PageServer)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

// Medians of every repetition and their ratios, measured in this run.
void print_ratios() {
  auto& s = samples();
  auto m = [&](const char* k) { return median(s[k]); };
  std::printf("\nEvery repetition:\n");
  for (const auto& [name, values] : s) {
    std::printf("  %-20s", name.c_str());
    for (double v : values) std::printf(" %.1f", v);
    std::printf("\n");
  }
  std::printf("Medians over repetitions (this run):\n");
  if (!s["kvm_first_ns"].empty() && !s["mmu_first_ns"].empty()) {
    std::printf("  first touch  %.0f MiB: kvm guest %.0f ns/page, gfnmap MMU %.0f ns/page, "
                "kvm/gfnmap %.2fx\n",
                static_cast<double>(touch_bytes() / kMiB), m("kvm_first_ns"), m("mmu_first_ns"),
                m("kvm_first_ns") / m("mmu_first_ns"));
    std::printf("  re-touch     kvm guest %.1f ns/page, gfnmap MMU %.1f ns/page, kvm/gfnmap %.2fx\n",
                m("kvm_retouch_ns"), m("mmu_retouch_ns"), m("kvm_retouch_ns") / m("mmu_retouch_ns"));
  }
  if (!s["floor_populate_touch_ns"].empty()) {
    std::printf("  first-touch floor %.0f MiB: per-page populate + touch %.0f ns/page",
                static_cast<double>(touch_bytes() / kMiB), m("floor_populate_touch_ns"));
    if (!s["floor_populate_only_ns"].empty()) {
      std::printf(" (populate only %.0f, not a floor for a touch)", m("floor_populate_only_ns"));
    }
    std::printf("\n");
    const std::pair<const char*, const char*> sides[] = {{"gfnmap MMU", "mmu_first_ns"},
                                                         {"kvm guest", "kvm_first_ns"}};
    for (const auto& [who, key] : sides) {
      if (s[key].empty()) continue;
      std::printf("    %-10s first touch %.2fx populate + touch", who,
                  m(key) / m("floor_populate_touch_ns"));
      if (!s["floor_populate_only_ns"].empty()) {
        std::printf(", %.2fx populate only", m(key) / m("floor_populate_only_ns"));
      }
      std::printf("\n");
    }
  }
  if (!s["server_pages_per_s"].empty() && !s["minimal_pages_per_s"].empty()) {
    std::printf("  lazy restore %.0f MiB: page server %.0f pages/s, minimal handler %.0f pages/s, "
                "server/minimal %.2fx\n",
                static_cast<double>(lazy_bytes() / kMiB), m("server_pages_per_s"),
                m("minimal_pages_per_s"), m("server_pages_per_s") / m("minimal_pages_per_s"));
  }
}

}  // namespace
}  // namespace gfnmap

int main(int argc, char** argv) {
  return gfnmap::bench::run_benchmarks(argc, argv, gfnmap::print_ratios);
}
