// gfnmap Vm: builds the host, memslots, dirty log and MMU in dependency order, creates guest
// memory of every backing, and tears all of it down in KVM's order.
#include "gfnmap/vm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "gfnmap/kvm.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/sim_host.h"
#include "gfnmap/uffd.h"

namespace gfnmap {
namespace {

struct BackingName {
  Backing backing;
  std::string_view name;
};
constexpr std::array<BackingName, 8> kBackingNames{{
    {Backing::kAnonymous, "anon"},
    {Backing::kThp, "thp"},
    {Backing::kHugetlb2M, "hugetlb-2m"},
    {Backing::kHugetlb1G, "hugetlb-1g"},
    {Backing::kMemfd, "memfd"},
    {Backing::kFileShared, "file-shared"},
    {Backing::kFilePrivate, "file-private"},
    {Backing::kLazy, "lazy"},
}};

uint64_t backing_page_size(Backing b) {
  switch (b) {
    case Backing::kHugetlb2M: return kPageSize * pg_level_pages(PgLevel::k2M);
    case Backing::kHugetlb1G: return kPageSize * pg_level_pages(PgLevel::k1G);
    default: return kPageSize;
  }
}

bool is_file(Backing b) { return b == Backing::kFileShared || b == Backing::kFilePrivate; }

// A file for a file backing, at least `bytes` long: the user's (created when absent) or an
// unlinked temporary one.
Result<kvm::Fd> open_backing_file(const std::string& path, uint64_t bytes) {
  kvm::Fd fd;
  if (path.empty()) {
    std::string tmp = "/tmp/gfnmap-vm-XXXXXX";
    fd = kvm::Fd(mkostemp(tmp.data(), O_CLOEXEC));
    if (!fd) return make_error(errno, "cannot create a temporary file in /tmp");
    unlink(tmp.c_str());
  } else {
    fd = kvm::Fd(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd) return make_error(errno, "cannot open ", path);
  }
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return make_error(errno, "cannot stat ", path);
  if (static_cast<uint64_t>(st.st_size) < bytes &&
      ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return make_error(errno, "cannot grow ", path.empty() ? "a temporary file" : path, " to ",
                      bytes, " bytes");
  }
  return fd;
}

Error with_context(const Error& e, std::string_view what) {
  return Error{e.code, std::string(what) + ": " + e.message};
}

}  // namespace

std::string_view to_string(HostKind kind) { return kind == HostKind::kModel ? "model" : "real"; }

std::string_view to_string(Backing backing) {
  for (const auto& b : kBackingNames) {
    if (b.backing == backing) return b.name;
  }
  return "?";
}

std::optional<Backing> backing_from_string(std::string_view name) {
  for (const auto& b : kBackingNames) {
    if (b.name == name) return b.backing;
  }
  return std::nullopt;
}

// Members are declared in construction order; ~Impl destroys them in KVM's order explicitly.
struct Vm::Impl {
  VmOptions options;
  std::unique_ptr<SimHost> sim;
  std::unique_ptr<LinuxHost> linux_host;
  HostMm* host = nullptr;
  std::vector<kvm::Fd> files;  // file backings (the mappings hold their own references)
  std::vector<std::unique_ptr<uffd::FileSource>> snapshots;
  std::vector<std::unique_ptr<uffd::PageServer>> servers;  // one per lazy memory
  std::unique_ptr<Memslots> slots;
  std::unique_ptr<DirtyLog> dirty;
  std::unique_ptr<Mmu> mmu;
  std::mutex mu;  // guards vcpus, files, snapshots, servers and the host's mapping calls
  std::map<uint32_t, std::unique_ptr<Vcpu>> vcpus;

  ~Impl() {
    vcpus.clear();     // kvm_destroy_vcpus
    mmu.reset();       // unregisters from the host, memslots and dirty log
    dirty.reset();
    slots.reset();
    servers.clear();   // stop serving before the sources and the memory go
    snapshots.clear();
    files.clear();
    linux_host.reset();  // unmaps the memory it created
    sim.reset();
  }

