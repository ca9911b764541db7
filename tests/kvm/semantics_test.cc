// kvm suite, guest-visible semantics: the same guest access pattern runs on a real KVM guest and
// on gfnmap's Mmu/Vcpu over LinuxHost (same slot layout, the very same backing memory), and what
// the guest (or its VMM) can observe must agree: MMIO exits, data read, dirty logs, EFAULT.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/kvm.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "kvm/kvm_test_util.h"

namespace gfnmap::test {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;
// Data slots live at 1 GiB and above; the guest's system slot (id 0) sits at gpa 0 and the
// guest identity-maps [0, 2 GiB), so every gpa used below is reachable by the guest.
constexpr uint64_t kDataGpa = kGiB;
constexpr uint64_t kIdentityTop = 2 * kGiB;
// Bound on exits of one real run, so a guest that misbehaves ends the test instead of hanging.
constexpr uint64_t kMaxExits = 100000;

// What the VMM sees of one guest access that did not simply complete.
struct Event {
  enum class Kind { kMmioRead, kMmioWrite, kMemoryFault, kOther };
  Kind kind = Kind::kOther;
  uint64_t gpa = 0;
  uint32_t len = 0;
  uint64_t data = 0;  // write data (kMmioWrite)
  int error = 0;      // kMemoryFault: errno of KVM_RUN / VcpuExit::error
  std::string what;   // kOther: the exit rendered, for the failure message
  friend bool operator==(const Event& a, const Event& b) {
    return a.kind == b.kind && a.gpa == b.gpa && a.len == b.len && a.data == b.data &&
           a.error == b.error;
  }
};

std::string to_string(const Event& e) {
  char buf[160];
  const char* k = e.kind == Event::Kind::kMmioRead    ? "mmio-read"
                  : e.kind == Event::Kind::kMmioWrite ? "mmio-write"
                  : e.kind == Event::Kind::kMemoryFault ? "memory-fault"
                                                        : "other";
  std::snprintf(buf, sizeof buf, "%s gpa=0x%llx len=%u data=0x%llx err=%d", k,
                static_cast<unsigned long long>(e.gpa), e.len,
                static_cast<unsigned long long>(e.data), e.error);
  return std::string(buf) + (e.what.empty() ? "" : " " + e.what);
}

std::string to_string(const std::vector<Event>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 8; ++i) s += "\n  " + to_string(v[i]);
  if (v.size() > 8) s += "\n  ... (" + std::to_string(v.size()) + " events)";
  return s.empty() ? "(none)" : s;
}

// The outcome of one workload run.
struct Outcome {
  std::vector<Event> events;
  uint64_t checksum = 0;  // XOR of every word the guest read (memory or MMIO completion)
  bool done = false;      // the workload ran to its end
  kvm::Exit last_real;    // real side: the exit that stopped the run
};

// The value the VMM hands back for an MMIO read of gpa (both sides use it).
constexpr uint64_t mmio_read_value(uint64_t gpa) { return gpa ^ 0x5a5a000000000000ULL; }

// The word the host writes at offset 0 of the page at gpa before a run.
constexpr uint64_t fill_value(uint64_t gpa) { return gpa ^ 0xc3c3000000000000ULL; }

enum class DirtyMode { kNone, kBitmap, kManual, kManualInitiallySet, kRing };

// A real VM with the built-in guest and gfnmap's MMU, given the same memslots. Every data slot
// is one LinuxHost region registered in both, so both sides see the same bytes and an mprotect
// of the backing reaches both (the kernel's notifier and LinuxHost's).
class SideBySide {
 public:
  static constexpr uint32_t kRingBytes = 64 * 1024;

