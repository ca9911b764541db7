// gfnmap kvm: a thin binding to the real /dev/kvm (VM, vCPUs, memslots, dirty logs, exits), the
// built-in CPL3 guest workload, a workload runner and the memslot conformance replay.
#pragma once

#include <linux/kvm.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap::kvm {

// ---------------------------------------------------------------------------------------------
// ABI newer than the 6.1 system headers (probed at run time; sizes checked in kvm.cc).

inline constexpr long kCapUserMemory2 = 231;      // KVM_CAP_USER_MEMORY2
inline constexpr long kCapMemoryFaultInfo = 232;  // KVM_CAP_MEMORY_FAULT_INFO
inline constexpr long kCapGuestMemfd = 234;       // KVM_CAP_GUEST_MEMFD
inline constexpr uint32_t kExitMemoryFault = 39;  // KVM_EXIT_MEMORY_FAULT
inline constexpr uint64_t kMemoryExitFlagPrivate = 1u << 3;  // KVM_MEMORY_EXIT_FLAG_PRIVATE

// struct kvm_userspace_memory_region2 (Linux 6.8+).
struct UserspaceMemoryRegion2 {
  uint32_t slot = 0;
  uint32_t flags = 0;
  uint64_t guest_phys_addr = 0;
  uint64_t memory_size = 0;
  uint64_t userspace_addr = 0;
  uint64_t guest_memfd_offset = 0;
  uint32_t guest_memfd = 0;
  uint32_t pad1 = 0;
  uint64_t pad2[14] = {};
};

// struct kvm_create_guest_memfd and KVM_CREATE_GUEST_MEMFD (Linux 6.8+).
struct CreateGuestMemfd {
  uint64_t size = 0;
  uint64_t flags = 0;
  uint64_t reserved[6] = {};
};
inline constexpr unsigned long kCreateGuestMemfd = _IOWR(KVMIO, 0xd4, CreateGuestMemfd);

// True when /dev/kvm can be opened read-write; otherwise *why (optional) says why not.
bool kvm_available(std::string* why = nullptr);

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  explicit operator bool() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// /dev/kvm itself.
class System {
 public:
  static Result<System> open(const char* path = "/dev/kvm");

  int fd() const { return fd_.get(); }
  int api_version() const { return api_version_; }
  // KVM_CHECK_EXTENSION on /dev/kvm: the capability's value (>= 0), or -errno.
  int check_extension(long cap) const;
  size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  // KVM_GET_SUPPORTED_CPUID.
  Result<std::vector<kvm_cpuid_entry2>> supported_cpuid() const;
  // The MemslotsConfig that matches this kernel (address spaces, user slots, READONLY, and the
  // last gfn, probed in a scratch VM).
  MemslotsConfig memslots_config() const;

 private:
  Fd fd_;
  int api_version_ = 0;
  size_t vcpu_mmap_size_ = 0;
};

// What KVM_RUN returned, decoded.
enum class ExitKind {
  kIo,             // KVM_EXIT_IO
  kMmio,           // KVM_EXIT_MMIO
  kHlt,            // KVM_EXIT_HLT
  kShutdown,       // KVM_EXIT_SHUTDOWN (triple fault)
  kFailEntry,      // KVM_EXIT_FAIL_ENTRY
  kInternalError,  // KVM_EXIT_INTERNAL_ERROR
  kIntr,           // KVM_EXIT_INTR, or KVM_RUN failing with EINTR
  kDirtyRingFull,  // KVM_EXIT_DIRTY_RING_FULL
  kMemoryFault,    // KVM_EXIT_MEMORY_FAULT (KVM_RUN returned -1 with errno, usually EFAULT)
  kRunError,       // KVM_RUN returned -1 with `run_errno` and no further information
  kOther,          // any other exit_reason (see raw_reason)
};
std::string_view to_string(ExitKind kind);
inline constexpr size_t kExitKindCount = static_cast<size_t>(ExitKind::kOther) + 1;

