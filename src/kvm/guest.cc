// gfnmap kvm: the built-in CPL3 long-mode guest: system slot (page tables, GDT, TSS, code),
// vCPU state, the host-side model of its access sequence and the pass-reporting run loop.
#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "gfnmap/kvm.h"
#include "guest_code.h"

namespace gfnmap::kvm {

namespace {

// Offsets inside the 2 MiB system slot.
constexpr uint64_t kGdtOff = 0x0000;
constexpr uint64_t kTssOff = 0x1000;
constexpr uint64_t kCodeOff = 0x2000;
constexpr uint64_t kPml4Off = 0x3000;
constexpr uint64_t kPdptOff = 0x4000;
constexpr uint64_t kPdOff = 0x5000;  // one page directory per GiB of identity map
constexpr uint64_t kMaxIdentityGiB = (Guest::kSystemSize - kPdOff) / kPageSize;
static_assert(kCodeOff + detail::kGuestCodeSize <= kPml4Off);

constexpr uint64_t kPteP = 1, kPteRw = 2, kPteUs = 4, kPtePs = 0x80;
constexpr uint64_t k1G = 1ull << 30, k2M = 2ull << 20;

// Selectors: GDT[1] kernel code, [2] kernel data, [3] user data, [4] user code, [5..6] TSS.
constexpr uint16_t kSelUserData = (3 << 3) | 3;
constexpr uint16_t kSelUserCode = (4 << 3) | 3;
constexpr uint16_t kSelTss = 5 << 3;

// The TSS carries an I/O permission bitmap (all zero: every port allowed) for ports
// [0, kIoBitmapPorts). PVM enters the guest with hardware IOPL 0 and keeps the hardware RFLAGS
// after every exit, so RFLAGS.IOPL = 3 does not survive the first exit: `out` then faults and
// KVM's emulator checks this bitmap before turning it into KVM_EXIT_IO.
constexpr uint64_t kTssIomapBase = 104;
constexpr uint64_t kIoBitmapPorts = 1024;
constexpr uint64_t kTssLimit = kTssIomapBase + kIoBitmapPorts / 8;  // + 1 terminator byte - 1
static_assert(kPortDone < kIoBitmapPorts);

constexpr uint64_t kCr0Pe = 1, kCr0Mp = 2, kCr0Et = 0x10, kCr0Ne = 0x20, kCr0Wp = 1ull << 16,
                   kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pae = 1ull << 5;
constexpr uint64_t kEferLme = 1ull << 8, kEferLma = 1ull << 10;
constexpr uint64_t kRflagsFixed = 2, kRflagsIopl3 = 3ull << 12;

// A flat code/data segment descriptor.
constexpr uint64_t gdt_entry(uint64_t type, uint64_t dpl, bool code64) {
  uint64_t d = 0xffff;                 // limit 15:0
  d |= type << 40;                     // type (with S = 1 below)
  d |= uint64_t{1} << 44;              // S: code/data
  d |= dpl << 45;                      // DPL
  d |= uint64_t{1} << 47;              // P
  d |= uint64_t{0xf} << 48;            // limit 19:16
  d |= uint64_t{code64 ? 1u : 0u} << 53;  // L
  d |= uint64_t{code64 ? 0u : 1u} << 54;  // D/B
  d |= uint64_t{1} << 55;              // G
  return d;
}

kvm_segment flat_segment(uint16_t selector, uint8_t type, bool code64) {
  kvm_segment s{};
  s.base = 0;
  s.limit = 0xffffffff;
  s.selector = selector;
  s.type = type;
  s.present = 1;
  s.dpl = 3;
  s.db = code64 ? 0 : 1;
  s.s = 1;
  s.l = code64 ? 1 : 0;
  s.g = 1;
  return s;
}

}  // namespace

void for_each_guest_access(const GuestWorkload& w,
                           FunctionRef<void(uint32_t, uint64_t, bool)> fn) {
  if (w.npages == 0) return;
  uint64_t mask = 1;
  while (mask < w.npages) mask <<= 1;
  --mask;
  uint64_t rw = w.seed;
  auto access = [&](uint32_t pass, uint64_t page) {
    rw = rw * 6364136223846793005ull + 1442695040888963407ull;
    uint64_t t = ((rw >> 32) * 100) >> 32;
    fn(pass, page, t < w.write_percent);
  };
  for (uint32_t pass = 0; pass < w.passes; ++pass) {
    if (!w.random) {
      for (uint64_t p = 0; p < w.npages; ++p) access(pass, p);
      continue;
    }
    uint64_t x = w.seed & mask;
    for (uint64_t i = 0; i <= mask; ++i) {
      x = (x * 5 + 1) & mask;
      if (x < w.npages) access(pass, x);
    }
  }
}

Guest::~Guest() {
  if (mem_) ::munmap(mem_, kSystemSize);
}

Result<std::unique_ptr<Guest>> Guest::create(Vm& vm, const GuestLayoutOptions& options) {
  if (options.gpa.value % k2M) {
    return make_error(EINVAL, "guest system slot gpa 0x", std::to_string(options.gpa.value),
                      " is not 2 MiB aligned");
  }
  uint64_t top = options.identity_top ? options.identity_top : options.gpa.value + kSystemSize;
  top = (top + k1G - 1) / k1G * k1G;
  if (top / k1G > kMaxIdentityGiB) {
    return make_error(EINVAL, "guest identity map of ", top / k1G, " GiB exceeds ",
                      kMaxIdentityGiB, " GiB");
  }
  if (options.gpa.value + kSystemSize > top) {
    return make_error(EINVAL, "guest system slot lies outside the identity map");
  }
  std::unique_ptr<Guest> g(new Guest());
  g->options_ = options;
  g->identity_top_ = top;
  void* p = ::mmap(nullptr, kSystemSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return make_error(errno, "mmap guest system memory");
  g->mem_ = p;
  auto* mem = static_cast<uint8_t*>(p);
  const uint64_t base = options.gpa.value;

  // GDT.
  uint64_t gdt[7] = {};
  gdt[1] = gdt_entry(0xb, 0, true);   // kernel code (unused, for completeness)
  gdt[2] = gdt_entry(0x3, 0, false);  // kernel data
  gdt[3] = gdt_entry(0x3, 3, false);  // user data
  gdt[4] = gdt_entry(0xb, 3, true);   // user code, 64-bit
  const uint64_t tss = base + kTssOff;
  gdt[5] = kTssLimit | ((tss & 0xffffff) << 16) | (uint64_t{0xb} << 40) | (uint64_t{1} << 47) |
           (((tss >> 24) & 0xff) << 56);  // 64-bit busy TSS
  gdt[6] = tss >> 32;
  std::memcpy(mem + kGdtOff, gdt, sizeof gdt);
  // TSS: the I/O bitmap follows the 104-byte TSS; zero bits allow, the terminator is 0xff.
  uint16_t iomap = kTssIomapBase;
  std::memcpy(mem + kTssOff + 102, &iomap, 2);
  mem[kTssOff + kTssIomapBase + kIoBitmapPorts / 8] = 0xff;
  std::memcpy(mem + kCodeOff, detail::kGuestCode, detail::kGuestCodeSize);

  // Identity map [0, top) with 2 MiB user pages.
  auto* pml4 = reinterpret_cast<uint64_t*>(mem + kPml4Off);
  auto* pdpt = reinterpret_cast<uint64_t*>(mem + kPdptOff);
  pml4[0] = (base + kPdptOff) | kPteP | kPteRw | kPteUs;
  for (uint64_t gib = 0; gib < top / k1G; ++gib) {
    uint64_t pd_off = kPdOff + gib * kPageSize;
    pdpt[gib] = (base + pd_off) | kPteP | kPteRw | kPteUs;
    auto* pd = reinterpret_cast<uint64_t*>(mem + pd_off);
    for (uint64_t i = 0; i < 512; ++i) {
      pd[i] = (gib * k1G + i * k2M) | kPteP | kPteRw | kPteUs | kPtePs;
    }
  }

  UserspaceMemoryRegion r;
  r.slot = options.slot_id;
  r.guest_phys_addr = base;
  r.memory_size = kSystemSize;
  r.userspace_addr = reinterpret_cast<uint64_t>(p);
  if (int e = vm.set_user_memory_region(r)) {
    return make_error(e, "guest system slot: KVM_SET_USER_MEMORY_REGION: ", errno_name(e));
  }
  // PVM answers KVM_GET_SUPPORTED_CPUID with EINVAL; the guest then runs with KVM's empty
  // default CPUID, which is enough for long mode set through SREGS with 2 MiB pages.
  if (auto cpuid = vm.system().supported_cpuid()) g->cpuid_ = std::move(*cpuid);
  return g;
}

Result<void> Guest::setup_vcpu(Vcpu& vcpu, const GuestWorkload& w) const {
  if (w.slice.value % kPageSize) return make_error(EINVAL, "guest slice not page aligned");
  if (w.npages == 0) return make_error(EINVAL, "guest slice of 0 pages");
  if (w.write_percent > 100) return make_error(EINVAL, "write percent above 100");
  if (w.slice.value + w.npages * kPageSize > identity_top_) {
    return make_error(EINVAL, "guest slice ends beyond the identity map (",
                      identity_top_ >> 30, " GiB)");
  }
  if (!cpuid_.empty()) {
    if (auto r = vcpu.set_cpuid(cpuid_); !r) return r;
  }
  auto sregs = vcpu.get_sregs();
  if (!sregs) return sregs.error();
  kvm_sregs& s = *sregs;
  const uint64_t base = options_.gpa.value;
  s.cs = flat_segment(kSelUserCode, 0xb, true);
  s.ds = s.es = s.fs = s.gs = s.ss = flat_segment(kSelUserData, 0x3, false);
  s.tr = kvm_segment{};
  s.tr.base = base + kTssOff;
  s.tr.limit = kTssLimit;
  s.tr.selector = kSelTss;
  s.tr.type = 0xb;
  s.tr.present = 1;
  s.ldt = kvm_segment{};
  s.ldt.type = 2;
  s.ldt.unusable = 1;
  s.gdt.base = base + kGdtOff;
  s.gdt.limit = 7 * 8 - 1;
  s.idt.base = 0;
  s.idt.limit = 0;
  s.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Pg;
  s.cr3 = base + kPml4Off;
  s.cr4 = kCr4Pae;
  s.efer = kEferLme | kEferLma;
  if (auto r = vcpu.set_sregs(s); !r) return r;

  kvm_regs regs{};
  regs.rip = base + kCodeOff;
  regs.rflags = kRflagsFixed | kRflagsIopl3;
  regs.rdi = w.slice.value;
  regs.rsi = w.npages;
  regs.rdx = w.passes;
  regs.rcx = w.write_percent;
  regs.r8 = w.random ? 1 : 0;
  regs.r9 = w.seed;
  return vcpu.set_regs(regs);
}

PassTimes run_workload(Vcpu& vcpu, FunctionRef<bool(const Exit&)> on_exit) {
  using Clock = std::chrono::steady_clock;
  PassTimes t;
  auto last = Clock::now();
  for (;;) {
    Exit e = vcpu.run();
    auto now = Clock::now();
    ++t.exits[static_cast<size_t>(e.kind)];
    if (e.kind == ExitKind::kIo && e.io.out && e.io.port == kPortPassDone) {
      t.pass_ns.push_back(static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count()));
      last = Clock::now();
      continue;
    }
    if (e.kind == ExitKind::kIo && e.io.out && e.io.port == kPortDone) {
      t.done = true;
      t.last = std::move(e);
      break;
    }
    bool go_on = on_exit(e);
    t.last = std::move(e);
    if (!go_on) break;
  }
  if (auto regs = vcpu.get_regs()) t.checksum = regs->rbx;
  return t;
}

}  // namespace gfnmap::kvm
