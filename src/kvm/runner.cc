// gfnmap kvm: the library-level workload runner behind `gfnmap run --backend kvm|both`: one VM,
// the caller's memslot layout, one thread per vCPU running the built-in guest, stats after.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cerrno>
#include <chrono>
#include <thread>

#include "gfnmap/kvm.h"

namespace gfnmap::kvm {

std::string_view to_string(DirtyMode mode) {
  switch (mode) {
    case DirtyMode::kNone: return "none";
    case DirtyMode::kBitmap: return "bitmap";
    case DirtyMode::kManualProtect: return "manual";
    case DirtyMode::kRing: return "ring";
  }
  return "?";
}

namespace {

struct Mapping {
  void* p = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(void* ptr, size_t n) : p(ptr), size(n) {}
  Mapping(Mapping&& o) noexcept : p(o.p), size(o.size) { o.p = nullptr; }
  Mapping& operator=(Mapping&&) = delete;
  Mapping(const Mapping&) = delete;
  ~Mapping() {
    if (p) ::munmap(p, size);
  }
};

constexpr uint64_t k2M = 2ull << 20;

}  // namespace

Result<RunStats> run_guest_workload(const RunConfig& cfg) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  if (cfg.vcpus == 0 || cfg.vcpus > 256) return make_error(EINVAL, "vcpus must be 1..256");
  if (cfg.bytes_per_vcpu < kPageSize || cfg.bytes_per_vcpu % kPageSize) {
    return make_error(EINVAL, "bytes_per_vcpu must be a positive multiple of 4096");
  }
  if (cfg.slice_gpa.value % kPageSize) return make_error(EINVAL, "slice_gpa not page aligned");
  if (cfg.write_percent > 100) return make_error(EINVAL, "write_percent above 100");
  if (cfg.passes == 0) return make_error(EINVAL, "passes must be >= 1");

  // Dirty logging turned on after pass 1 and harvested after every later pass.
  const bool staged = cfg.dirty != DirtyMode::kNone && cfg.dirty_after_first_pass;

  auto sys = System::open();
  if (!sys) return sys.error();
  VmOptions vo;
  vo.manual_dirty_log_protect = cfg.dirty == DirtyMode::kManualProtect;
  if (cfg.dirty == DirtyMode::kRing) vo.dirty_ring_bytes = cfg.dirty_ring_bytes;
  auto vm_r = Vm::create(*sys, vo);
  if (!vm_r) return vm_r.error();
  Vm& vm = **vm_r;