  // Returns an empty string on success, else why the setup failed.
  std::string init(DirtyMode dirty) {
    dirty_mode_ = dirty;
    auto sys = kvm::System::open();
    if (!sys) return "System::open: " + error_to_string(sys.error());
    sys_ = std::make_unique<kvm::System>(std::move(*sys));
    kvm::VmOptions vo;
    vo.manual_dirty_log_protect = dirty == DirtyMode::kManual ||
                                  dirty == DirtyMode::kManualInitiallySet;
    vo.dirty_log_initially_set = dirty == DirtyMode::kManualInitiallySet;
    vo.dirty_ring_bytes = dirty == DirtyMode::kRing ? kRingBytes : 0;
    auto vm = kvm::Vm::create(*sys_, vo);
    if (!vm) return "Vm::create: " + error_to_string(vm.error());
    vm_ = std::move(*vm);
    kvm::GuestLayoutOptions lo;
    lo.slot_id = 0;
    lo.gpa = Gpa(0);
    lo.identity_top = kIdentityTop;
    auto guest = kvm::Guest::create(*vm_, lo);
    if (!guest) return "Guest::create: " + error_to_string(guest.error());
    guest_ = std::move(*guest);
    auto kv = vm_->create_vcpu(0);
    if (!kv) return "create_vcpu: " + error_to_string(kv.error());
    kvcpu_ = std::move(*kv);

    auto host = LinuxHost::create();
    if (!host) return "LinuxHost::create: " + error_to_string(host.error());
    host_ = std::move(*host);
    slots_ = std::make_unique<Memslots>(sys_->memslots_config());
    dirty_ = std::make_unique<DirtyLog>(*slots_);
    if (vo.manual_dirty_log_protect) {
      uint64_t f = kDirtyLogManualProtectEnable;
      if (vo.dirty_log_initially_set) f |= kDirtyLogInitiallySet;
      if (auto r = dirty_->enable_manual_dirty_log_protect(f); !r) {
        return "enable_manual_dirty_log_protect: " + error_to_string(r.error());
      }
    }
    if (vo.dirty_ring_bytes) {
      if (auto r = dirty_->enable_dirty_ring(vo.dirty_ring_bytes); !r) {
        return "enable_dirty_ring: " + error_to_string(r.error());
      }
    }
    MmuOptions mo;
    mo.dirty = dirty_.get();
    mmu_ = std::make_unique<Mmu>(*slots_, *host_, mo);
    vcpu_ = std::make_unique<gfnmap::Vcpu>(*mmu_, 0);
    // gfnmap mirrors the system slot too (its own 2 MiB, never touched): same layout.
    return add_slot(0, 0, kvm::Guest::kSystemSize, 0, RegionKind::kAnonymous, /*kvm=*/false);
  }

  ~SideBySide() {
    vcpu_.reset();
    mmu_.reset();
    dirty_.reset();
    slots_.reset();
    if (host_) {
      for (const auto& r : host_->regions()) (void)host_->unregister_region(r.start);
    }
    kvcpu_.reset();
    guest_.reset();
    vm_.reset();
  }

  // Creates a region of `kind` and registers it as slot `id` in gfnmap and (kvm) in the VM.
  // Both must accept it. Empty string on success.
  std::string add_slot(uint16_t id, uint64_t gpa, uint64_t size, uint32_t flags,
                       RegionKind kind, bool kvm = true) {
    RegionSpec spec;
    spec.kind = kind;
    spec.size = size;
    auto r = host_->create_region(spec);
    if (!r) return "create_region: " + error_to_string(r.error());
    UserspaceMemoryRegion region;
    region.slot = id;
    region.flags = flags;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = r->start.value;
    if (kvm) {
      if (int e = vm_->set_user_memory_region(region)) {
        return "KVM_SET_USER_MEMORY_REGION: " + std::string(errno_name(e));
      }
    }
    auto g = slots_->set_memory_region(region);
    if (!g) return "gfnmap set_memory_region: " + error_to_string(g.error());
    hva_[id] = r->start;
    return {};
  }

  // Host pointer of the backing byte for gpa in slot id (slot starts at slot_gpa).
  uint64_t* word(uint16_t id, uint64_t slot_gpa, uint64_t gpa) {
    return reinterpret_cast<uint64_t*>(hva_.at(id).value + (gpa - slot_gpa));
  }
  Hva hva(uint16_t id) const { return hva_.at(id); }

