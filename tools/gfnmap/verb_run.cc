// gfnmap CLI verb `run`: the main job. The same memstress-like workload runs on gfnmap's MMU
// (software vCPU threads) and in a real KVM guest, over the same layout and backing kind.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cli_input.h"
#include "host_facts_json.h"
#include "gfnmap/async_pf.h"
#include "gfnmap/dirty.h"
#include "gfnmap/host_facts.h"
#include "gfnmap/kvm.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"
#include "gfnmap/uffd.h"
#include "verb.h"

namespace gfnmap::cli {
namespace {

// Version of the --json document (docs/run.md). Bump on any incompatible change.
constexpr int kRunSchemaVersion = 2;
constexpr uint64_t kGuestBase = uint64_t{1} << 32;  // gpa of slot 0: 1G aligned
// Largest guest memory given to a real VM: with the shadow MMU the kernel allocates per-page
// metadata for every valid slot (docs/kvm.md), and the host may be shared.
constexpr uint64_t kKvmMaxBytes = uint64_t{1} << 30;
// Word 0 of page p of a generated snapshot (every other byte of it is zero).
constexpr uint64_t snapshot_word(uint64_t page) { return 0x5eed000000000000ull | page; }

constexpr const char* kRunFooter = R"(The workload (memstress-like): guest memory at gpa 4 GiB is split into --slots memslots;
each vCPU owns memory/vcpus of it (or, with --overlap, all of it). Every pass touches every
page of that range once, in order or in a random order (--pattern), with one 8-byte access at
offset 0 of the page that is a write with probability --write-percent. The order and the
write choices are those of the built-in KVM guest (kvm::for_each_guest_access), so both
backends do exactly the same accesses. Pass 1 is the first touch; later passes hit the
second-level table (engine) or KVM's shadow page table (kvm).
--backend engine runs software vCPU threads through gfnmap's MMU; kvm runs the built-in
CPL3 guest in a real VM (/dev/kvm) on its own copy of the backing; both (the default where
/dev/kvm works, the backing is real memory and --memory <= 1G) runs engine, then kvm, and
prints them side by side.
With --dirty-log, logging is turned on after pass 1 and the dirty bitmaps are harvested
(KVM_GET_DIRTY_LOG) after every later pass.
Backings: anon, memfd, file, thp use real memory (LinuxHost); uffd is lazy restore from a
snapshot (--snapshot FILE, or a generated one) through gfnmap's userfaultfd page server;
model and model-file use the deterministic host model (engine only).
Output: text, or --json (schema in docs/run.md, field schema_version). Exit status: 0 ok,
1 the run failed (unexpected exits, outstanding page references, a failed KVM run, or a read
checksum that differs from the predicted one), 2 bad usage or input.
Example: gfnmap run --vcpus 2 --memory 1G --write-percent 50 --pattern random --passes 3)";

struct RunOptions {
  unsigned vcpus = 2;
  std::string memory = "1G";
  unsigned slots = 1;
  std::string backing = "anon";
  std::string backend;  // "" = auto
  std::string file;
  std::string snapshot;
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
  std::string fault_around = "sequential";  // sequential | off | N (a fixed window)
};

[[noreturn]] void bad(const std::string& msg) { throw BadInput(msg); }

// --fault-around as LinuxHost's policy and window (BadInput when it is neither sequential, off
// nor a power of two from 2 to 512; 0 is off).
std::pair<FaultAround, uint32_t> parse_fault_around(const RunOptions& o) {
  const LinuxHost::Options defaults;
  if (o.fault_around == "sequential") return {FaultAround::kSequential, defaults.fault_around_pages};
  if (o.fault_around == "off" || o.fault_around == "0") {
    return {FaultAround::kOff, defaults.fault_around_pages};
  }
  uint32_t n = 0;
  const char* end = o.fault_around.data() + o.fault_around.size();
  auto [p, ec] = std::from_chars(o.fault_around.data(), end, n);
  if (ec != std::errc() || p != end || n < 2 || n > 512 || (n & (n - 1)) != 0) {
    bad("--fault-around " + o.fault_around +
        ": expected sequential, off or a power of two from 2 to 512");
  }
  return {FaultAround::kFixed, n};
}

// The largest window --fault-around populates (0 when off), for the JSON config.
uint32_t fault_around_pages(const RunOptions& o) {
  auto [policy, pages] = parse_fault_around(o);
  return policy == FaultAround::kOff ? 0 : pages;
}

// The validated workload both backends run.
struct Workload {
  unsigned vcpus = 0;
  uint64_t bytes = 0;
  unsigned slots = 0;
  uint64_t slot_bytes = 0;
  uint64_t pages = 0;
  uint64_t per_vcpu = 0;  // pages each vCPU touches per pass
  uint32_t passes = 0;
  uint32_t write_percent = 0;
  bool random = false;
  bool overlap = false;
  bool dirty_log = false;
  uint64_t seed = 0;

  // vCPU v's guest program (slice, order, writes): the same for both backends.
  kvm::GuestWorkload guest(unsigned v) const {
    kvm::GuestWorkload w;
    w.slice = Gpa(kGuestBase + (overlap ? 0 : v * per_vcpu) * kPageSize);
    w.npages = per_vcpu;
    w.passes = passes;
    w.write_percent = write_percent;
    w.random = random;
    w.seed = seed + v;  // as kvm::run_guest_workload seeds vCPU v
    return w;
  }
  // Reads see a value that does not depend on how vCPUs interleave.
  bool predictable() const { return !overlap || vcpus == 1 || write_percent == 0; }
};

// ---------------------------------------------------------------------------------------------
// Backings. Each backend gets its own copy of the same kind and size.

// An unlinked temporary file in `dir`, sized to `bytes`; its fd.
int temp_file(const std::string& dir, uint64_t bytes, const std::string& what) {
  std::string path = dir + "/gfnmap-run-XXXXXX";
  int fd = mkstemp(path.data());
  if (fd < 0) bad(fmt::format("{}: cannot create a temp file in {}", what, dir));
  unlink(path.c_str());
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    bad(fmt::format("{}: cannot size a temp file to {} bytes", what, bytes));
  }
  return fd;
}