  // Slots: the caller's, or one anonymous slot covering every slice.
  std::vector<RunSlot> slots = cfg.slots;
  const uint64_t span = (cfg.overlap ? 1 : cfg.vcpus) * cfg.bytes_per_vcpu;
  const uint64_t slices_end = cfg.slice_gpa.value + span;
  if (slots.empty()) slots.push_back(RunSlot{1, cfg.slice_gpa, span, nullptr, 0});
  std::vector<Mapping> owned;
  uint64_t top = slices_end;
  uint32_t max_id = 0;
  for (auto& s : slots) {
    if (!s.hva) {
      void* p = ::mmap(nullptr, s.size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return make_error(errno, "mmap slot ", s.id, " backing");
      owned.emplace_back(p, s.size);
      s.hva = p;
    }
    if (cfg.dirty != DirtyMode::kNone && !staged) s.flags |= kMemLogDirtyPages;
    UserspaceMemoryRegion r{s.id, s.flags, s.gpa.value, s.size,
                            reinterpret_cast<uint64_t>(s.hva)};
    if (int e = vm.set_user_memory_region(r)) {
      return make_error(e, "KVM_SET_USER_MEMORY_REGION slot ", s.id, ": ", errno_name(e));
    }
    top = std::max(top, s.gpa.value + s.size);
    max_id = std::max<uint32_t>(max_id, s.id);
  }
  GuestLayoutOptions lo;
  lo.slot_id = static_cast<uint16_t>(max_id + 1);
  lo.gpa = Gpa((top + k2M - 1) / k2M * k2M);
  auto guest = Guest::create(vm, lo);
  if (!guest) return guest.error();

  std::vector<std::unique_ptr<Vcpu>> vcpus;
  const uint64_t npages = cfg.bytes_per_vcpu / kPageSize;
  for (unsigned i = 0; i < cfg.vcpus; ++i) {
    auto v = vm.create_vcpu(i);
    if (!v) return v.error();
    GuestWorkload w{cfg.slice_gpa + (cfg.overlap ? 0 : i) * cfg.bytes_per_vcpu, npages,
                    cfg.passes,
                    cfg.write_percent, cfg.random, cfg.seed + i};
    if (auto r = (*guest)->setup_vcpu(**v, w); !r) return r.error();
    vcpus.push_back(std::move(*v));
  }

  // Lock step: the coordinator (this thread) and every vCPU meet at `sync` before and after
  // each pass; between passes the vCPUs sit in userspace (a pass-report exit), so dirty logs
  // can be switched on and harvested with no vCPU running. A vCPU that fails drops out.
  std::vector<PassTimes> times(cfg.vcpus);
  std::atomic<uint64_t> ring_entries{0};
  std::barrier sync(static_cast<std::ptrdiff_t>(cfg.vcpus) + 1);
  auto body = [&](unsigned i) {
    Vcpu& v = *vcpus[i];
    PassTimes& t = times[i];
    sync.arrive_and_wait();  // pass 0 starts
    auto last = Clock::now();
    for (;;) {
      Exit e = v.run();
      auto now = Clock::now();
      ++t.exits[static_cast<size_t>(e.kind)];
      if (e.kind == ExitKind::kIo && e.io.out && e.io.port == kPortPassDone) {
        t.pass_ns.push_back(static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count()));
        const auto pass = static_cast<uint32_t>(t.pass_ns.size() - 1);
        if (cfg.on_pass) cfg.on_pass(i, pass);
        sync.arrive_and_wait();                            // pass ends
        if (pass + 1 < cfg.passes) sync.arrive_and_wait();  // next pass starts
        last = Clock::now();
        continue;
      }
      if (e.kind == ExitKind::kIo && e.io.out && e.io.port == kPortDone) {
        t.done = t.pass_ns.size() == cfg.passes;
        t.last = std::move(e);
        break;
      }
      bool go_on = false;
      switch (e.kind) {
        case ExitKind::kMmio:  // a read-only or absent slot: writes dropped, reads see zeros
          if (!e.mmio.is_write) {
            std::array<uint8_t, 8> zero{};
            v.complete_mmio_read(zero);
          }
          go_on = true;
          break;
        case ExitKind::kIntr:
          go_on = true;
          break;
        case ExitKind::kDirtyRingFull:
          ring_entries += v.harvest_dirty_ring([](uint32_t, uint64_t) {});
          go_on = vm.reset_dirty_rings().ok();
          break;
        default:
          break;
      }
      t.last = std::move(e);
      if (!go_on) break;
    }
    if (auto regs = v.get_regs()) t.checksum = regs->rbx;
    if (!t.done) sync.arrive_and_drop();  // the coordinator's remaining phases go on without it
  };