struct Exit {
  ExitKind kind = ExitKind::kOther;
  uint32_t raw_reason = 0;  // kvm_run::exit_reason as KVM left it
  int run_errno = 0;        // errno of KVM_RUN when it returned -1 (EFAULT, EINTR, ...), else 0
  struct Io {
    bool out = false;
    uint8_t size = 0;  // 1, 2 or 4
    uint16_t port = 0;
    uint32_t count = 0;
    uint32_t data = 0;  // first element, zero-extended (OUT only)
  } io;
  struct Mmio {
    Gpa gpa;
    uint32_t len = 0;
    bool is_write = false;
    std::array<uint8_t, 8> data{};  // write data (is_write), else where to put the read result
  } mmio;
  struct Internal {
    uint32_t suberror = 0;
    std::vector<uint64_t> data;
  } internal;
  uint64_t fail_entry_reason = 0;  // hardware_entry_failure_reason
  struct MemoryFault {
    uint64_t flags = 0;
    Gpa gpa;
    uint64_t size = 0;
  } memory_fault;
};
std::string to_string(const Exit& exit);

class Vm;

// One vCPU: its fd and its mmapped struct kvm_run.
class Vcpu {
 public:
  ~Vcpu();
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;

  unsigned id() const { return id_; }
  int fd() const { return fd_.get(); }
  kvm_run* run_struct() { return run_; }

  // One KVM_RUN. Never fails as a call: an ioctl error is an Exit of kind kRunError (or
  // kMemoryFault / kIntr) carrying the raw errno.
  Exit run();
  // For an MMIO read exit: the value the next KVM_RUN hands to the guest.
  void complete_mmio_read(std::span<const uint8_t> data);

  Result<kvm_regs> get_regs() const;
  Result<void> set_regs(const kvm_regs& regs);
  Result<kvm_sregs> get_sregs() const;
  Result<void> set_sregs(const kvm_sregs& sregs);
  Result<void> set_cpuid(std::span<const kvm_cpuid_entry2> entries);
  Result<void> set_mp_state(uint32_t mp_state);  // KVM_MP_STATE_RUNNABLE, ...

  // Dirty ring (when the VM enabled it): hands every published entry to fn (slot is
  // as_id << 16 | id, offset is the page index in the slot) and marks it RESET; returns the
  // count. The VM's reset_dirty_rings() then re-protects the pages.
  size_t harvest_dirty_ring(FunctionRef<void(uint32_t slot, uint64_t offset)> fn);

 private:
  friend class Vm;
  Vcpu() = default;
  unsigned id_ = 0;
  Fd fd_;
  kvm_run* run_ = nullptr;
  size_t run_size_ = 0;
  kvm_dirty_gfn* ring_ = nullptr;
  uint32_t ring_entries_ = 0;
  uint32_t ring_next_ = 0;  // index of the next entry to harvest (free running)
};

struct VmOptions {
  unsigned long type = 0;             // KVM_CREATE_VM machine type
  bool irqchip = false;               // KVM_CREATE_IRQCHIP (then vCPUs > 0 need SET_MP_STATE)
  uint32_t dirty_ring_bytes = 0;      // > 0: enable KVM_CAP_DIRTY_LOG_RING with this size
  bool manual_dirty_log_protect = false;  // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
  bool dirty_log_initially_set = false;   // with manual protect: KVM_DIRTY_LOG_INITIALLY_SET
};

class Vm {
 public:
  // Creates the VM and enables what `options` asks for; an option the kernel lacks is an error
  // (ENOTSUP with the capability's name).
  static Result<std::unique_ptr<Vm>> create(const System& sys, const VmOptions& options = {});
  ~Vm();
  Vm(const Vm&) = delete;
  Vm& operator=(const Vm&) = delete;

  int fd() const { return fd_.get(); }
  const System& system() const { return *sys_; }
  const VmOptions& options() const { return options_; }
  // KVM_CHECK_EXTENSION on the VM fd: value (>= 0) or -errno.
  int check_extension(long cap) const;

  // KVM_SET_USER_MEMORY_REGION (kV1) or _REGION2 (kV2, with the guest_memfd fields). Returns 0 or
  // the kernel's raw errno, never altered.
  int set_user_memory_region(const UserspaceMemoryRegion& region,
                             RegionIoctl ioctl = RegionIoctl::kV1);
  int set_user_memory_region2(const UserspaceMemoryRegion2& region);
  // KVM_CREATE_GUEST_MEMFD: a guest_memfd file of `size` bytes for this VM.
  Result<Fd> create_guest_memfd(uint64_t size, uint64_t flags = 0);