  // The real guest: runs w; MMIO reads are completed with mmio_read_value; any exit other than
  // MMIO ends the run. Exits are recorded in order.
  Outcome run_real(const kvm::GuestWorkload& w) {
    Outcome o;
    auto st = guest_->setup_vcpu(*kvcpu_, w);
    if (!st) {
      o.events.push_back({Event::Kind::kOther, 0, 0, 0, 0, "setup_vcpu: " +
                                                              error_to_string(st.error())});
      return o;
    }
    uint64_t mmio_reads_xor = 0;
    uint64_t n = 0;
    kvm::PassTimes t = kvm::run_workload(*kvcpu_, [&](const kvm::Exit& e) {
      Event ev;
      if (e.kind == kvm::ExitKind::kMmio) {
        ev.kind = e.mmio.is_write ? Event::Kind::kMmioWrite : Event::Kind::kMmioRead;
        ev.gpa = e.mmio.gpa.value;
        ev.len = e.mmio.len;
        if (e.mmio.is_write) {
          std::memcpy(&ev.data, e.mmio.data.data(), e.mmio.len <= 8 ? e.mmio.len : 8);
        } else {
          uint64_t v = mmio_read_value(ev.gpa);
          kvcpu_->complete_mmio_read({reinterpret_cast<const uint8_t*>(&v), 8});
        }
        o.events.push_back(ev);
        return ++n < kMaxExits;
      }
      if (e.kind == kvm::ExitKind::kMemoryFault ||
          (e.kind == kvm::ExitKind::kRunError && e.run_errno == EFAULT)) {
        ev.kind = Event::Kind::kMemoryFault;
        // Without KVM_EXIT_MEMORY_FAULT the kernel gives no gpa: ~0 marks "not reported".
        ev.gpa = e.kind == kvm::ExitKind::kMemoryFault ? e.memory_fault.gpa.value : ~uint64_t{0};
        ev.error = e.run_errno;
      } else {
        ev.what = kvm::to_string(e);
      }
      o.events.push_back(ev);
      return false;
    });
    o.done = t.done;
    o.checksum = t.checksum;
    o.last_real = t.last;
    (void)mmio_reads_xor;
    return o;
  }

  // gfnmap: the same access sequence (for_each_guest_access) through gfnmap's Vcpu. An MMIO
  // exit is completed like the real side's and the sequence goes on; any other exit stops it
  // (a real vCPU would re-execute the faulting instruction forever).
  Outcome run_engine(const kvm::GuestWorkload& w) {
    Outcome o;
    bool stopped = false;
    kvm::for_each_guest_access(w, [&](uint32_t pass, uint64_t page, bool write) {
      if (stopped) return;
      const Gpa gpa = w.slice + page * kPageSize;
      VcpuExit ex;
      uint64_t v = 0;
      if (write) {
        ex = vcpu_->write_u64(gpa, kvm::guest_write_value(gpa, pass));
      } else {
        ex = vcpu_->read_u64(gpa, &v);
      }
      if (ex.ok()) {
        if (!write) o.checksum ^= v;
        return;
      }
      Event ev;
      ev.gpa = ex.gpa.value;
      if (ex.reason == ExitReason::kMmio) {
        ev.kind = ex.mmio.is_write ? Event::Kind::kMmioWrite : Event::Kind::kMmioRead;
        ev.len = ex.mmio.len;
        if (ex.mmio.is_write) {
          std::memcpy(&ev.data, ex.mmio.data.data(), ex.mmio.len <= 8 ? ex.mmio.len : 8);
        } else {
          o.checksum ^= mmio_read_value(ev.gpa);
        }
        o.events.push_back(ev);
        return;
      }
      if (ex.reason == ExitReason::kMemoryFault) {
        ev.kind = Event::Kind::kMemoryFault;
        ev.error = ex.error;
      } else {
        ev.what = std::string(to_string(ex.reason));
      }
      o.events.push_back(ev);
      stopped = true;
    });
    o.done = !stopped;
    return o;
  }