  RunStats st;
  // Dirty-log harvest of every slot (or ring) between passes; 0 or an error.
  auto harvest = [&]() -> Result<void> {
    ++st.dirty_harvests;
    switch (cfg.dirty) {
      case DirtyMode::kNone: break;
      case DirtyMode::kBitmap:
      case DirtyMode::kManualProtect:
        for (const auto& s : slots) {
          uint64_t pages = s.size / kPageSize;
          std::vector<uint64_t> bm((pages + 63) / 64);
          if (int e = vm.get_dirty_log(s.id, bm)) {
            return make_error(e, "KVM_GET_DIRTY_LOG slot ", s.id, ": ", errno_name(e));
          }
          for (uint64_t w : bm) st.dirty_pages_harvested += static_cast<uint64_t>(std::popcount(w));
          if (cfg.dirty == DirtyMode::kManualProtect) {
            if (int e = vm.clear_dirty_log(s.id, 0, static_cast<uint32_t>(pages), bm)) {
              return make_error(e, "KVM_CLEAR_DIRTY_LOG slot ", s.id, ": ", errno_name(e));
            }
          }
        }
        break;
      case DirtyMode::kRing:
        for (auto& v : vcpus) ring_entries += v->harvest_dirty_ring([](uint32_t, uint64_t) {});
        if (auto r = vm.reset_dirty_rings(); !r) return r.error();
        break;
    }
    return {};
  };

  std::vector<std::thread> threads;
  for (unsigned i = 0; i < cfg.vcpus; ++i) threads.emplace_back(body, i);
  Result<void> coord_error;
  for (uint32_t pass = 0; pass < cfg.passes; ++pass) {
    auto p0 = Clock::now();
    sync.arrive_and_wait();  // start
    sync.arrive_and_wait();  // end
    const double s = std::chrono::duration<double>(Clock::now() - p0).count();
    (pass == 0 ? st.first_touch_seconds : st.after_seconds) += s;
    if (!coord_error || !staged) continue;
    if (pass == 0) {
      for (const auto& sl : slots) {
        UserspaceMemoryRegion r{sl.id, sl.flags | kMemLogDirtyPages, sl.gpa.value, sl.size,
                                reinterpret_cast<uint64_t>(sl.hva)};
        if (int e = vm.set_user_memory_region(r)) {
          coord_error = make_error(e, "enabling dirty logging on slot ", sl.id, ": ",
                                   errno_name(e));
          break;
        }
      }
    } else if (auto r = harvest(); !r) {
      coord_error = r.error();
    }
  }
  for (auto& t : threads) t.join();

  for (unsigned i = 0; i < cfg.vcpus; ++i) {
    const PassTimes& t = times[i];
    if (!t.done) {
      return make_error(t.last.run_errno ? t.last.run_errno : EIO, "vCPU ", i,
                        " stopped: ", to_string(t.last));
    }
  }
  if (!coord_error) return coord_error.error();
  double first = 0, re = 0;
  for (unsigned i = 0; i < cfg.vcpus; ++i) {
    const PassTimes& t = times[i];
    for (size_t k = 0; k < kExitKindCount; ++k) st.exits[k] += t.exits[k];
    st.checksums.push_back(t.checksum);
    first += t.pass_ns.empty() ? 0 : static_cast<double>(t.pass_ns[0]) / npages;
    uint64_t later = 0;
    for (size_t p = 1; p < t.pass_ns.size(); ++p) later += t.pass_ns[p];
    if (t.pass_ns.size() > 1) re += static_cast<double>(later) / (npages * (t.pass_ns.size() - 1));
  }
  st.pages = npages * cfg.vcpus;
  st.pages_faulted = cfg.overlap ? npages : st.pages;  // distinct pages first touched
  st.first_touch_ns_per_page = first / cfg.vcpus;
  st.retouch_ns_per_page = re / cfg.vcpus;
  if (cfg.passes > 1 && st.after_seconds > 0) {
    st.accesses_per_sec_after =
        static_cast<double>(st.pages * (cfg.passes - 1)) / st.after_seconds;
  }
  st.io_exits = st.exits[static_cast<size_t>(ExitKind::kIo)];

  // What the run dirtied and no harvest between passes collected.
  if (cfg.dirty != DirtyMode::kNone && !staged) {
    if (auto r = harvest(); !r) return r.error();
  }
  if (cfg.dirty == DirtyMode::kRing) st.dirty_pages_harvested = ring_entries.load();
  st.wall_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return st;
}

}  // namespace gfnmap::kvm