  // KVM_GET_DIRTY_LOG into `bitmap` (one bit per page of the slot; it must hold the slot's
  // npages rounded up to 64 bits). 0 or errno.
  int get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap);
  // KVM_CLEAR_DIRTY_LOG (manual protect). 0 or errno.
  int clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                      std::span<const uint64_t> bitmap);
  // KVM_RESET_DIRTY_RINGS: number of entries reset, or an error.
  Result<uint32_t> reset_dirty_rings();
  uint32_t dirty_ring_entries() const { return ring_entries_; }
  // KVM_ENABLE_CAP on the VM: 0 or errno.
  int enable_cap(uint32_t cap, uint64_t arg0 = 0, uint64_t arg1 = 0);

  // KVM_CREATE_VCPU and mmap of its kvm_run (and dirty ring). With an irqchip, ids other than
  // 0 are made runnable (KVM_SET_MP_STATE).
  Result<std::unique_ptr<Vcpu>> create_vcpu(unsigned id);

 private:
  Vm() = default;
  const System* sys_ = nullptr;
  Fd fd_;
  VmOptions options_;
  uint32_t ring_entries_ = 0;
};

// ---------------------------------------------------------------------------------------------
// The built-in guest. Machine code assembled into the binary; it runs at CPL3 in 64-bit long
// mode (CPL0 code would be run by KVM's emulator on this PVM host), RFLAGS.IOPL = 3 so its
// `out` works, identity-mapped with 2 MiB pages. Per pass it visits each page of its slice
// once (sequential, or a full-period LCG order), reads or writes one 8-byte word at offset 0 of
// the page (write with probability write_percent/100 from a seeded 64-bit LCG), then writes the
// pass number to kPortPassDone. After the last pass it writes the pass count to kPortDone,
// forever. It keeps the XOR of every word read in RBX.

inline constexpr uint16_t kPortPassDone = 0xE0;
inline constexpr uint16_t kPortDone = 0xE1;

struct GuestWorkload {
  Gpa slice;               // first byte of the slice (page aligned)
  uint64_t npages = 1;     // pages in the slice (>= 1)
  uint32_t passes = 1;
  uint32_t write_percent = 100;  // 0..100
  bool random = false;     // LCG page order instead of sequential
  uint64_t seed = 1;
};

// The value the guest stores on a write: the page's gpa | ((pass + 1) & 0xfff).
constexpr uint64_t guest_write_value(Gpa page_gpa, uint32_t pass) {
  return page_gpa.value | ((uint64_t{pass} + 1) & 0xfff);
}

// The guest's access sequence, computed on the host (the same LCGs): fn(pass, page, write)
// for every access in order. Used to predict dirty bitmaps and read checksums.
void for_each_guest_access(const GuestWorkload& w,
                           FunctionRef<void(uint32_t pass, uint64_t page, bool write)> fn);

// The guest's system memory (page tables, GDT, TSS, code) in its own slot, and the vCPU state
// that starts a workload at CPL3.
struct GuestLayoutOptions {
  uint16_t slot_id = 0;          // id of the system slot
  Gpa gpa{0};                    // where the 2 MiB system slot goes (2 MiB aligned)
  uint64_t identity_top = 0;     // identity map [0, identity_top), rounded up to 1 GiB;
                                 // 0: up to the system slot's end
};

class Guest {
 public:
  // Maps 2 MiB of host memory, builds the page tables and code there and registers it as the
  // system slot.
  static Result<std::unique_ptr<Guest>> create(Vm& vm, const GuestLayoutOptions& options = {});
  ~Guest();
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;

  static constexpr uint64_t kSystemSize = 2ull << 20;
  Gpa system_gpa() const { return options_.gpa; }
  uint64_t identity_top() const { return identity_top_; }

  // CPUID, SREGS (long mode, CPL3 segments, CR3 = the page tables) and REGS (RIP = the code,
  // RFLAGS with IOPL 3, workload parameters in RDI, RSI, RDX, RCX, R8, R9).
  Result<void> setup_vcpu(Vcpu& vcpu, const GuestWorkload& w) const;

 private:
  Guest() = default;
  GuestLayoutOptions options_;
  uint64_t identity_top_ = 0;
  void* mem_ = nullptr;
  std::vector<kvm_cpuid_entry2> cpuid_;
};

// Runs `vcpu` until the guest writes kPortDone, handing every exit that is not a pass report
// to on_exit (which returns false to stop). Returns the last exit.
struct PassTimes {
  std::vector<uint64_t> pass_ns;  // wall time of each pass, from KVM_RUN entry
  std::array<uint64_t, kExitKindCount> exits{};
  uint64_t checksum = 0;  // the guest's RBX at the end
  Exit last;
  bool done = false;
};
PassTimes run_workload(Vcpu& vcpu, FunctionRef<bool(const Exit&)> on_exit);

