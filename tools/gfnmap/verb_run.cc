// gfnmap CLI verb `run`: the main job. Software vCPU threads run a memstress-like workload
// through the MMU over the host model or real memory and report the fault-in path's numbers.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cli_input.h"
#include "gfnmap/async_pf.h"
#include "gfnmap/dirty.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"
#include "verb.h"

namespace gfnmap::cli {
namespace {

// Version of the --json document (docs/run.md). Bump on any incompatible change.
constexpr int kRunSchemaVersion = 1;
constexpr uint64_t kGuestBase = uint64_t{1} << 32;  // gpa of slot 0: 1G aligned

constexpr const char* kRunFooter = R"(The workload (memstress-like): guest memory is split into --slots memslots; each vCPU
thread owns memory/vcpus of it (or, with --overlap, all of it). Every pass touches every
page of that range once, in order or in a random permutation (--pattern), with one 8-byte
access per page that is a write with probability --write-percent. Pass 1 is the first touch
(every access faults in through the MMU); later passes hit the second-level table.
With --dirty-log, logging is turned on after pass 1 and the dirty bitmaps are harvested
(KVM_GET_DIRTY_LOG) after every later pass.
Backings: anon, memfd, file, thp use real memory (LinuxHost); model and model-file use the
deterministic host model (SimHost; model-file pages need "I/O", so faults go slow or async).
Output: text, or --json (schema in docs/run.md, field schema_version). Exit status: 0 ok,
1 the run failed (unexpected exits or outstanding page references), 2 bad usage or input.
Example: gfnmap run --vcpus 2 --memory 1G --write-percent 50 --pattern random --passes 3)";

struct RunOptions {
  unsigned vcpus = 2;
  std::string memory = "1G";
  unsigned slots = 1;
  std::string backing = "anon";
  std::string file;
  unsigned write_percent = 100;
  std::string pattern = "sequential";
  unsigned passes = 2;
  bool overlap = false;
  bool dirty_log = false;
  bool async_pf = false;
  std::string max_level = "1g";
  uint64_t seed = 1;
  bool json = false;
  bool progress = false;
  bool no_progress = false;
  bool pagemap = false;
  uint32_t fault_around = 0;
};

struct HostSetup {
  std::unique_ptr<SimHost> sim;
  std::unique_ptr<LinuxHost> linux_host;
  HostMm* mm = nullptr;
  Hva base;
  int fd = -1;
  ~HostSetup() {
    if (fd >= 0) close(fd);
  }
};

[[noreturn]] void bad(const std::string& msg) { throw BadInput(msg); }

void setup_host(const RunOptions& o, uint64_t bytes, HostSetup* h) {
  const std::string& b = o.backing;
  if (b == "model" || b == "model-file") {
    h->sim = std::make_unique<SimHost>();
    MmapOptions mo;
    VmaKind kind = VmaKind::kAnonPrivate;
    if (b == "model-file") {
      auto f = h->sim->create_file(bytes, false);
      if (!f) bad("model file: " + error_to_string(f.error()));
      mo.file = *f;
      kind = VmaKind::kFileShared;
      mo.writenotify = false;
    }
    auto r = h->sim->mmap(bytes, kProtRW, kind, mo);
    if (!r) bad("model mmap: " + error_to_string(r.error()));
    h->base = *r;
    h->mm = h->sim.get();
    return;
  }
  RegionSpec spec;
  spec.size = bytes;
  if (b == "anon") {
    spec.kind = RegionKind::kAnonymous;
  } else if (b == "thp") {
    spec.kind = RegionKind::kThp;
  } else if (b == "memfd") {
    spec.kind = RegionKind::kMemfdShared;
  } else if (b == "file") {
    spec.kind = RegionKind::kFileShared;
    std::string path = o.file.empty() ? "/tmp/gfnmap-run-XXXXXX" : o.file;
    if (o.file.empty()) {
      h->fd = mkstemp(path.data());
      if (h->fd >= 0) unlink(path.c_str());
    } else {
      h->fd = open(path.c_str(), O_RDWR | O_CREAT, 0600);
    }
    if (h->fd < 0) bad(fmt::format("--file {}: cannot open", path));
    if (ftruncate(h->fd, static_cast<off_t>(bytes)) != 0) {
      bad(fmt::format("--file {}: cannot size it to {} bytes", path, bytes));
    }
    spec.fd = h->fd;
  } else {
    bad("--backing " + b + ": expected anon, memfd, file, thp, model or model-file");
  }
  LinuxHost::Options lo;
  lo.pfn_source = o.pagemap ? PfnSource::kAuto : PfnSource::kVirtual;
  lo.fault_around_pages = o.fault_around;
  auto host = LinuxHost::create(lo);
  if (!host) bad("real memory unavailable: " + error_to_string(host.error()));
  h->linux_host = std::move(*host);
  auto region = h->linux_host->create_region(spec);
  if (!region) bad("--backing " + b + ": " + error_to_string(region.error()));
  h->base = region->start;
  h->mm = h->linux_host.get();
}

// A progress bar on stderr: [#####.....] 45% pass 2/3.
void draw_progress(uint64_t done, uint64_t total, unsigned pass, unsigned passes) {
  constexpr int kWidth = 40;
  double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
  int fill = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(fill), '#');
  bar.append(static_cast<size_t>(kWidth - fill), '.');
  std::fprintf(stderr, "\r[%s] %3d%% pass %u/%u", bar.c_str(), static_cast<int>(frac * 100),
               pass, passes);
  std::fflush(stderr);
}