// The generated snapshot: word 0 of page p is snapshot_word(p), the rest zero.
int generate_snapshot(uint64_t bytes) {
  int fd = temp_file("/tmp", 0, "--backing uffd");
  constexpr uint64_t kChunk = 2ull << 20;
  std::vector<uint64_t> buf(kChunk / 8, 0);
  for (uint64_t off = 0; off < bytes; off += kChunk) {
    const uint64_t n = std::min(kChunk, bytes - off);
    for (uint64_t p = 0; p < n / kPageSize; ++p) {
      buf[p * (kPageSize / 8)] = snapshot_word(off / kPageSize + p);
    }
    if (pwrite(fd, buf.data(), n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) {
      close(fd);
      bad("--backing uffd: cannot write the generated snapshot");
    }
  }
  return fd;
}

// What the runs start from: the uffd snapshot, and the real guest's copy of a user's --file
// (taken before the engine runs, since the engine writes to the file).
struct Snapshot {
  int fd = -1;
  bool generated = false;
  std::string path;
  int file_copy = -1;
  ~Snapshot() {
    if (fd >= 0) close(fd);
    if (file_copy >= 0) close(file_copy);
  }
};

// A copy of the user's --file (its first `bytes`, zero beyond its end) in an unlinked temp
// file next to it.
int copy_user_file(const std::string& file, uint64_t bytes) {
  std::string dir = std::filesystem::path(file).parent_path().string();
  int fd = temp_file(dir.empty() ? "." : dir, bytes, "--file " + file);
  int in = open(file.c_str(), O_RDONLY);
  if (in < 0) {
    close(fd);
    bad(fmt::format("--file {}: cannot open", file));
  }
  loff_t off_in = 0, off_out = 0;
  while (off_in < static_cast<loff_t>(bytes)) {
    ssize_t n = copy_file_range(in, &off_in, fd, &off_out, bytes - static_cast<uint64_t>(off_in), 0);
    if (n <= 0) break;  // end of the user's file: the rest stays zero
  }
  close(in);
  return fd;
}

struct HostSetup {
  // Destroyed bottom-up: the page server before its source and the LinuxHost.
  std::unique_ptr<SimHost> sim;
  std::unique_ptr<LinuxHost> linux_host;
  std::unique_ptr<uffd::FileSource> source;
  std::unique_ptr<uffd::PageServer> server;
  HostMm* mm = nullptr;
  Hva base;
  int fd = -1;
  ~HostSetup() {
    server.reset();
    if (fd >= 0) close(fd);
  }
};

// Creates `bytes` of the backing. copy: this is the real guest's copy (a user's --file is
// copied into a temp file next to it; a model backing is refused by the caller).
void setup_host(const RunOptions& o, uint64_t bytes, const Snapshot& snap, bool copy,
                HostSetup* h) {
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
  LinuxHost::Options lo;
  lo.pfn_source = o.pagemap ? PfnSource::kAuto : PfnSource::kVirtual;
  std::tie(lo.fault_around, lo.fault_around_pages) = parse_fault_around(o);
  auto host = LinuxHost::create(lo);
  if (!host) bad("real memory unavailable: " + error_to_string(host.error()));
  h->linux_host = std::move(*host);
  h->mm = h->linux_host.get();
  if (b == "uffd") {
    auto src = uffd::FileSource::from_fd(snap.fd);
    if (!src) bad("--snapshot: " + error_to_string(src.error()));
    h->source = std::move(*src);
    auto server = uffd::PageServer::create(*h->source, uffd::PageServerOptions{});
    if (!server) bad("userfaultfd unavailable: " + error_to_string(server.error()));
    h->server = std::move(*server);
    auto base = h->server->map_lazy(h->linux_host.get(), bytes, 0);
    if (!base) bad("--backing uffd: " + error_to_string(base.error()));
    if (auto r = h->server->start(); !r) bad("--backing uffd: " + error_to_string(r.error()));
    h->base = *base;
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
    if (o.file.empty()) {
      h->fd = temp_file("/tmp", bytes, "--backing file");
    } else if (copy) {
      // The guest's own copy of the user's file, taken before the engine ran.
      h->fd = snap.file_copy >= 0 ? dup(snap.file_copy) : copy_user_file(o.file, bytes);
      if (h->fd < 0) bad("--file " + o.file + ": cannot duplicate the copy's fd");
    } else {
      h->fd = open(o.file.c_str(), O_RDWR | O_CREAT, 0600);
      if (h->fd < 0) bad(fmt::format("--file {}: cannot open", o.file));
      struct stat st {};
      if (fstat(h->fd, &st) == 0 && static_cast<uint64_t>(st.st_size) < bytes &&
          ftruncate(h->fd, static_cast<off_t>(bytes)) != 0) {
        bad(fmt::format("--file {}: cannot size it to {} bytes", o.file, bytes));
      }
    }
    spec.fd = h->fd;
  } else {
    bad("--backing " + b + ": expected anon, memfd, file, thp, uffd, model or model-file");
  }
  auto region = h->linux_host->create_region(spec);
  if (!region) bad("--backing " + b + ": " + error_to_string(region.error()));
  h->base = region->start;
}

// Word 0 of every page as the run starts (the snapshot or the user's file; else all zero).
std::vector<uint64_t> initial_words(const RunOptions& o, const Workload& w, const Snapshot& snap) {
  std::vector<uint64_t> words;
  int fd = -1;
  if (o.backing == "uffd") fd = snap.fd;
  else if (o.backing == "file" && !o.file.empty()) fd = open(o.file.c_str(), O_RDONLY);
  if (fd < 0) return words;
  words.assign(w.pages, 0);
  for (uint64_t p = 0; p < w.pages; ++p) {
    uint64_t v = 0;
    if (pread(fd, &v, sizeof v, static_cast<off_t>(p * kPageSize)) == sizeof v) words[p] = v;
  }
  if (fd != snap.fd) close(fd);
  return words;
}

// The XOR of every word vCPU v reads, given the initial words (empty: zeros). Only meaningful
// when w.predictable().
uint64_t predict_checksum(const Workload& w, unsigned v, const std::vector<uint64_t>& initial) {
  const kvm::GuestWorkload g = w.guest(v);
  const uint64_t first = (g.slice.value - kGuestBase) / kPageSize;
  std::vector<uint64_t> cur(g.npages, 0);
  if (!initial.empty()) {
    std::copy_n(initial.begin() + static_cast<ptrdiff_t>(first), g.npages, cur.begin());
  }
  uint64_t x = 0;
  kvm::for_each_guest_access(g, [&](uint32_t pass, uint64_t page, bool write) {
    if (write) {
      cur[page] = kvm::guest_write_value(g.slice + page * kPageSize, pass);
    } else {
      x ^= cur[page];
    }
  });
  return x;
}

// ---------------------------------------------------------------------------------------------
// Progress on stderr: [#####.....]  45% engine pass 2/3.

class Progress {
 public:
  explicit Progress(bool on) : on_(on) {}
  void draw(const char* who, uint64_t done, uint64_t total, unsigned pass, unsigned passes,
            double seconds) {
    if (!on_) return;
    constexpr int kWidth = 40;
    double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    frac = std::min(frac, 1.0);
    int fill = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(fill), '#');
    bar.append(static_cast<size_t>(kWidth - fill), '.');
    std::fprintf(stderr, "\r[%s] %3d%% %s pass %u/%u %.1fs ", bar.c_str(),
                 static_cast<int>(frac * 100), who, pass, passes, seconds);
    std::fflush(stderr);
  }
  void clear() {
    if (on_) std::fprintf(stderr, "\r%*s\r", 78, "");
  }
  bool on() const { return on_; }

 private:
  bool on_;
};

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