  kvm::Vm& vm() { return *vm_; }
  kvm::Vcpu& kvm_vcpu() { return *kvcpu_; }
  LinuxHost& host() { return *host_; }
  DirtyLog& dirty() { return *dirty_; }
  Mmu& mmu() { return *mmu_; }
  gfnmap::Vcpu& vcpu() { return *vcpu_; }

 private:
  DirtyMode dirty_mode_ = DirtyMode::kNone;
  std::unique_ptr<kvm::System> sys_;
  std::unique_ptr<kvm::Vm> vm_;
  std::unique_ptr<kvm::Guest> guest_;
  std::unique_ptr<kvm::Vcpu> kvcpu_;
  std::unique_ptr<LinuxHost> host_;
  std::unique_ptr<Memslots> slots_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  std::unique_ptr<gfnmap::Vcpu> vcpu_;
  std::map<uint16_t, Hva> hva_;
};

#define SEMANTICS_SETUP(pair, mode)                              \
  GFNMAP_REQUIRE_KVM();                                          \
  SideBySide pair;                                               \
  if (std::string why_ = pair.init(mode); !why_.empty()) {       \
    GTEST_SKIP() << "side-by-side setup: " << why_;              \
  }

#define ADD_SLOT(pair, ...)                                      \
  do {                                                           \
    std::string why_ = pair.add_slot(__VA_ARGS__);               \
    ASSERT_TRUE(why_.empty()) << why_;                           \
  } while (0)

// The backing kinds both sides can share: the guest-visible outcome must not depend on it.
class Semantics : public ::testing::TestWithParam<RegionKind> {};

std::string kind_name(const ::testing::TestParamInfo<RegionKind>& info) {
  switch (info.param) {
    case RegionKind::kAnonymous: return "Anonymous";
    case RegionKind::kThp: return "Thp";
    case RegionKind::kMemfdShared: return "MemfdShared";
    default: return "Other";
  }
}

// What a guest access to a gpa meets: RAM (read/write), ROM (a READONLY slot: reads hit the
// backing, writes exit as MMIO) or MMIO (no slot).
enum class GpaKind { kRam, kRom, kMmio };

// The host-side model of a workload: the events the VMM must see and the guest's checksum, given
// what each gpa is and the word each page holds at offset 0 before the run.
struct Prediction {
  std::vector<Event> events;
  uint64_t checksum = 0;
};
template <class Classify, class Initial>
Prediction predict(const kvm::GuestWorkload& w, Classify classify, Initial initial) {
  Prediction pr;
  std::map<uint64_t, uint64_t> ram;  // words written to RAM so far
  kvm::for_each_guest_access(w, [&](uint32_t pass, uint64_t page, bool write) {
    const uint64_t gpa = w.slice.value + page * kPageSize;
    const GpaKind k = classify(gpa);
    if (write) {
      const uint64_t v = kvm::guest_write_value(Gpa(gpa), pass);
      if (k == GpaKind::kRam) {
        ram[gpa] = v;
      } else {
        pr.events.push_back({Event::Kind::kMmioWrite, gpa, 8, v, 0, {}});
      }
      return;
    }
    if (k == GpaKind::kMmio) {
      pr.events.push_back({Event::Kind::kMmioRead, gpa, 8, 0, 0, {}});
      pr.checksum ^= mmio_read_value(gpa);
    } else {
      auto it = ram.find(gpa);
      pr.checksum ^= it != ram.end() ? it->second : initial(gpa);
    }
  });
  return pr;
}

// Writes fill_value (or zero) at offset 0 of every page of [gpa, gpa + size) of slot id.
void fill(SideBySide& p, uint16_t id, uint64_t slot_gpa, uint64_t gpa, uint64_t size,
          bool zero = false) {
  for (uint64_t off = 0; off < size; off += kPageSize) {
    *p.word(id, slot_gpa, gpa + off) = zero ? 0 : fill_value(gpa + off);
  }
}

// ---------------------------------------------------------------------------------------------
// 1. READONLY slots: writes exit as MMIO with the gpa and the data (spec row 3, 7.4), reads
// return the backing's data.