  Result<Hva> create_model_memory(Backing backing, uint64_t size, const MemoryOptions& mo);
  Result<Hva> create_real_memory(Backing backing, uint64_t size, const MemoryOptions& mo);
};

Result<Hva> Vm::Impl::create_model_memory(Backing backing, uint64_t size,
                                          const MemoryOptions& mo) {
  if (backing == Backing::kLazy) {
    return make_error(EOPNOTSUPP, "backing lazy needs userfaultfd: the host model has none");
  }
  if (!mo.path.empty() || mo.offset != 0) {
    return make_error(EINVAL, "the host model's files are its own: MemoryOptions::path and "
                      "offset must be empty");
  }
  MmapOptions o;
  VmaKind kind = VmaKind::kAnonPrivate;
  switch (backing) {
    case Backing::kThp: o.backing = PageBacking::kThp; break;
    case Backing::kHugetlb2M: o.backing = PageBacking::kHugetlb2M; break;
    case Backing::kHugetlb1G: o.backing = PageBacking::kHugetlb1G; break;
    case Backing::kMemfd: {
      auto f = sim->create_memfd(size);
      if (!f) return f.error();
      o.file = *f;
      kind = VmaKind::kAnonShared;
      break;
    }
    case Backing::kFileShared:
    case Backing::kFilePrivate: {
      auto f = sim->create_file(size);
      if (!f) return f.error();
      o.file = *f;
      kind = backing == Backing::kFileShared ? VmaKind::kFileShared : VmaKind::kFilePrivate;
      break;
    }
    default: break;
  }
  return sim->mmap(size, kProtRW, kind, o);
}

Result<Hva> Vm::Impl::create_real_memory(Backing backing, uint64_t size,
                                         const MemoryOptions& mo) {
  if (backing == Backing::kLazy) {
    if (mo.path.empty()) {
      return make_error(EINVAL, "backing lazy needs MemoryOptions::path, the snapshot file");
    }
    auto src = uffd::FileSource::open(mo.path);
    if (!src) return src.error();
    if ((*src)->size() < mo.offset + size) {
      return make_error(EINVAL, "snapshot ", mo.path, " has ", (*src)->size(),
                        " bytes, fewer than offset + size = ", mo.offset + size);
    }
    auto server = uffd::PageServer::create(**src, uffd::PageServerOptions{});
    if (!server) return with_context(server.error(), "userfaultfd");
    auto base = (*server)->map_lazy(linux_host.get(), size, mo.offset);
    if (!base) return base.error();
    if (auto r = (*server)->start(); !r) return r.error();
    snapshots.push_back(std::move(*src));
    servers.push_back(std::move(*server));
    return *base;
  }
  if (!mo.path.empty() && !is_file(backing)) {
    return make_error(EINVAL, "MemoryOptions::path is for file and lazy backings, not ",
                      to_string(backing));
  }
  RegionSpec spec;
  spec.size = size;
  switch (backing) {
    case Backing::kAnonymous: spec.kind = RegionKind::kAnonymous; break;
    case Backing::kThp: spec.kind = RegionKind::kThp; break;
    case Backing::kHugetlb2M: spec.kind = RegionKind::kHugetlb2M; break;
    case Backing::kHugetlb1G: spec.kind = RegionKind::kHugetlb1G; break;
    case Backing::kMemfd: spec.kind = RegionKind::kMemfdShared; break;
    case Backing::kFileShared:
    case Backing::kFilePrivate: {
      auto fd = open_backing_file(mo.path, mo.offset + size);
      if (!fd) return fd.error();
      spec.kind = backing == Backing::kFileShared ? RegionKind::kFileShared
                                                  : RegionKind::kFilePrivate;
      spec.fd = fd->get();
      spec.offset = mo.offset;
      files.push_back(std::move(*fd));
      break;
    }
    case Backing::kLazy: break;  // above
  }
  auto region = linux_host->create_region(spec);
  if (!region) return region.error();
  return region->start;
}

Vm::Vm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Vm::~Vm() = default;

Result<std::unique_ptr<Vm>> Vm::create(const VmOptions& options) {
  if (options.nr_address_spaces < 1 || options.nr_address_spaces > 2) {
    return make_error(EINVAL, "VmOptions::nr_address_spaces must be 1 or 2, not ",
                      options.nr_address_spaces);
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.host == HostKind::kModel) {
    impl->sim = std::make_unique<SimHost>();
    impl->host = impl->sim.get();
  } else {
    auto host = LinuxHost::create();
    if (!host) return with_context(host.error(), "real memory");
    impl->linux_host = std::move(*host);
    impl->host = impl->linux_host.get();
  }
  MemslotsConfig mc;
  mc.nr_address_spaces = options.nr_address_spaces;
  impl->slots = std::make_unique<Memslots>(mc);
  // The dirty log registers with the memslots before the MMU (dirty.h).
  impl->dirty = std::make_unique<DirtyLog>(*impl->slots);
  if (options.manual_dirty_log_protect != 0) {
    if (auto r = impl->dirty->enable_manual_dirty_log_protect(options.manual_dirty_log_protect);
        !r) {
      return with_context(r.error(), "VmOptions::manual_dirty_log_protect");
    }
  }
  if (options.dirty_ring_bytes != 0) {
    if (auto r = impl->dirty->enable_dirty_ring(options.dirty_ring_bytes); !r) {
      return with_context(r.error(), "VmOptions::dirty_ring_bytes");
    }
  }
  if (options.dirty_ring_with_bitmap) {
    if (auto r = impl->dirty->enable_dirty_ring_with_bitmap(); !r) {
      return with_context(r.error(), "VmOptions::dirty_ring_with_bitmap");
    }
  }
  MmuOptions mo;
  mo.dirty = impl->dirty.get();
  mo.pte_prefetch = options.pte_prefetch;
  impl->mmu = std::make_unique<Mmu>(*impl->slots, *impl->host, mo);
  return std::unique_ptr<Vm>(new Vm(std::move(impl)));
}

const VmOptions& Vm::options() const { return impl_->options; }

Result<Hva> Vm::create_memory(Backing backing, uint64_t size, const MemoryOptions& options) {
  const uint64_t page = backing_page_size(backing);
  if (size == 0 || size % page != 0) {
    return make_error(EINVAL, "memory size ", size, " is not a positive multiple of ",
                      to_string(backing), "'s page size ", page);
  }
  if (options.offset % kPageSize != 0) {
    return make_error(EINVAL, "MemoryOptions::offset ", options.offset, " is not page aligned");
  }
  std::lock_guard g(impl_->mu);
  auto r = impl_->sim ? impl_->create_model_memory(backing, size, options)
                      : impl_->create_real_memory(backing, size, options);
  if (!r) return with_context(r.error(), std::string("backing ") + std::string(to_string(backing)));
  return r;
}

Result<std::optional<MemslotChange>> Vm::set_user_memory_region(
    const UserspaceMemoryRegion& region, RegionIoctl ioctl) {
  return impl_->slots->set_memory_region(region, ioctl);
}

Result<Vcpu*> Vm::create_vcpu(uint32_t id) {
  if (id >= kMaxVcpus) return make_error(EINVAL, "vCPU id ", id, " >= ", kMaxVcpus);
  std::lock_guard g(impl_->mu);
  auto [it, fresh] = impl_->vcpus.try_emplace(id);
  if (!fresh) return make_error(EEXIST, "vCPU ", id, " already exists");
  it->second = std::make_unique<Vcpu>(*impl_->mmu, id);
  return it->second.get();
}

Vcpu* Vm::vcpu(uint32_t id) const {
  std::lock_guard g(impl_->mu);
  auto it = impl_->vcpus.find(id);
  return it == impl_->vcpus.end() ? nullptr : it->second.get();
}

Result<uint64_t> Vm::get_dirty_log(uint32_t slot, std::span<uint64_t> bitmap) {
  return impl_->dirty->get_dirty_log(slot, bitmap);
}

Result<uint64_t> Vm::clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                                     std::span<const uint64_t> bitmap) {
  return impl_->dirty->clear_dirty_log(slot, first_page, num_pages, bitmap);
}

Result<uint64_t> Vm::reset_dirty_rings() { return impl_->dirty->reset_dirty_rings(); }

VcpuExit Vm::read_guest(Gpa gpa, std::span<std::byte> out, unsigned as_id) {
  return impl_->mmu->read_guest(gpa, out, as_id);
}

VcpuExit Vm::write_guest(Gpa gpa, std::span<const std::byte> data, unsigned as_id) {
  return impl_->mmu->write_guest(gpa, data, as_id);
}

HostMm& Vm::host() { return *impl_->host; }
SimHost* Vm::sim_host() { return impl_->sim.get(); }
LinuxHost* Vm::linux_host() { return impl_->linux_host.get(); }
Memslots& Vm::memslots() { return *impl_->slots; }
DirtyLog& Vm::dirty_log() { return *impl_->dirty; }
Mmu& Vm::mmu() { return *impl_->mmu; }

}  // namespace gfnmap
