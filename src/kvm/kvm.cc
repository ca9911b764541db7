// gfnmap kvm binding: /dev/kvm, VMs, vCPUs with their mmapped kvm_run, memslot ioctls (raw
// errno), dirty bitmaps, manual protect and the dirty ring, KVM_RUN exit decoding.
#include "gfnmap/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "gfnmap/host_facts.h"

namespace gfnmap::kvm {

// SAFETY/ABI: layouts the kernel expects; the 6.1 headers lack REGION2 and MEMORY_FAULT.
static_assert(sizeof(UserspaceMemoryRegion2) == 160);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd_offset) == 32);
static_assert(sizeof(CreateGuestMemfd) == 64);
static_assert(offsetof(UserspaceMemoryRegion2, guest_memfd) == 40);
static_assert(sizeof(kvm_userspace_memory_region) == 32);
static_assert(sizeof(kvm_dirty_gfn) == 16);
static_assert(KVM_DIRTY_LOG_PAGE_OFFSET == 64);
static_assert(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168);
static_assert(KVM_CAP_DIRTY_LOG_RING == 192);

namespace {

constexpr unsigned long kSetUserMemoryRegion2 = _IOW(KVMIO, 0x49, UserspaceMemoryRegion2);
static_assert(kSetUserMemoryRegion2 == 0x40a0ae49);

// kvm_run.memory_fault sits in the exit union at the same offset as mmio.
struct MemoryFaultExit {
  uint64_t flags;
  uint64_t gpa;
  uint64_t size;
};
static_assert(sizeof(MemoryFaultExit) <= sizeof(kvm_run::mmio) + 8);

template <class Arg>
int ioctl_errno(int fd, unsigned long req, Arg arg) {
  int r;
  do {
    r = ::ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR && req != KVM_RUN);
  return r < 0 ? errno : 0;
}

Error sys_error(int code, std::string_view what) {
  return make_error(code, std::string(what), ": ", std::string(errno_name(code)), " (",
                    std::strerror(code), ")");
}

}  // namespace

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.release();
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

bool kvm_available(std::string* why) {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    // The probed reason (module state, the kernel's words) when the probe agrees.
    const HostFacts& facts = host_facts();
    if (why) *why = facts.kvm_available() ? std::string("/dev/kvm: ") + std::strerror(e)
                                          : facts.kvm_why;
    return false;
  }
  ::close(fd);
  return true;
}

// ---------------------------------------------------------------------------------------------
// System