int run_workload(const RunOptions& o) {
  // ---- Validate.
  if (o.vcpus < 1 || o.vcpus > 256) bad(fmt::format("--vcpus {}: expected 1..256", o.vcpus));
  uint64_t bytes = parse_u64(o.memory, "--memory");
  if (bytes == 0 || bytes % kPageSize) bad("--memory " + o.memory + ": must be a non-zero multiple of 4K");
  if (bytes > (uint64_t{64} << 30)) bad("--memory " + o.memory + ": at most 64G");
  if (o.slots < 1 || o.slots > 512) bad(fmt::format("--slots {}: expected 1..512", o.slots));
  if (bytes % (uint64_t{o.slots} * kPageSize)) bad("--memory must divide into --slots whole pages");
  const uint64_t pages = bytes / kPageSize;
  if (!o.overlap && pages < o.vcpus) bad("--memory too small: fewer pages than vCPUs");
  if (o.write_percent > 100) bad(fmt::format("--write-percent {}: expected 0..100", o.write_percent));
  if (o.pattern != "sequential" && o.pattern != "random") {
    bad("--pattern " + o.pattern + ": expected sequential or random");
  }
  if (o.passes < 1 || o.passes > 1000) bad(fmt::format("--passes {}: expected 1..1000", o.passes));
  PgLevel max_level;
  if (o.max_level == "4k") max_level = PgLevel::k4K;
  else if (o.max_level == "2m") max_level = PgLevel::k2M;
  else if (o.max_level == "1g") max_level = PgLevel::k1G;
  else bad("--max-level " + o.max_level + ": expected 4k, 2m or 1g");
  if (!o.file.empty() && o.backing != "file") bad("--file needs --backing file");
  if (o.fault_around > 512 || (o.fault_around & (o.fault_around - 1)) != 0) {
    bad(fmt::format("--fault-around {}: expected 0 or a power of two up to 512", o.fault_around));
  }

  // ---- Host, memslots, MMU.
  HostSetup host;
  setup_host(o, bytes, &host);
  Memslots slots;
  DirtyLog dirty(slots);
  std::unique_ptr<AsyncPfWorkerPool> pool;
  if (o.async_pf) pool = std::make_unique<AsyncPfWorkerPool>(*host.mm, 2);
  MmuOptions mo;
  mo.max_level = max_level;
  mo.dirty = &dirty;
  mo.async_pf_pool = pool.get();
  auto mmu = std::make_unique<Mmu>(slots, *host.mm, mo);
  const uint64_t slot_bytes = bytes / o.slots;
  auto set_slots = [&](uint32_t flags) -> std::string {
    for (unsigned s = 0; s < o.slots; ++s) {
      UserspaceMemoryRegion r;
      r.slot = s;
      r.flags = flags;
      r.guest_phys_addr = kGuestBase + s * slot_bytes;
      r.memory_size = slot_bytes;
      r.userspace_addr = host.base.value + s * slot_bytes;
      auto res = slots.set_memory_region(r);
      if (!res) return "memslot: " + error_to_string(res.error());
    }
    return {};
  };
  if (std::string err = set_slots(0); !err.empty()) bad(err);

  // ---- vCPU threads, in lock step per pass.
  const bool show_progress = !o.json && !o.no_progress && (o.progress || isatty(STDERR_FILENO));
  const uint64_t per_vcpu = o.overlap ? pages : pages / o.vcpus;
  std::vector<std::atomic<uint64_t>> done(o.vcpus);
  std::atomic<uint64_t> unexpected_exits{0};
  std::atomic<uint64_t> async_exits{0};
  std::vector<Vcpu::Stats> vstats(o.vcpus);
  std::barrier sync(static_cast<std::ptrdiff_t>(o.vcpus) + 1);
  std::vector<std::thread> threads;
  for (unsigned v = 0; v < o.vcpus; ++v) {
    threads.emplace_back([&, v] {
      VcpuOptions vo;
      vo.async_pf = o.async_pf;
      Vcpu vcpu(*mmu, v, vo);
      const uint64_t first = o.overlap ? 0 : v * per_vcpu;
      std::mt19937_64 rng(o.seed * 1000003 + v);
      std::vector<uint32_t> order;
      if (o.pattern == "random") {
        order.resize(per_vcpu);
        std::iota(order.begin(), order.end(), 0u);
      }
      uint64_t value = 0;
      for (unsigned pass = 0; pass < o.passes; ++pass) {
        if (!order.empty()) std::shuffle(order.begin(), order.end(), rng);
        sync.arrive_and_wait();
        for (uint64_t k = 0; k < per_vcpu; ++k) {
          uint64_t page = first + (order.empty() ? k : order[k]);
          Gpa gpa(kGuestBase + page * kPageSize + (v % 512) * 8);
          bool write = o.write_percent == 100 ||
                       (o.write_percent > 0 && rng() % 100 < o.write_percent);
          if (write ? vcpu.try_write_u64(gpa, ++value) : vcpu.try_read_u64(gpa, &value)) {
            if ((k & 1023) == 1023) done[v].store(k + 1, std::memory_order_relaxed);
            continue;  // table hit
          }
          for (;;) {
            VcpuExit ex = write ? vcpu.write_u64(gpa, value) : vcpu.read_u64(gpa, &value);
            if (ex.ok()) break;
            if (ex.reason == ExitReason::kAsyncPfNotPresent ||
                ex.reason == ExitReason::kAsyncPfHalt) {
              async_exits.fetch_add(1, std::memory_order_relaxed);
              vcpu.wait_async_pf(100);
              vcpu.check_async_pf_completion();
              continue;
            }
            unexpected_exits.fetch_add(1, std::memory_order_relaxed);
            break;
          }
          if ((k & 1023) == 1023) done[v].store(k + 1, std::memory_order_relaxed);
        }
        done[v].store(per_vcpu, std::memory_order_relaxed);
        sync.arrive_and_wait();
      }
      while (vcpu.async_pf_queue() && vcpu.async_pf_queue()->queued() > 0) {
        vcpu.wait_async_pf(100);
        vcpu.check_async_pf_completion();
      }
      vstats[v] = vcpu.stats();
    });
  }

  using Clock = std::chrono::steady_clock;
  double first_touch_s = 0;
  double after_s = 0;
  uint64_t dirty_pages = 0;
  uint64_t harvests = 0;
  std::vector<uint64_t> bitmap(dirty_bitmap_words(slot_bytes / kPageSize));
  for (unsigned pass = 0; pass < o.passes; ++pass) {
    for (auto& d : done) d.store(0, std::memory_order_relaxed);
    auto t0 = Clock::now();
    sync.arrive_and_wait();  // start
    if (show_progress) {
      // Poll until every vCPU finished this pass.
      for (;;) {
        uint64_t sum = 0;
        for (auto& d : done) sum += d.load(std::memory_order_relaxed);
        draw_progress(sum, per_vcpu * o.vcpus, pass + 1, o.passes);
        if (sum >= per_vcpu * o.vcpus) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    sync.arrive_and_wait();  // end
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (pass == 0) {
      first_touch_s = s;
      if (o.dirty_log) {
        if (std::string err = set_slots(kMemLogDirtyPages); !err.empty()) {
          std::fprintf(stderr, "gfnmap run: enabling dirty logging: %s\n", err.c_str());
          unexpected_exits.fetch_add(1);
        }
      }
    } else {
      after_s += s;
      if (o.dirty_log) {
        for (unsigned sl = 0; sl < o.slots; ++sl) {
          auto r = dirty.get_dirty_log(sl, bitmap);
          if (r) dirty_pages += *r;
          ++harvests;
        }
      }
    }
  }
  for (auto& t : threads) t.join();
  if (show_progress) std::fprintf(stderr, "\r%*s\r", 60, "");

  // ---- Report.
  MmuStats st = mmu->stats();
  const uint64_t refs = host.mm->outstanding_refs();
  const uint64_t touched = per_vcpu * o.vcpus;
  const uint64_t after_accesses = touched * (o.passes - 1);
  const double ns_per_page = first_touch_s * 1e9 / static_cast<double>(touched);
  const double aps = after_s > 0 ? static_cast<double>(after_accesses) / after_s : 0;
  const uint64_t metadata = mmu->metadata_bytes();
  const bool ok = refs == 0 && unexpected_exits.load() == 0;

  if (o.json) {
    nlohmann::json j;
    j["schema_version"] = kRunSchemaVersion;
    j["config"] = {{"vcpus", o.vcpus},
                   {"memory_bytes", bytes},
                   {"slots", o.slots},
                   {"backing", o.backing},
                   {"write_percent", o.write_percent},
                   {"pattern", o.pattern},
                   {"passes", o.passes},
                   {"overlap", o.overlap},
                   {"dirty_log", o.dirty_log},
                   {"async_pf", o.async_pf},
                   {"max_level", o.max_level},
                   {"pagemap", o.pagemap},
                   {"fault_around", o.fault_around},
                   {"seed", o.seed}};
    j["pages"] = pages;
    j["pages_per_vcpu"] = per_vcpu;
    j["faults"] = {{"total", st.faults},       {"fast", st.fast_faults},
                   {"nowait", st.nowait_hits}, {"slow", st.slow_faults},
                   {"async", st.async_queued}, {"async_halts", st.async_halts},
                   {"retried", st.retries},    {"exits", st.exits},
                   {"prefetch", st.prefetches}};
    j["installs"] = {{"total", st.installs},
                     {"2m", st.installs_2m},
                     {"1g", st.installs_1g},
                     {"4k", st.installs - st.installs_2m - st.installs_1g}};
    j["first_touch"] = {{"seconds", first_touch_s}, {"ns_per_page", ns_per_page}};
    j["after"] = {{"seconds", after_s},
                  {"accesses", after_accesses},
                  {"accesses_per_second", aps}};
    j["dirty"] = {{"harvests", harvests}, {"pages", dirty_pages}};
    j["tlb_flushes"] = st.tlb_flushes;
    j["zapped"] = st.zapped;
    j["splits"] = st.splits;
    j["metadata_bytes"] = metadata;
    j["unexpected_exits"] = unexpected_exits.load();
    j["outstanding_refs"] = refs;
    j["ok"] = ok;
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("gfnmap run: %u vCPUs, %s over %u slot(s), backing %s, %u%% writes, %s, %u passes%s%s\n",
                o.vcpus, o.memory.c_str(), o.slots, o.backing.c_str(), o.write_percent,
                o.pattern.c_str(), o.passes, o.dirty_log ? ", dirty logging" : "",
                o.async_pf ? ", async PF" : "");
    std::printf("  pages faulted          %llu (installs: %llu 4K, %llu 2M, %llu 1G)\n",
                static_cast<unsigned long long>(st.faults),
                static_cast<unsigned long long>(st.installs - st.installs_2m - st.installs_1g),
                static_cast<unsigned long long>(st.installs_2m),
                static_cast<unsigned long long>(st.installs_1g));
    std::printf("  faults                 fast %llu, nowait %llu, slow %llu, async %llu, retried %llu, exits %llu\n",
                static_cast<unsigned long long>(st.fast_faults),
                static_cast<unsigned long long>(st.nowait_hits),
                static_cast<unsigned long long>(st.slow_faults),
                static_cast<unsigned long long>(st.async_queued),
                static_cast<unsigned long long>(st.retries),
                static_cast<unsigned long long>(st.exits));
    std::printf("  first touch            %.3f s, %.0f ns per page\n", first_touch_s, ns_per_page);
    if (o.passes > 1) {
      std::printf("  after                  %.3f s, %.3g accesses per second\n", after_s, aps);
    }
    if (o.dirty_log) {
      std::printf("  dirty pages harvested  %llu in %llu harvests\n",
                  static_cast<unsigned long long>(dirty_pages),
                  static_cast<unsigned long long>(harvests));
    }
    std::printf("  tlb flushes            %llu, table metadata %llu bytes (%.3f%% of guest memory)\n",
                static_cast<unsigned long long>(st.tlb_flushes),
                static_cast<unsigned long long>(metadata),
                100.0 * static_cast<double>(metadata) / static_cast<double>(bytes));
    std::printf("  outstanding references %llu%s\n", static_cast<unsigned long long>(refs),
                refs ? "  (LEAK)" : "");
    if (unexpected_exits.load()) {
      std::printf("  unexpected exits       %llu\n",
                  static_cast<unsigned long long>(unexpected_exits.load()));
    }
  }
  mmu.reset();
  return ok ? 0 : 1;
}

GFNMAP_VERB("run", "run a memstress-like workload of software vCPUs through the MMU",
            [](CLI::App& cmd) -> std::function<int()> {
              auto o = std::make_shared<RunOptions>();
              cmd.footer(kRunFooter);
              cmd.add_option("--vcpus", o->vcpus, "vCPU threads (1..256)")
                  ->capture_default_str();
              cmd.add_option("--memory", o->memory,
                             "guest memory in bytes, K/M/G suffixes (multiple of 4K, <= 64G)")
                  ->capture_default_str();
              cmd.add_option("--slots", o->slots, "memslots the memory is split into (1..512)")
                  ->capture_default_str();
              cmd.add_option("--backing", o->backing,
                             "anon | memfd | file | thp (real memory) | model | model-file "
                             "(host model)")
                  ->capture_default_str();
              cmd.add_option("--file", o->file,
                             "file for --backing file (default: an unlinked temp file)");
              cmd.add_option("--write-percent", o->write_percent,
                             "share of accesses that write (0..100)")
                  ->capture_default_str();
              cmd.add_option("--pattern", o->pattern,
                             "sequential | random (a random permutation per pass)")
                  ->capture_default_str();
              cmd.add_option("--passes", o->passes,
                             "passes over the memory; pass 1 is the first touch (1..1000)")
                  ->capture_default_str();
              cmd.add_flag("--overlap", o->overlap,
                           "every vCPU touches all memory instead of its own slice");
              cmd.add_flag("--dirty-log", o->dirty_log,
                           "log dirty pages after pass 1 and harvest after each later pass");
              cmd.add_flag("--async-pf", o->async_pf,
                           "let faults that need I/O go async (useful with model-file)");
              cmd.add_option("--max-level", o->max_level,
                             "largest second-level leaf: 4k | 2m | 1g")
                  ->capture_default_str();
              cmd.add_option("--seed", o->seed, "random seed for --pattern random and writes")
                  ->capture_default_str();
              cmd.add_flag("--pagemap", o->pagemap,
                           "real memory: report physical pfns from /proc/self/pagemap (one "
                           "pread per fault) instead of host virtual page numbers");
              cmd.add_option("--fault-around", o->fault_around,
                             "real anon/memfd memory: a slow-path fault populates this many "
                             "aligned pages at once (0 = off, as KVM: one page per fault)")
                  ->capture_default_str();
              cmd.add_flag("--json", o->json, "print one JSON document (docs/run.md)");
              cmd.add_flag("--progress", o->progress,
                           "progress bar on stderr even when it is not a terminal");
              cmd.add_flag("--no-progress", o->no_progress, "never draw the progress bar");
              return [o] {
                try {
                  return run_workload(*o);
                } catch (const BadInput& e) {
                  std::fprintf(stderr, "gfnmap run: %s\n", e.what());
                  return 2;
                }
              };
            });

}  // namespace
}  // namespace gfnmap::cli