// Runs w on both sides from the same memory state (reset() before each) and checks both
// against the prediction.
template <class Reset>
void expect_same_outcome(SideBySide& p, const kvm::GuestWorkload& w, const Prediction& want,
                         Reset reset) {
  reset();
  Outcome real = p.run_real(w);
  reset();
  Outcome engine = p.run_engine(w);
  EXPECT_TRUE(real.done) << "real run stopped:" << to_string(real.events);
  EXPECT_TRUE(engine.done) << "gfnmap run stopped:" << to_string(engine.events);
  EXPECT_EQ(real.events, want.events) << "real:" << to_string(real.events) << "\nwant:"
                                      << to_string(want.events);
  EXPECT_EQ(engine.events, want.events) << "gfnmap:" << to_string(engine.events) << "\nwant:"
                                        << to_string(want.events);
  EXPECT_EQ(real.checksum, want.checksum);
  EXPECT_EQ(engine.checksum, want.checksum);
}

TEST_P(Semantics, ReadOnlySlotWriteExitsMmioWithSameGpa) {
  SEMANTICS_SETUP(p, DirtyMode::kNone);
  constexpr uint64_t kSize = 2 * kMiB;
  ADD_SLOT(p, 1, kDataGpa, kSize, kMemReadonly, GetParam());
  kvm::GuestWorkload w;
  w.slice = Gpa(kDataGpa + 5 * kPageSize);
  w.npages = 24;
  w.passes = 2;
  w.write_percent = 100;
  w.random = true;
  w.seed = 3;
  Prediction want = predict(w, [](uint64_t) { return GpaKind::kRom; }, fill_value);
  ASSERT_EQ(want.events.size(), 48u);
  expect_same_outcome(p, w, want, [&] { fill(p, 1, kDataGpa, kDataGpa, kSize); });
  // Neither side wrote the read-only backing.
  for (uint64_t off = 0; off < kSize; off += kPageSize) {
    ASSERT_EQ(*p.word(1, kDataGpa, kDataGpa + off), fill_value(kDataGpa + off)) << off;
  }
}

TEST_P(Semantics, ReadOnlySlotReadReturnsBackingData) {
  SEMANTICS_SETUP(p, DirtyMode::kNone);
  constexpr uint64_t kSize = 2 * kMiB;
  ADD_SLOT(p, 1, kDataGpa, kSize, kMemReadonly, GetParam());
  kvm::GuestWorkload w;
  w.slice = Gpa(kDataGpa);
  w.npages = kSize / kPageSize;
  w.passes = 2;
  w.write_percent = 0;
  Prediction want = predict(w, [](uint64_t) { return GpaKind::kRom; }, fill_value);
  ASSERT_TRUE(want.events.empty());
  expect_same_outcome(p, w, want, [&] { fill(p, 1, kDataGpa, kDataGpa, kSize); });
  // Reads and writes mixed: reads still see the backing, writes are MMIO.
  w.write_percent = 50;
  w.random = true;
  w.seed = 21;
  want = predict(w, [](uint64_t) { return GpaKind::kRom; }, fill_value);
  expect_same_outcome(p, w, want, [&] { fill(p, 1, kDataGpa, kDataGpa, kSize); });
  // gfnmap reads any word of a page as the backing holds it (not only offset 0).
  *p.word(1, kDataGpa, kDataGpa + 7 * kPageSize + 4088) = 0x1122334455667788ULL;
  uint64_t v = 0;
  ASSERT_TRUE(p.vcpu().read_u64(Gpa(kDataGpa + 7 * kPageSize + 4088), &v).ok());
  EXPECT_EQ(v, 0x1122334455667788ULL);
}