Result<System> System::open(const char* path) {
  if (path == nullptr) return make_error(EINVAL, "kvm: null device path");
  System sys;
  sys.fd_ = Fd(::open(path, O_RDWR | O_CLOEXEC));
  if (!sys.fd_) return sys_error(errno, std::string("open ") + path);
  int v = ::ioctl(sys.fd(), KVM_GET_API_VERSION, 0);
  if (v < 0) return sys_error(errno, "KVM_GET_API_VERSION");
  if (v != KVM_API_VERSION) {
    return make_error(ENOTSUP, "KVM API version ", v, ", expected ", KVM_API_VERSION);
  }
  sys.api_version_ = v;
  int sz = ::ioctl(sys.fd(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (sz < 0) return sys_error(errno, "KVM_GET_VCPU_MMAP_SIZE");
  sys.vcpu_mmap_size_ = static_cast<size_t>(sz);
  return sys;
}

int System::check_extension(long cap) const {
  int r = ::ioctl(fd(), KVM_CHECK_EXTENSION, cap);
  return r < 0 ? -errno : r;
}

Result<std::vector<kvm_cpuid_entry2>> System::supported_cpuid() const {
  // kvm_cpuid2 ends in a flexible array: allocate header + entries as one buffer.
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
    auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
    c->nent = n;
    int e = ioctl_errno(fd(), KVM_GET_SUPPORTED_CPUID, c);
    if (e == E2BIG) continue;
    if (e) return sys_error(e, "KVM_GET_SUPPORTED_CPUID");
    return std::vector<kvm_cpuid_entry2>(c->entries, c->entries + c->nent);
  }
  return make_error(E2BIG, "KVM_GET_SUPPORTED_CPUID: more than 4096 entries");
}

namespace {

// What only a VM can tell, asked of a scratch VM of the default type:
// - KVM_CAP_GUEST_MEMFD on the VM fd: whether KVM_MEM_GUEST_MEMFD is an allowed flag (6.18
//   accepts it on default x86 VMs, not only on private-memory VM types);
// - the arch's last gfn (x86 kvm_mmu_max_gfn(): 2^(max_gpa_bits - 12) - 1), which no capability
//   reports: probed with one-page slots at the top of each candidate width (one page of metadata
//   each; the slot is deleted again). ~0 when nothing answers.
void probe_vm_limits(int sys_fd, MemslotsConfig& c) {
  Fd vm(::ioctl(sys_fd, KVM_CREATE_VM, 0UL));
  if (!vm) return;
  c.private_mem = ::ioctl(vm.get(), KVM_CHECK_EXTENSION, kCapGuestMemfd) > 0;
  c.check_guest_memfd_file = c.private_mem;
  for (unsigned bits = 57; bits >= 32; --bits) {
    kvm_userspace_memory_region r{};
    r.slot = 0;
    r.guest_phys_addr = (uint64_t{1} << bits) - kPageSize;
    r.memory_size = kPageSize;
    r.userspace_addr = uint64_t{1} << 30;  // access_ok() checks only the range
    if (::ioctl(vm.get(), KVM_SET_USER_MEMORY_REGION, &r) == 0) {
      r.memory_size = 0;
      (void)::ioctl(vm.get(), KVM_SET_USER_MEMORY_REGION, &r);
      c.max_gfn = (uint64_t{1} << (bits - kPageShift)) - 1;
      return;
    }
  }
}

}  // namespace

MemslotsConfig System::memslots_config() const {
  MemslotsConfig c;
  int nr_as = check_extension(KVM_CAP_MULTI_ADDRESS_SPACE);
  c.nr_address_spaces = nr_as > 0 ? static_cast<unsigned>(nr_as) : 1;
  int nr = check_extension(KVM_CAP_NR_MEMSLOTS);
  if (nr > 0) c.nr_user_slots = static_cast<uint32_t>(nr);
  c.readonly_mem = check_extension(KVM_CAP_READONLY_MEM) > 0;
  c.private_mem = false;
  probe_vm_limits(fd(), c);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Exits

std::string_view to_string(ExitKind kind) {
  switch (kind) {
    case ExitKind::kIo: return "IO";
    case ExitKind::kMmio: return "MMIO";
    case ExitKind::kHlt: return "HLT";
    case ExitKind::kShutdown: return "SHUTDOWN";
    case ExitKind::kFailEntry: return "FAIL_ENTRY";
    case ExitKind::kInternalError: return "INTERNAL_ERROR";
    case ExitKind::kIntr: return "INTR";
    case ExitKind::kDirtyRingFull: return "DIRTY_RING_FULL";
    case ExitKind::kMemoryFault: return "MEMORY_FAULT";
    case ExitKind::kRunError: return "RUN_ERROR";
    case ExitKind::kOther: return "OTHER";
  }
  return "?";
}

std::string to_string(const Exit& e) {
  std::string s(to_string(e.kind));
  auto hex = [](uint64_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
    return std::string(b);
  };
  switch (e.kind) {
    case ExitKind::kIo:
      s += std::string(e.io.out ? " out" : " in") + " port " + hex(e.io.port) + " size " +
           std::to_string(e.io.size) + " data " + hex(e.io.data);
      break;
    case ExitKind::kMmio:
      s += std::string(e.mmio.is_write ? " write" : " read") + " gpa " + hex(e.mmio.gpa.value) +
           " len " + std::to_string(e.mmio.len);
      break;
    case ExitKind::kInternalError:
      s += " suberror " + std::to_string(e.internal.suberror);
      for (uint64_t d : e.internal.data) s += " " + hex(d);
      break;
    case ExitKind::kFailEntry:
      s += " reason " + hex(e.fail_entry_reason);
      break;
    case ExitKind::kMemoryFault:
      s += " gpa " + hex(e.memory_fault.gpa.value) + " size " + hex(e.memory_fault.size) +
           " flags " + hex(e.memory_fault.flags);
      break;
    case ExitKind::kOther:
      s += " exit_reason " + std::to_string(e.raw_reason);
      break;
    default:
      break;
  }
  if (e.run_errno) s += " (KVM_RUN errno " + std::string(errno_name(e.run_errno)) + ")";
  return s;
}

// ---------------------------------------------------------------------------------------------
// Vcpu

Vcpu::~Vcpu() {
  if (ring_) ::munmap(ring_, size_t{ring_entries_} * sizeof(kvm_dirty_gfn));
  if (run_) ::munmap(run_, run_size_);
}

Exit Vcpu::run() {
  Exit e;
  int r = ::ioctl(fd(), KVM_RUN, 0);
  int err = r < 0 ? errno : 0;
  e.raw_reason = run_->exit_reason;
  e.run_errno = err;
  if (err) {
    if (run_->exit_reason == kExitMemoryFault) {
      // SAFETY: the exit union starts at the same offset for every member.
      MemoryFaultExit mf;
      std::memcpy(&mf, &run_->mmio, sizeof mf);
      e.kind = ExitKind::kMemoryFault;
      e.memory_fault = {mf.flags, Gpa(mf.gpa), mf.size};
    } else if (err == EINTR) {
      e.kind = ExitKind::kIntr;
    } else {
      e.kind = ExitKind::kRunError;
    }
    return e;
  }
  switch (run_->exit_reason) {
    case KVM_EXIT_IO: {
      e.kind = ExitKind::kIo;
      e.io.out = run_->io.direction == KVM_EXIT_IO_OUT;
      e.io.size = run_->io.size;
      e.io.port = run_->io.port;
      e.io.count = run_->io.count;
      if (e.io.out && e.io.size <= 4) {
        const auto* p = reinterpret_cast<const uint8_t*>(run_) + run_->io.data_offset;
        std::memcpy(&e.io.data, p, e.io.size);
      }
      break;
    }
    case KVM_EXIT_MMIO:
      e.kind = ExitKind::kMmio;
      e.mmio.gpa = Gpa(run_->mmio.phys_addr);
      e.mmio.len = run_->mmio.len;
      e.mmio.is_write = run_->mmio.is_write != 0;
      std::memcpy(e.mmio.data.data(), run_->mmio.data, 8);
      break;
    case KVM_EXIT_HLT: e.kind = ExitKind::kHlt; break;
    case KVM_EXIT_SHUTDOWN: e.kind = ExitKind::kShutdown; break;
    case KVM_EXIT_FAIL_ENTRY:
      e.kind = ExitKind::kFailEntry;
      e.fail_entry_reason = run_->fail_entry.hardware_entry_failure_reason;
      break;
    case KVM_EXIT_INTERNAL_ERROR: {
      e.kind = ExitKind::kInternalError;
      e.internal.suberror = run_->internal.suberror;
      uint32_t n = run_->internal.ndata;
      if (n > 16) n = 16;
      e.internal.data.assign(run_->internal.data, run_->internal.data + n);
      break;
    }
    case KVM_EXIT_INTR: e.kind = ExitKind::kIntr; break;
    case KVM_EXIT_DIRTY_RING_FULL: e.kind = ExitKind::kDirtyRingFull; break;
    default: e.kind = ExitKind::kOther; break;
  }
  return e;
}

void Vcpu::complete_mmio_read(std::span<const uint8_t> data) {
  size_t n = data.size() < 8 ? data.size() : 8;
  std::memcpy(run_->mmio.data, data.data(), n);
}

Result<kvm_regs> Vcpu::get_regs() const {
  kvm_regs r{};
  if (int e = ioctl_errno(fd(), KVM_GET_REGS, &r)) return sys_error(e, "KVM_GET_REGS");
  return r;
}
Result<void> Vcpu::set_regs(const kvm_regs& regs) {
  if (int e = ioctl_errno(fd(), KVM_SET_REGS, &regs)) return sys_error(e, "KVM_SET_REGS");
  return {};
}
Result<kvm_sregs> Vcpu::get_sregs() const {
  kvm_sregs s{};
  if (int e = ioctl_errno(fd(), KVM_GET_SREGS, &s)) return sys_error(e, "KVM_GET_SREGS");
  return s;
}
Result<void> Vcpu::set_sregs(const kvm_sregs& sregs) {
  if (int e = ioctl_errno(fd(), KVM_SET_SREGS, &sregs)) return sys_error(e, "KVM_SET_SREGS");
  return {};
}
Result<void> Vcpu::set_cpuid(std::span<const kvm_cpuid_entry2> entries) {
  std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2));
  auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
  c->nent = static_cast<uint32_t>(entries.size());
  std::memcpy(c->entries, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
  if (int e = ioctl_errno(fd(), KVM_SET_CPUID2, c)) return sys_error(e, "KVM_SET_CPUID2");
  return {};
}
Result<void> Vcpu::set_mp_state(uint32_t mp_state) {
  kvm_mp_state s{mp_state};
  if (int e = ioctl_errno(fd(), KVM_SET_MP_STATE, &s)) return sys_error(e, "KVM_SET_MP_STATE");
  return {};
}

size_t Vcpu::harvest_dirty_ring(FunctionRef<void(uint32_t, uint64_t)> fn) {
  if (!ring_) return 0;
  size_t n = 0;
  for (;;) {
    kvm_dirty_gfn& g = ring_[ring_next_ % ring_entries_];
    // The kernel fills slot/offset, then publishes with a release store of flags.
    uint32_t flags = std::atomic_ref<uint32_t>(g.flags).load(std::memory_order_acquire);
    if (!(flags & KVM_DIRTY_GFN_F_DIRTY)) break;
    fn(g.slot, g.offset);
    std::atomic_ref<uint32_t>(g.flags).store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
    ++ring_next_;
    ++n;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Vm

Vm::~Vm() = default;

Result<std::unique_ptr<Vm>> Vm::create(const System& sys, const VmOptions& options) {
  std::unique_ptr<Vm> vm(new Vm());
  vm->sys_ = &sys;
  vm->options_ = options;
  int fd;
  do {
    fd = ::ioctl(sys.fd(), KVM_CREATE_VM, options.type);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return sys_error(errno, "KVM_CREATE_VM");
  vm->fd_ = Fd(fd);
  if (options.irqchip) {
    if (int e = ioctl_errno(fd, KVM_CREATE_IRQCHIP, 0)) return sys_error(e, "KVM_CREATE_IRQCHIP");
  }
  if (options.manual_dirty_log_protect) {
    int caps = vm->check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    if (caps <= 0) return make_error(ENOTSUP, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered");
    uint64_t want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if (options.dirty_log_initially_set) want |= KVM_DIRTY_LOG_INITIALLY_SET;
    if ((want & static_cast<uint64_t>(caps)) != want) {
      return make_error(ENOTSUP, "manual dirty log protect: kernel offers ", caps);
    }
    if (int e = vm->enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, want)) {
      return sys_error(e, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
    }
  }
  if (options.dirty_ring_bytes) {
    int max = vm->check_extension(KVM_CAP_DIRTY_LOG_RING);
    if (max <= 0) return make_error(ENOTSUP, "KVM_CAP_DIRTY_LOG_RING not offered");
    if (int e = vm->enable_cap(KVM_CAP_DIRTY_LOG_RING, options.dirty_ring_bytes)) {
      return sys_error(e, "KVM_ENABLE_CAP(DIRTY_LOG_RING)");
    }
    vm->ring_entries_ = options.dirty_ring_bytes / sizeof(kvm_dirty_gfn);
  }
  return vm;
}

int Vm::check_extension(long cap) const {
  int r = ::ioctl(fd(), KVM_CHECK_EXTENSION, cap);
  return r < 0 ? -errno : r;
}

int Vm::enable_cap(uint32_t cap, uint64_t arg0, uint64_t arg1) {
  kvm_enable_cap c{};
  c.cap = cap;
  c.args[0] = arg0;
  c.args[1] = arg1;
  return ioctl_errno(fd(), KVM_ENABLE_CAP, &c);
}

Result<Fd> Vm::create_guest_memfd(uint64_t size, uint64_t flags) {
  CreateGuestMemfd args;
  args.size = size;
  args.flags = flags;
  int fd = ::ioctl(fd_.get(), kCreateGuestMemfd, &args);
  if (fd < 0) return sys_error(errno, "KVM_CREATE_GUEST_MEMFD");
  return Fd(fd);
}

int Vm::set_user_memory_region(const UserspaceMemoryRegion& region, RegionIoctl ioctl) {
  if (ioctl == RegionIoctl::kV2) {
    UserspaceMemoryRegion2 r2;
    r2.slot = region.slot;
    r2.flags = region.flags;
    r2.guest_phys_addr = region.guest_phys_addr;
    r2.memory_size = region.memory_size;
    r2.userspace_addr = region.userspace_addr;
    r2.guest_memfd_offset = region.guest_memfd_offset;
    r2.guest_memfd = region.guest_memfd;
    return set_user_memory_region2(r2);
  }
  kvm_userspace_memory_region r{};
  r.slot = region.slot;
  r.flags = region.flags;
  r.guest_phys_addr = region.guest_phys_addr;
  r.memory_size = region.memory_size;
  r.userspace_addr = region.userspace_addr;
  return ioctl_errno(fd(), KVM_SET_USER_MEMORY_REGION, &r);
}

int Vm::set_user_memory_region2(const UserspaceMemoryRegion2& region) {
  return ioctl_errno(fd(), kSetUserMemoryRegion2, &region);
}

int Vm::get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap) {
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = bitmap.data();
  return ioctl_errno(fd(), KVM_GET_DIRTY_LOG, &log);
}

int Vm::clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                        std::span<const uint64_t> bitmap) {
  kvm_clear_dirty_log c{};
  c.slot = slot;
  c.first_page = first_page;
  c.num_pages = num_pages;
  c.dirty_bitmap = const_cast<uint64_t*>(bitmap.data());
  return ioctl_errno(fd(), KVM_CLEAR_DIRTY_LOG, &c);
}

Result<uint32_t> Vm::reset_dirty_rings() {
  int r = ::ioctl(fd(), KVM_RESET_DIRTY_RINGS, 0);
  if (r < 0) return sys_error(errno, "KVM_RESET_DIRTY_RINGS");
  return static_cast<uint32_t>(r);
}

Result<std::unique_ptr<Vcpu>> Vm::create_vcpu(unsigned id) {
  std::unique_ptr<Vcpu> v(new Vcpu());
  v->id_ = id;
  int fd = ::ioctl(this->fd(), KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  if (fd < 0) return sys_error(errno, "KVM_CREATE_VCPU");
  v->fd_ = Fd(fd);
  v->run_size_ = sys_->vcpu_mmap_size();
  void* p = ::mmap(nullptr, v->run_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return sys_error(errno, "mmap kvm_run");
  v->run_ = static_cast<kvm_run*>(p);
  if (ring_entries_) {
    size_t bytes = size_t{ring_entries_} * sizeof(kvm_dirty_gfn);
    void* q = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                     KVM_DIRTY_LOG_PAGE_OFFSET * static_cast<off_t>(kPageSize));
    if (q == MAP_FAILED) return sys_error(errno, "mmap dirty ring");
    v->ring_ = static_cast<kvm_dirty_gfn*>(q);
    v->ring_entries_ = ring_entries_;
  }
  if (options_.irqchip && id != 0) {
    if (auto r = v->set_mp_state(KVM_MP_STATE_RUNNABLE); !r) return r.error();
  }
  return v;
}

}  // namespace gfnmap::kvm