// ---------------------------------------------------------------------------------------------
// Library-level runner for `gfnmap run --backend kvm|both`.

enum class DirtyMode { kNone, kBitmap, kManualProtect, kRing };
std::string_view to_string(DirtyMode mode);

struct RunSlot {
  uint16_t id = 0;
  Gpa gpa;
  uint64_t size = 0;
  // Caller's backing, page aligned; nullptr: the runner maps anonymous memory. The runner never
  // touches it, so it may be registered with a userfaultfd page server (uffd::PageServer):
  // then the guest's first touch of a page is a fault KVM's GUP raises and the server serves
  // (lazy restore of a real guest). The server must be started before the run.
  void* hva = nullptr;
  uint32_t flags = 0;   // KVM_MEM_*; LOG_DIRTY_PAGES is added when dirty != kNone
};

struct RunConfig {
  std::vector<RunSlot> slots;          // empty: one anonymous slot (id 1) at 1 GiB covering
                                       // vcpus * bytes_per_vcpu
  unsigned vcpus = 1;
  uint64_t bytes_per_vcpu = 64ull << 20;  // each vCPU's slice, consecutive from slice_gpa
  Gpa slice_gpa{1ull << 30};
  uint32_t passes = 2;
  uint32_t write_percent = 100;
  bool random = false;
  uint64_t seed = 1;
  DirtyMode dirty = DirtyMode::kNone;
  uint32_t dirty_ring_bytes = 64 * 1024;  // with kRing
  // Every vCPU's slice is [slice_gpa, slice_gpa + bytes_per_vcpu) instead of its own.
  bool overlap = false;
  // With dirty != kNone: logging is turned on (a FLAGS_ONLY change of every slot) after pass 1
  // and the log is harvested after every later pass, as `gfnmap run` does on gfnmap's MMU;
  // false: logging from the start, harvested once after the run.
  bool dirty_after_first_pass = false;
  // Called on the vCPU's thread when it finished a pass (0-based); for progress reports.
  std::function<void(unsigned vcpu, uint32_t pass)> on_pass;
};

struct RunStats {
  uint64_t pages = 0;                   // pages in all slices
  uint64_t pages_faulted = 0;           // distinct pages touched in pass 0 (pages, or one
                                        // slice with overlap)
  double first_touch_ns_per_page = 0;   // pass 0 wall time / pages per vCPU, mean over vCPUs
  double retouch_ns_per_page = 0;       // later passes, mean
  double accesses_per_sec_after = 0;    // all vCPUs, passes after the first
  // vCPUs run each pass in lock step (all start together, the next pass starts when all
  // finished): wall time of pass 1 and of the later passes, harvests excluded.
  double first_touch_seconds = 0;
  double after_seconds = 0;
  uint64_t dirty_pages_harvested = 0;   // bits set / ring entries, summed over harvests
  uint64_t dirty_harvests = 0;          // KVM_GET_DIRTY_LOG rounds (all slots) or ring harvests
  std::array<uint64_t, kExitKindCount> exits{};  // every exit, pass reports included
  uint64_t io_exits = 0;
  std::vector<uint64_t> checksums;      // per vCPU
  double wall_ms = 0;
};

// Creates a VM, registers the slots and the system slot, runs every vCPU in its own thread
// and collects stats. Errors (no /dev/kvm, a region the kernel refuses, an unexpected exit)
// come back as Error with the raw errno or the exit rendered.
Result<RunStats> run_guest_workload(const RunConfig& config);

// ---------------------------------------------------------------------------------------------
// Conformance of memslot operations (`gfnmap replay --kvm`, tests/kvm): a fresh real VM that
// takes KVM_SET_USER_MEMORY_REGION(2) one operation at a time, for callers that apply the same
// operation to gfnmap's Memslots (configured by memslots_config()) and compare the errnos.
class KernelMemslotPeer {
 public:
  static Result<std::unique_ptr<KernelMemslotPeer>> create();
  // KVM_SET_USER_MEMORY_REGION(2) on the VM: 0 or the raw errno.
  int apply(const UserspaceMemoryRegion& region, RegionIoctl ioctl = RegionIoctl::kV1);
  // Memslots configured like this kernel (System::memslots_config).
  MemslotsConfig memslots_config() const { return config_; }

 private:
  KernelMemslotPeer() = default;
  std::unique_ptr<System> sys_;
  std::unique_ptr<Vm> vm_;
  MemslotsConfig config_;
};

}  // namespace gfnmap::kvm
