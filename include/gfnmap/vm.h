// gfnmap's one way in: a VM that owns its host, guest memory, memslots, dirty log, MMU and
// vCPUs, built in the right order, and speaks KVM's vocabulary (docs/vm.md).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "gfnmap/dirty.h"
#include "gfnmap/host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/types.h"

namespace gfnmap {

class SimHost;
class LinuxHost;

// Which host the VM's memory lives in: this process's real memory (LinuxHost), or the
// deterministic host model (SimHost), where every decision-table row can be staged.
enum class HostKind : uint8_t { kReal, kModel };
std::string_view to_string(HostKind kind);  // "real", "model"

// Where a piece of guest memory comes from: the KVM selftests' backing source types, one list
// for every host and the CLI. The model has every kind but kLazy (no userfaultfd there).
enum class Backing : uint8_t {
  kAnonymous,    // private anonymous, 4K pages
  kThp,          // private anonymous with transparent huge pages (MADV_HUGEPAGE)
  kHugetlb2M,    // hugetlbfs 2M pages (real memory: needs a non-empty pool)
  kHugetlb1G,    // hugetlbfs 1G pages
  kMemfd,        // memfd_create + MAP_SHARED
  kFileShared,   // a file, MAP_SHARED (MemoryOptions::path, or an unlinked temporary file)
  kFilePrivate,  // a file, MAP_PRIVATE: writes break copy-on-write
  kLazy,         // private anonymous filled from a snapshot file by a userfaultfd page server
};
std::string_view to_string(Backing backing);  // "anon", "thp", "hugetlb-2m", "hugetlb-1g",
                                              // "memfd", "file-shared", "file-private", "lazy"
std::optional<Backing> backing_from_string(std::string_view name);

struct VmOptions {
  HostKind host = HostKind::kReal;
  unsigned nr_address_spaces = 1;  // 2: x86 with SMM
  // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (kDirtyLogManualProtectEnable | kDirtyLogInitiallySet).
  uint64_t manual_dirty_log_protect = 0;
  // KVM_CAP_DIRTY_LOG_RING size in bytes per vCPU (a power of two >= 4096); 0: bitmaps only.
  uint32_t dirty_ring_bytes = 0;
  // KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: bitmaps beside the rings, for VMM writes.
  bool dirty_ring_with_bitmap = false;
  bool pte_prefetch = false;  // MmuOptions::pte_prefetch
};

struct MemoryOptions {
  // kFileShared / kFilePrivate: the file (created, and grown to offset + size, when needed);
  // empty: an unlinked temporary file. kLazy: the snapshot (required, read-only).
  std::string path{};
  uint64_t offset = 0;  // bytes into the file or snapshot, page aligned
};

// Thread safety: create_memory, set_user_memory_region and create_vcpu may be called from any
// thread (each serialises itself); a Vcpu is used by one thread at a time; the dirty-log calls,
// read_guest and write_guest may run concurrently with vCPUs.
//
// Ownership: the Vm owns everything it creates. Pointers and references it returns (the
// vCPUs, the parts) live until the Vm is destroyed, and destroying it tears everything down in
// KVM's order (vCPUs, MMU, dirty log, memslots, page servers, memory, host).
class Vm {
 public:
  // EINVAL for bad options (with the field named); real memory: the host's errno.
  static Result<std::unique_ptr<Vm>> create(const VmOptions& options = {});
  ~Vm();
  Vm(const Vm&) = delete;
  Vm& operator=(const Vm&) = delete;

  const VmOptions& options() const;

  // `size` bytes (a multiple of the backing's page size) of new guest memory of `backing`,
  // unmapped when the Vm is destroyed. Returns its host virtual address, for
  // set_user_memory_region. EINVAL bad size or options; EOPNOTSUPP kLazy on the model;
  // ENOMEM an empty hugetlb pool; the system's errno otherwise.
  Result<Hva> create_memory(Backing backing, uint64_t size, const MemoryOptions& options = {});

  // KVM_SET_USER_MEMORY_REGION(2): KVM's checks and errnos (docs/spec.md 7.4). Returns the
  // change made, or nullopt for the no-op modify. userspace_addr may be any mapping the host
  // knows: memory from create_memory, or on the model any of its mappings.
  Result<std::optional<MemslotChange>> set_user_memory_region(
      const UserspaceMemoryRegion& region, RegionIoctl ioctl = RegionIoctl::kV1);

  // KVM_CREATE_VCPU: EEXIST for an id in use; EINVAL for an id >= kMaxVcpus.
  static constexpr uint32_t kMaxVcpus = 4096;
  Result<Vcpu*> create_vcpu(uint32_t id);
  Vcpu* vcpu(uint32_t id) const;  // nullptr when not created

  // KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG / KVM_RESET_DIRTY_RINGS (DirtyLog's errnos).
  Result<uint64_t> get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap);
  Result<uint64_t> clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                                   std::span<const uint64_t> bitmap);
  Result<uint64_t> reset_dirty_rings();

  // kvm_read_guest / kvm_write_guest for device models: through the host mapping, across
  // pages and slots; writes are marked dirty. An access no slot backs ends in kMmio.
  VcpuExit read_guest(Gpa gpa, std::span<std::byte> out, unsigned as_id = 0);
  VcpuExit write_guest(Gpa gpa, std::span<const std::byte> data, unsigned as_id = 0);

  // The parts, for what the Vm does not wrap (stats, introspection, host changes).
  HostMm& host();
  SimHost* sim_host();      // nullptr unless HostKind::kModel
  LinuxHost* linux_host();  // nullptr unless HostKind::kReal
  Memslots& memslots();
  DirtyLog& dirty_log();
  Mmu& mmu();

  struct Impl;

 private:
  explicit Vm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gfnmap