// A READONLY slot over a PROT_READ mapping: a write is still MMIO (RO_FAULT is decided from the
// slot before the host mapping is looked at: spec 3.1 step 2), never EFAULT; reads work.
TEST_P(Semantics, ReadOnlySlotOverProtReadMappingWriteStillExitsMmio) {
  SEMANTICS_SETUP(p, DirtyMode::kNone);
  constexpr uint64_t kSize = 2 * kMiB;
  ADD_SLOT(p, 1, kDataGpa, kSize, kMemReadonly, GetParam());
  fill(p, 1, kDataGpa, kDataGpa, kSize);
  ASSERT_TRUE(p.host().protect(p.hva(1), kSize, PROT_READ).ok());
  kvm::GuestWorkload w;
  w.slice = Gpa(kDataGpa);
  w.npages = 16;
  w.passes = 1;
  w.write_percent = 50;
  w.random = true;
  w.seed = 11;
  Prediction want = predict(w, [](uint64_t) { return GpaKind::kRom; }, fill_value);
  ASSERT_FALSE(want.events.empty());
  expect_same_outcome(p, w, want, [] {});
}

// ---------------------------------------------------------------------------------------------
// 2. No slot: reads and writes exit as MMIO with the gpa (spec row 1); the VMM's read data
// reaches the guest on both sides.

TEST_P(Semantics, NoSlotReadAndWriteExitMmioWithSameGpa) {
  SEMANTICS_SETUP(p, DirtyMode::kNone);
  // Two slots with a 1 MiB hole between them; the workload covers the last pages of the first
  // slot, the hole, and the first pages of the second, so both edges are crossed.
  ADD_SLOT(p, 1, kDataGpa, 1 * kMiB, 0, GetParam());
  ADD_SLOT(p, 2, kDataGpa + 2 * kMiB, 2 * kMiB, 0, GetParam());
  kvm::GuestWorkload w;
  w.slice = Gpa(kDataGpa + kMiB - 4 * kPageSize);
  w.npages = 256 + 8;
  w.passes = 2;
  w.write_percent = 50;
  w.random = true;
  w.seed = 5;
  auto classify = [](uint64_t gpa) {
    return gpa >= kDataGpa + kMiB && gpa < kDataGpa + 2 * kMiB ? GpaKind::kMmio : GpaKind::kRam;
  };
  Prediction want = predict(w, classify, [](uint64_t) { return uint64_t{0}; });
  ASSERT_GT(want.events.size(), 256u);
  expect_same_outcome(p, w, want, [&] {
    fill(p, 1, kDataGpa, kDataGpa, kMiB, /*zero=*/true);
    fill(p, 2, kDataGpa + 2 * kMiB, kDataGpa + 2 * kMiB, 2 * kMiB, /*zero=*/true);
  });
}

// Beyond the last slot's end page (and far above every slot): still MMIO, not a failure.
TEST_P(Semantics, NoSlotBeyondLastSlotExitsMmio) {
  SEMANTICS_SETUP(p, DirtyMode::kNone);
  ADD_SLOT(p, 1, kDataGpa, 64 * kPageSize, 0, GetParam());
  kvm::GuestWorkload w;
  w.slice = Gpa(kDataGpa + 62 * kPageSize);
  w.npages = 6;
  w.passes = 2;
  w.write_percent = 50;
  w.seed = 2;
  auto classify = [](uint64_t gpa) {
    return gpa < kDataGpa + 64 * kPageSize ? GpaKind::kRam : GpaKind::kMmio;
  };
  Prediction want = predict(w, classify, [](uint64_t) { return uint64_t{0}; });
  expect_same_outcome(p, w, want, [&] { fill(p, 1, kDataGpa, kDataGpa, 64 * kPageSize, true); });
  // Far above: the last 2 MiB below the identity map's top.
  w.slice = Gpa(kIdentityTop - 4 * kPageSize);
  w.npages = 4;
  want = predict(w, [](uint64_t) { return GpaKind::kMmio; }, [](uint64_t) { return uint64_t{0}; });
  expect_same_outcome(p, w, want, [] {});
}

INSTANTIATE_TEST_SUITE_P(Backing, Semantics,
                         ::testing::Values(RegionKind::kAnonymous, RegionKind::kMemfdShared,
                                           RegionKind::kThp),
                         kind_name);

}  // namespace
}  // namespace gfnmap::test