nlohmann::json uffd_json(const std::optional<uffd::PageServerStats>& s) {
  if (!s) return nullptr;
  return {{"faults", s->faults},
          {"faults_served", s->faults_served},
          {"pages_copied", s->pages_copied},
          {"pages_zeroed", s->pages_zeroed},
          {"prefetched", s->prefetched},
          {"latency_p50_ns", s->latency_p50_ns()}};
}

// ---------------------------------------------------------------------------------------------
// Engine: software vCPUs through gfnmap's MMU.

struct EngineResult {
  MmuStats mmu;
  double first_touch_s = 0;
  double after_s = 0;
  uint64_t dirty_pages = 0;
  uint64_t harvests = 0;
  uint64_t async_exits = 0;
  uint64_t unexpected_exits = 0;
  uint64_t refs = 0;
  uint64_t metadata = 0;
  std::optional<uint64_t> populated_ahead;  // LinuxHost's fault-around (real memory only)
  std::vector<uint64_t> checksums;
  std::optional<uffd::PageServerStats> uffd;
  bool ok() const { return refs == 0 && unexpected_exits == 0; }
};

EngineResult run_engine(const RunOptions& o, const Workload& w, PgLevel max_level,
                        const Snapshot& snap, Progress& progress) {
  HostSetup host;
  setup_host(o, w.bytes, snap, /*copy=*/false, &host);
  Memslots slots;
  DirtyLog dirty(slots);
  std::unique_ptr<AsyncPfWorkerPool> pool;
  if (o.async_pf) pool = std::make_unique<AsyncPfWorkerPool>(*host.mm, 2);
  MmuOptions mo;
  mo.max_level = max_level;
  mo.dirty = &dirty;
  mo.async_pf_pool = pool.get();
  auto mmu = std::make_unique<Mmu>(slots, *host.mm, mo);
  auto set_slots = [&](uint32_t flags) -> std::string {
    for (unsigned s = 0; s < w.slots; ++s) {
      UserspaceMemoryRegion r;
      r.slot = s;
      r.flags = flags;
      r.guest_phys_addr = kGuestBase + s * w.slot_bytes;
      r.memory_size = w.slot_bytes;
      r.userspace_addr = host.base.value + s * w.slot_bytes;
      auto res = slots.set_memory_region(r);
      if (!res) return "memslot: " + error_to_string(res.error());
    }
    return {};
  };
  if (std::string err = set_slots(0); !err.empty()) bad(err);

  // vCPU threads, in lock step per pass: each runs the guest's own access sequence.
  EngineResult res;
  res.checksums.assign(w.vcpus, 0);
  std::vector<std::atomic<uint64_t>> done(w.vcpus);
  std::atomic<uint64_t> unexpected_exits{0};
  std::atomic<uint64_t> async_exits{0};
  std::barrier sync(static_cast<std::ptrdiff_t>(w.vcpus) + 1);
  std::vector<std::thread> threads;
  for (unsigned v = 0; v < w.vcpus; ++v) {
    threads.emplace_back([&, v] {
      VcpuOptions vo;
      vo.async_pf = o.async_pf;
      Vcpu vcpu(*mmu, v, vo);
      // Hits run in guest mode; it is left for faults and before every barrier (a dirty-log
      // harvest or an invalidation between passes would otherwise wait for this thread).
      std::optional<Vcpu::GuestMode> gm;
      const kvm::GuestWorkload g = w.guest(v);
      uint64_t checksum = 0;
      uint64_t k = 0;  // accesses in this pass
      uint32_t cur_pass = 0;
      sync.arrive_and_wait();  // pass 0 starts
      gm.emplace(vcpu);
      kvm::for_each_guest_access(g, [&](uint32_t pass, uint64_t page, bool write) {
        if (pass != cur_pass) {
          gm.reset();
          done[v].store(w.per_vcpu, std::memory_order_relaxed);
          sync.arrive_and_wait();  // pass ends
          sync.arrive_and_wait();  // next pass starts
          gm.emplace(vcpu);
          cur_pass = pass;
          k = 0;
        }
        if ((++k & 1023) == 0) done[v].store(k, std::memory_order_relaxed);
        const Gpa gpa = g.slice + page * kPageSize;
        uint64_t value = write ? kvm::guest_write_value(gpa, pass) : 0;
        if (write ? gm->try_write_u64(gpa, value) : gm->try_read_u64(gpa, &value)) {
          if (!write) checksum ^= value;
          return;  // table hit
        }
        gm.reset();
        for (;;) {
          VcpuExit ex = write ? vcpu.write_u64(gpa, value) : vcpu.read_u64(gpa, &value);
          if (ex.ok()) {
            if (!write) checksum ^= value;
            break;
          }
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
        gm.emplace(vcpu);
      });
      gm.reset();
      done[v].store(w.per_vcpu, std::memory_order_relaxed);
      sync.arrive_and_wait();  // last pass ends
      while (vcpu.async_pf_queue() && vcpu.async_pf_queue()->queued() > 0) {
        vcpu.wait_async_pf(100);
        vcpu.check_async_pf_completion();
      }
      res.checksums[v] = checksum;
    });
  }

  std::vector<uint64_t> bitmap(dirty_bitmap_words(w.slot_bytes / kPageSize));
  const auto t_run = Clock::now();
  for (unsigned pass = 0; pass < w.passes; ++pass) {
    for (auto& d : done) d.store(0, std::memory_order_relaxed);
    const auto t0 = Clock::now();
    sync.arrive_and_wait();  // start
    // The "end" phase completes when every vCPU arrived; poll the progress meanwhile.
    if (progress.on()) {
      for (;;) {
        uint64_t sum = 0;
        for (auto& d : done) sum += d.load(std::memory_order_relaxed);
        progress.draw("engine", sum, w.per_vcpu * w.vcpus, pass + 1, w.passes, since(t_run));
        if (sum >= w.per_vcpu * w.vcpus) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    sync.arrive_and_wait();  // end
    const double s = since(t0);
    if (pass == 0) {
      res.first_touch_s = s;
      if (w.dirty_log) {
        if (std::string err = set_slots(kMemLogDirtyPages); !err.empty()) {
          std::fprintf(stderr, "gfnmap run: enabling dirty logging: %s\n", err.c_str());
          unexpected_exits.fetch_add(1);
        }
      }
    } else {
      res.after_s += s;
      if (w.dirty_log) {
        for (unsigned sl = 0; sl < w.slots; ++sl) {
          auto r = dirty.get_dirty_log(sl, bitmap);
          if (r) res.dirty_pages += *r;
        }
        ++res.harvests;
      }
    }
  }
  for (auto& t : threads) t.join();
  progress.clear();

  res.mmu = mmu->stats();
  res.metadata = mmu->metadata_bytes();
  mmu.reset();
  res.refs = host.mm->outstanding_refs();
  if (host.linux_host) res.populated_ahead = host.linux_host->stats().populated_ahead;
  res.unexpected_exits = unexpected_exits.load();
  res.async_exits = async_exits.load();
  if (host.server) res.uffd = host.server->stats();
  return res;
}

// ---------------------------------------------------------------------------------------------
// kvm: the built-in guest in a real VM, on its own copy of the backing.

struct KvmResult {
  std::optional<kvm::RunStats> stats;
  std::string error;
  std::optional<uffd::PageServerStats> uffd;
  bool ok() const { return stats.has_value(); }
};

KvmResult run_kvm(const RunOptions& o, const Workload& w, const Snapshot& snap,
                  Progress& progress) {
  HostSetup host;
  setup_host(o, w.bytes, snap, /*copy=*/true, &host);
  kvm::RunConfig c;
  for (unsigned s = 0; s < w.slots; ++s) {
    kvm::RunSlot rs;
    rs.id = static_cast<uint16_t>(s);
    rs.gpa = Gpa(kGuestBase + s * w.slot_bytes);
    rs.size = w.slot_bytes;
    rs.hva = reinterpret_cast<void*>(host.base.value + s * w.slot_bytes);
    c.slots.push_back(rs);
  }
  c.vcpus = w.vcpus;
  c.bytes_per_vcpu = w.per_vcpu * kPageSize;
  c.slice_gpa = Gpa(kGuestBase);
  c.overlap = w.overlap;
  c.passes = w.passes;
  c.write_percent = w.write_percent;
  c.random = w.random;
  c.seed = w.seed;
  c.dirty = w.dirty_log ? kvm::DirtyMode::kBitmap : kvm::DirtyMode::kNone;
  c.dirty_after_first_pass = true;
  std::atomic<uint64_t> passes_done{0};
  c.on_pass = [&](unsigned, uint32_t) { passes_done.fetch_add(1, std::memory_order_relaxed); };

  KvmResult res;
  std::optional<Result<kvm::RunStats>> out;
  std::atomic<bool> finished{false};
  const auto t0 = Clock::now();
  std::thread runner([&] {
    out.emplace(kvm::run_guest_workload(c));
    finished.store(true, std::memory_order_release);
  });
  // The guest reports only at the end of a pass: the bar moves per vCPU-pass. During pass 1
  // the backing's resident pages (mincore) show how far the first touch got.
  std::vector<unsigned char> resident(progress.on() ? w.pages : 0);
  while (!finished.load(std::memory_order_acquire)) {
    const uint64_t d = passes_done.load(std::memory_order_relaxed);
    uint64_t pages_done = d * w.per_vcpu;
    if (d < w.vcpus && !resident.empty() &&
        mincore(reinterpret_cast<void*>(host.base.value), w.bytes, resident.data()) == 0) {
      uint64_t n = 0;
      for (unsigned char r : resident) n += r & 1;
      pages_done = std::max(pages_done, std::min(n * (w.overlap ? w.vcpus : 1),
                                                 uint64_t{w.vcpus} * w.per_vcpu));
    }
    progress.draw("kvm", pages_done, uint64_t{w.passes} * w.vcpus * w.per_vcpu,
                  static_cast<unsigned>(std::min<uint64_t>(d / w.vcpus + 1, w.passes)),
                  w.passes, since(t0));
    std::this_thread::sleep_for(std::chrono::milliseconds(progress.on() ? 100 : 10));
  }
  runner.join();
  progress.clear();
  if (out->ok()) {
    res.stats = std::move(out->value());
  } else {
    res.error = error_to_string(out->error());
  }
  if (host.server) res.uffd = host.server->stats();
  return res;
}

// ---------------------------------------------------------------------------------------------
// Report.

nlohmann::json hex_json(const std::vector<uint64_t>& v) {
  nlohmann::json a = nlohmann::json::array();
  for (uint64_t x : v) a.push_back(fmt::format("{:#x}", x));
  return a;
}

// "io", "mmio", "dirty_ring_full": kvm::ExitKind names in lower case.
std::string exit_name(size_t kind) {
  std::string n(kvm::to_string(static_cast<kvm::ExitKind>(kind)));
  for (char& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return n;
}

std::string exits_text(const kvm::RunStats& s) {
  std::string t;
  for (size_t k = 0; k < kvm::kExitKindCount; ++k) {
    if (!s.exits[k]) continue;
    t += fmt::format("{}{} {}", t.empty() ? "" : ", ", exit_name(k), s.exits[k]);
  }
  return t.empty() ? "none" : t;
}

int run_workload(const RunOptions& o) {
  // ---- Validate.
  if (o.vcpus < 1 || o.vcpus > 256) bad(fmt::format("--vcpus {}: expected 1..256", o.vcpus));
  Workload w;
  w.vcpus = o.vcpus;
  w.bytes = parse_u64(o.memory, "--memory");
  if (w.bytes == 0 || w.bytes % kPageSize) bad("--memory " + o.memory + ": must be a non-zero multiple of 4K");
  if (w.bytes > (uint64_t{64} << 30)) bad("--memory " + o.memory + ": at most 64G");
  if (o.slots < 1 || o.slots > 512) bad(fmt::format("--slots {}: expected 1..512", o.slots));
  if (w.bytes % (uint64_t{o.slots} * kPageSize)) bad("--memory must divide into --slots whole pages");
  w.slots = o.slots;
  w.slot_bytes = w.bytes / o.slots;
  w.pages = w.bytes / kPageSize;
  if (!o.overlap && w.pages < o.vcpus) bad("--memory too small: fewer pages than vCPUs");
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
  if (!o.snapshot.empty() && o.backing != "uffd") bad("--snapshot needs --backing uffd");
  (void)parse_fault_around(o);  // throws BadInput for a bad --fault-around
  static const char* const kBackings[] = {"anon", "memfd", "file", "thp", "uffd", "model",
                                          "model-file"};
  if (std::find_if(std::begin(kBackings), std::end(kBackings),
                   [&](const char* b) { return o.backing == b; }) == std::end(kBackings)) {
    bad("--backing " + o.backing + ": expected anon, memfd, file, thp, uffd, model or model-file");
  }
  if (!o.backend.empty() && o.backend != "engine" && o.backend != "kvm" && o.backend != "both") {
    bad("--backend " + o.backend + ": expected engine, kvm or both");
  }
  w.per_vcpu = o.overlap ? w.pages : w.pages / o.vcpus;
  w.passes = o.passes;
  w.write_percent = o.write_percent;
  w.random = o.pattern == "random";
  w.overlap = o.overlap;
  w.dirty_log = o.dirty_log;
  w.seed = o.seed;

  // ---- Which backends: kvm needs /dev/kvm, real memory and at most kKvmMaxBytes.
  std::string kvm_why;
  const bool model = o.backing == "model" || o.backing == "model-file";
  if (model) {
    kvm_why = "backing " + o.backing + " is the host model, not real memory";
  } else if (w.bytes > kKvmMaxBytes) {
    kvm_why = fmt::format("--memory {} is above the 1G a real VM is given here (docs/kvm.md)",
                          o.memory);
  } else if (std::string why; !kvm::kvm_available(&why)) {
    kvm_why = "/dev/kvm unavailable: " + why;
  }
  bool use_engine = o.backend != "kvm";
  bool use_kvm = o.backend == "kvm" || o.backend == "both" || o.backend.empty();
  if (use_kvm && !kvm_why.empty()) {
    if (!o.backend.empty()) bad("--backend " + o.backend + ": " + kvm_why);
    use_kvm = false;  // auto: engine only, saying why
  }
  const std::string backend_name = use_engine && use_kvm ? "both" : use_kvm ? "kvm" : "engine";

  // ---- The snapshot for uffd, and what reads should see.
  Snapshot snap;
  if (o.backing == "uffd") {
    if (o.snapshot.empty()) {
      snap.fd = generate_snapshot(w.bytes);
      snap.generated = true;
    } else {
      snap.fd = open(o.snapshot.c_str(), O_RDONLY);
      if (snap.fd < 0) bad(fmt::format("--snapshot {}: cannot open", o.snapshot));
      snap.path = o.snapshot;
    }
  }
  if (use_kvm && use_engine && o.backing == "file" && !o.file.empty()) {
    snap.file_copy = copy_user_file(o.file, w.bytes);
  }
  std::vector<uint64_t> expected;
  if (w.predictable()) {
    const std::vector<uint64_t> initial = initial_words(o, w, snap);
    for (unsigned v = 0; v < w.vcpus; ++v) expected.push_back(predict_checksum(w, v, initial));
  }

  // ---- Run: engine, then kvm (never both at once: they would share the CPUs).
  const bool show_progress = !o.json && !o.no_progress && (o.progress || isatty(STDERR_FILENO));
  Progress progress(show_progress);
  std::optional<EngineResult> eng;
  std::optional<KvmResult> kv;
  if (use_engine) eng = run_engine(o, w, max_level, snap, progress);
  if (use_kvm) kv = run_kvm(o, w, snap, progress);

  const uint64_t touched = w.per_vcpu * w.vcpus;
  const uint64_t after_accesses = touched * (w.passes - 1);
  auto ns_per_page = [&](double s) { return s * 1e9 / static_cast<double>(touched); };
  auto aps = [&](double s) { return s > 0 ? static_cast<double>(after_accesses) / s : 0.0; };
  std::optional<bool> eng_match, kvm_match;
  if (!expected.empty() && eng) eng_match = eng->checksums == expected;
  if (!expected.empty() && kv && kv->ok()) kvm_match = kv->stats->checksums == expected;
  const bool ok = (!eng || eng->ok()) && (!kv || kv->ok()) && eng_match.value_or(true) &&
                  kvm_match.value_or(true);

  if (o.json) {
    nlohmann::json j;
    j["schema_version"] = kRunSchemaVersion;
    j["host"] = host_facts_json(host_facts());  // what the result ran on
    j["config"] = {{"vcpus", o.vcpus},
                   {"memory_bytes", w.bytes},
                   {"slots", o.slots},
                   {"backing", o.backing},
                   {"backend", backend_name},
                   {"snapshot", o.backing != "uffd" ? nlohmann::json(nullptr)
                                : snap.generated    ? nlohmann::json("generated")
                                                    : nlohmann::json(snap.path)},
                   {"write_percent", o.write_percent},
                   {"pattern", o.pattern},
                   {"passes", o.passes},
                   {"overlap", o.overlap},
                   {"dirty_log", o.dirty_log},
                   {"async_pf", o.async_pf},
                   {"max_level", o.max_level},
                   {"pagemap", o.pagemap},
                   {"fault_around", fault_around_pages(o)},
                   {"fault_around_policy", to_string(parse_fault_around(o).first)},
                   {"seed", o.seed}};
    j["backends"] = nlohmann::json::array();
    if (eng) j["backends"].push_back("engine");
    if (kv) j["backends"].push_back("kvm");
    // Why the real guest did not run: the user's choice first, then what prevented it.
    j["kvm_skipped"] = use_kvm              ? nlohmann::json(nullptr)
                       : o.backend == "engine" ? nlohmann::json("--backend engine")
                                               : nlohmann::json(kvm_why);
    j["pages"] = w.pages;
    j["pages_per_vcpu"] = w.per_vcpu;
    j["checksum"] = {{"predictable", w.predictable()},
                     {"expected", expected.empty() ? nlohmann::json(nullptr) : hex_json(expected)},
                     {"engine_match", eng_match ? nlohmann::json(*eng_match) : nullptr},
                     {"kvm_match", kvm_match ? nlohmann::json(*kvm_match) : nullptr}};
    if (eng) {
      const MmuStats& st = eng->mmu;
      nlohmann::json e;
      e["pages_faulted"] = st.faults;
      e["faults"] = {{"total", st.faults},       {"fast", st.fast_faults},
                     {"nowait", st.nowait_hits}, {"slow", st.slow_faults},
                     {"async", st.async_queued}, {"async_halts", st.async_halts},
                     {"retried", st.retries},    {"exits", st.exits},
                     {"prefetch", st.prefetches}};
      e["installs"] = {{"total", st.installs},
                       {"2m", st.installs_2m},
                       {"1g", st.installs_1g},
                       {"4k", st.installs - st.installs_2m - st.installs_1g}};
      e["first_touch"] = {{"seconds", eng->first_touch_s},
                          {"ns_per_page", ns_per_page(eng->first_touch_s)}};
      e["after"] = {{"seconds", eng->after_s},
                    {"accesses", after_accesses},
                    {"accesses_per_second", aps(eng->after_s)}};
      e["dirty"] = {{"harvests", eng->harvests}, {"pages", eng->dirty_pages}};
      e["exits"] = {{"async", eng->async_exits}, {"unexpected", eng->unexpected_exits}};
      e["tlb_flushes"] = st.tlb_flushes;
      e["zapped"] = st.zapped;
      e["splits"] = st.splits;
      e["metadata_bytes"] = eng->metadata;
      e["populated_ahead"] =
          eng->populated_ahead ? nlohmann::json(*eng->populated_ahead) : nlohmann::json(nullptr);
      e["unexpected_exits"] = eng->unexpected_exits;
      e["outstanding_refs"] = eng->refs;
      e["checksums"] = hex_json(eng->checksums);
      e["uffd"] = uffd_json(eng->uffd);
      e["ok"] = eng->ok();
      j["engine"] = e;
    } else {
      j["engine"] = nullptr;
    }
    if (kv) {
      nlohmann::json k;
      k["ok"] = kv->ok();
      k["error"] = kv->ok() ? nlohmann::json(nullptr) : nlohmann::json(kv->error);
      if (kv->ok()) {
        const kvm::RunStats& s = *kv->stats;
        k["pages_faulted"] = s.pages_faulted;
        k["first_touch"] = {{"seconds", s.first_touch_seconds},
                            {"ns_per_page", ns_per_page(s.first_touch_seconds)},
                            {"ns_per_page_per_vcpu", s.first_touch_ns_per_page}};
        k["after"] = {{"seconds", s.after_seconds},
                      {"accesses", after_accesses},
                      {"accesses_per_second", aps(s.after_seconds)},
                      {"ns_per_page_per_vcpu", s.retouch_ns_per_page}};
        k["dirty"] = {{"harvests", w.dirty_log ? s.dirty_harvests : 0},
                      {"pages", s.dirty_pages_harvested}};
        nlohmann::json ex = nlohmann::json::object();
        for (size_t i = 0; i < kvm::kExitKindCount; ++i) {
          ex[exit_name(i)] = s.exits[i];
        }
        k["exits"] = ex;
        k["checksums"] = hex_json(s.checksums);
        k["wall_seconds"] = s.wall_ms / 1e3;
      }
      k["uffd"] = uffd_json(kv->uffd);
      j["kvm"] = k;
    } else {
      j["kvm"] = nullptr;
    }
    j["ok"] = ok;
    std::printf("%s\n", j.dump(2).c_str());
    return ok ? 0 : 1;
  }

  // ---- Text: one column per backend.
  std::printf("gfnmap run: %u vCPUs, %s over %u slot(s), backing %s, %u%% writes, %s, %u passes%s%s\n",
              o.vcpus, o.memory.c_str(), o.slots, o.backing.c_str(), o.write_percent,
              o.pattern.c_str(), o.passes, o.dirty_log ? ", dirty logging" : "",
              o.async_pf ? ", async PF" : "");
  if (o.backing == "uffd") {
    std::printf("  snapshot: %s\n", snap.generated ? "generated (word 0 of page p = 0x5eed000000000000 | p)"
                                                   : snap.path.c_str());
  }
  {
    const HostFacts& f = host_facts();
    std::printf("  host: kernel %s, zero page %s, THP %s, uffd %s, kvm %s\n",
                f.kernel_release.c_str(), f.zero_page ? "yes" : "no",
                f.thp_enabled.empty() ? "none" : f.thp_enabled.c_str(),
                f.uffd_available() ? "yes" : "no", f.kvm_available() ? "yes" : "no");
  }
  if (!use_kvm && o.backend.empty()) std::printf("  kvm backend skipped: %s\n", kvm_why.c_str());
  const bool kvm_ok = kv && kv->ok();
  auto row = [&](const char* label, const std::string& e, const std::string& k) {
    std::string line = fmt::format("  {:<23}", label);
    if (eng) line += fmt::format(" {:<32}", e);
    if (kv) line += " " + k;
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::printf("%s\n", line.c_str());
  };
  row("", eng ? "engine (gfnmap MMU)" : "", kv ? "kvm (real guest)" : "");
  const kvm::RunStats* ks = kvm_ok ? &*kv->stats : nullptr;
  auto kcol = [&](auto f) -> std::string { return ks ? f(*ks) : "-"; };
  row("pages faulted", eng ? std::to_string(eng->mmu.faults) : "",
      kcol([](const kvm::RunStats& s) { return std::to_string(s.pages_faulted); }));
  row("first touch",
      eng ? fmt::format("{:.3f} s, {:.0f} ns/page", eng->first_touch_s,
                        ns_per_page(eng->first_touch_s))
          : "",
      kcol([&](const kvm::RunStats& s) {
        return fmt::format("{:.3f} s, {:.0f} ns/page", s.first_touch_seconds,
                           ns_per_page(s.first_touch_seconds));
      }));
  if (w.passes > 1) {
    row("after", eng ? fmt::format("{:.3f} s, {:.3g} accesses/s", eng->after_s, aps(eng->after_s)) : "",
        kcol([&](const kvm::RunStats& s) {
          return fmt::format("{:.3f} s, {:.3g} accesses/s", s.after_seconds, aps(s.after_seconds));
        }));
  }
  if (w.dirty_log) {
    row("dirty pages harvested",
        eng ? fmt::format("{} in {} harvests", eng->dirty_pages, eng->harvests) : "",
        kcol([](const kvm::RunStats& s) {
          return fmt::format("{} in {} harvests", s.dirty_pages_harvested, s.dirty_harvests);
        }));
  }
  row("exits",
      eng ? fmt::format("async {}, unexpected {}", eng->async_exits, eng->unexpected_exits) : "",
      kcol([](const kvm::RunStats& s) { return exits_text(s); }));
  if (o.backing == "uffd") {
    auto u = [](const std::optional<uffd::PageServerStats>& s) {
      return s ? fmt::format("{} faults, {} copied, {} zero", s->faults, s->pages_copied,
                             s->pages_zeroed)
               : std::string("-");
    };
    row("page server", eng ? u(eng->uffd) : "", kv ? u(kv->uffd) : "");
  }
  auto match = [&](const std::optional<bool>& m) {
    return !m ? std::string(expected.empty() ? "not predictable" : "-")
              : *m ? std::string("as predicted")
                   : "MISMATCH";
  };
  row("read checksums", eng ? match(eng_match) : "", kv ? match(kvm_match) : "");
  if (eng) {
    row("outstanding references",
        fmt::format("{}{}", eng->refs, eng->refs ? " (LEAK)" : ""), kv ? "-" : "");
  }
  if (eng && ks && eng->first_touch_s > 0) {
    std::printf("  kvm / engine: first touch %.2fx", ks->first_touch_seconds / eng->first_touch_s);
    if (w.passes > 1 && eng->after_s > 0) {
      std::printf(", after %.2fx", ks->after_seconds / eng->after_s);
    }
    std::printf(" (time ratios)\n");
  }
  if (eng) {
    const MmuStats& st = eng->mmu;
    std::printf("  engine faults          fast %llu, nowait %llu, slow %llu, async %llu, retried %llu, exits %llu\n",
                static_cast<unsigned long long>(st.fast_faults),
                static_cast<unsigned long long>(st.nowait_hits),
                static_cast<unsigned long long>(st.slow_faults),
                static_cast<unsigned long long>(st.async_queued),
                static_cast<unsigned long long>(st.retries),
                static_cast<unsigned long long>(st.exits));
    std::printf("  engine installs        %llu 4K, %llu 2M, %llu 1G; tlb flushes %llu; table "
                "metadata %llu bytes (%.3f%% of guest memory)\n",
                static_cast<unsigned long long>(st.installs - st.installs_2m - st.installs_1g),
                static_cast<unsigned long long>(st.installs_2m),
                static_cast<unsigned long long>(st.installs_1g),
                static_cast<unsigned long long>(st.tlb_flushes),
                static_cast<unsigned long long>(eng->metadata),
                100.0 * static_cast<double>(eng->metadata) / static_cast<double>(w.bytes));
    if (eng->populated_ahead) {
      const auto [policy, pages] = parse_fault_around(o);
      std::printf("  engine host            fault-around %s%s: %llu pages populated ahead of "
                  "their faults\n",
                  std::string(to_string(policy)).c_str(),
                  policy == FaultAround::kOff ? "" : fmt::format(" (up to {} pages)", pages).c_str(),
                  static_cast<unsigned long long>(*eng->populated_ahead));
    }
  }
  if (kv && !kv->ok()) std::printf("  kvm failed: %s\n", kv->error.c_str());
  if (!ok) std::printf("  FAILED\n");
  return ok ? 0 : 1;
}

GFNMAP_VERB("run", "run a memstress-like workload on gfnmap's MMU and in a real KVM guest",
            [](CLI::App& cmd) -> std::function<int()> {
              auto o = std::make_shared<RunOptions>();
              cmd.footer(kRunFooter);
              cmd.add_option("--backend", o->backend,
                             "engine (gfnmap's MMU) | kvm (a real guest) | both; default: both "
                             "where /dev/kvm works and the backing is real memory <= 1G");
              cmd.add_option("--vcpus", o->vcpus, "vCPUs (1..256)")->capture_default_str();
              cmd.add_option("--memory", o->memory,
                             "guest memory in bytes, K/M/G suffixes (multiple of 4K, <= 64G; "
                             "kvm: <= 1G)")
                  ->capture_default_str();
              cmd.add_option("--slots", o->slots, "memslots the memory is split into (1..512)")
                  ->capture_default_str();
              cmd.add_option("--backing", o->backing,
                             "anon | memfd | file | thp | uffd (real memory) | model | "
                             "model-file (host model, engine only)")
                  ->capture_default_str();
              cmd.add_option("--file", o->file,
                             "file for --backing file (default: an unlinked temp file; the "
                             "real guest gets a copy)");
              cmd.add_option("--snapshot", o->snapshot,
                             "snapshot file for --backing uffd (default: a generated one)");
              cmd.add_option("--write-percent", o->write_percent,
                             "share of accesses that write (0..100)")
                  ->capture_default_str();
              cmd.add_option("--pattern", o->pattern,
                             "sequential | random (the guest's full-period LCG order)")
                  ->capture_default_str();
              cmd.add_option("--passes", o->passes,
                             "passes over the memory; pass 1 is the first touch (1..1000)")
                  ->capture_default_str();
              cmd.add_flag("--overlap", o->overlap,
                           "every vCPU touches all memory instead of its own slice");
              cmd.add_flag("--dirty-log", o->dirty_log,
                           "log dirty pages after pass 1 and harvest after each later pass");
              cmd.add_flag("--async-pf", o->async_pf,
                           "engine: let faults that need I/O go async (useful with model-file)");
              cmd.add_option("--max-level", o->max_level,
                             "engine: largest second-level leaf: 4k | 2m | 1g")
                  ->capture_default_str();
              cmd.add_option("--seed", o->seed, "random seed for --pattern random and writes")
                  ->capture_default_str();
              cmd.add_flag("--pagemap", o->pagemap,
                           "engine, real memory: report physical pfns from /proc/self/pagemap "
                           "(one pread per fault) instead of host virtual page numbers");
              cmd.add_option("--fault-around", o->fault_around,
                             "engine, real anon/memfd memory: how many pages a slow-path fault "
                             "populates. sequential: ahead of sequential runs only, up to 64 "
                             "pages (random access populates one page per fault); off (or 0): "
                             "one page per fault, as KVM; N (2..512, a power of two): the aligned "
                             "N-page window of every fault")
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
