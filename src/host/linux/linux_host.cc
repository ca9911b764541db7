// gfnmap LinuxHost: HostMm over this process's memory. Fast path from per-page atomic state,
// slow path through MADV_POPULATE_READ/WRITE, errors classified as get_user_pages_unlocked does.
#include "gfnmap/linux_host.h"

#include <fcntl.h>
#include <linux/mman.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <cerrno>
#include <cstring>

#include "abi.h"
#include "gfnmap/host_facts.h"
#include "region.h"

namespace gfnmap {

using detail::kPagePresent;
using detail::kPageWritable;
using detail::LinuxRegion;
using detail::LinuxRegionSet;
using detail::PageArrays;

namespace {

constexpr uint64_t k2M = uint64_t{2} << 20;
constexpr uint64_t k1G = uint64_t{1} << 30;

void* ptr(Hva hva) { return reinterpret_cast<void*>(hva.value); }
Hva page_down(Hva hva) { return Hva(hva.value & kPageMask); }
bool aligned(uint64_t v, uint64_t a) { return (v & (a - 1)) == 0; }

uint32_t prot_to_vm_flags(int prot) {
  uint32_t f = 0;
  if (prot & PROT_READ) f |= kVmRead;
  if (prot & PROT_WRITE) f |= kVmWrite;
  if (prot & PROT_EXEC) f |= kVmExec;
  return f;
}

uint32_t kind_vm_flags(RegionKind kind) {
  switch (kind) {
    case RegionKind::kMemfdShared:
    case RegionKind::kFileShared:
      return kVmShared;
    case RegionKind::kHugetlb2M:
    case RegionKind::kHugetlb1G:
      return kVmHugetlb;
    case RegionKind::kDevice:
      return kVmIo | kVmPfnmap;
    default:
      return 0;
  }
}

uint64_t kind_alignment(RegionKind kind) {
  if (kind == RegionKind::kHugetlb2M) return k2M;
  if (kind == RegionKind::kHugetlb1G) return k1G;
  return kPageSize;
}

// A signalfd for the calling thread that becomes readable while any signal is pending for it
// (blocked signals stay pending; polling does not consume them). One per thread, closed at exit.
struct ThreadSignalFd {
  int fd = -1;
  ~ThreadSignalFd() {
    if (fd >= 0) close(fd);
  }
  int get() {
    if (fd < 0) {
      sigset_t all;
      sigfillset(&all);
      fd = signalfd(-1, &all, SFD_CLOEXEC | SFD_NONBLOCK);
    }
    return fd;
  }
};
thread_local ThreadSignalFd t_sigfd;

bool any_blocked_signal_pending() {
  sigset_t set;
  if (sigpending(&set) != 0) return false;
  return !sigisemptyset(&set);
}

}  // namespace

std::string_view to_string(RegionKind kind) {
  switch (kind) {
    case RegionKind::kAnonymous: return "anonymous";
    case RegionKind::kThp: return "thp";
    case RegionKind::kHugetlb2M: return "hugetlb-2M";
    case RegionKind::kHugetlb1G: return "hugetlb-1G";
    case RegionKind::kMemfdShared: return "memfd-shared";
    case RegionKind::kFileShared: return "file-shared";
    case RegionKind::kFilePrivate: return "file-private";
    case RegionKind::kLazy: return "lazy";
    case RegionKind::kDevice: return "device";
  }
  return "?";
}

std::string_view to_string(FaultAround policy) {
  switch (policy) {
    case FaultAround::kOff: return "off";
    case FaultAround::kSequential: return "sequential";
    case FaultAround::kFixed: return "fixed";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Creation and the region table.

LinuxHost::LinuxHost(Options options) : options_(options) {}

Result<std::unique_ptr<LinuxHost>> LinuxHost::create(Options options) {
  const uint32_t fa = options.fault_around_pages;
  if (fa < 2 || fa > 512 || (fa & (fa - 1)) != 0) {
    return make_error(EINVAL, "LinuxHost: fault_around_pages must be a power of two from 2 to "
                      "512, not ", std::to_string(fa));
  }
  if (options.fault_around != FaultAround::kOff &&
      options.fault_around != FaultAround::kSequential &&
      options.fault_around != FaultAround::kFixed) {
    return make_error(EINVAL, "LinuxHost: unknown fault_around policy");
  }
  std::unique_ptr<LinuxHost> host(new LinuxHost(options));
  host->set_.store(new LinuxRegionSet(), std::memory_order_release);
  host->retired_.emplace_back(const_cast<LinuxRegionSet*>(host->set_.load()));
  host->pagemap_fd_ = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (host->pagemap_fd_ < 0 && options.pfn_source == PfnSource::kPagemap) {
    return make_error(errno, "cannot open /proc/self/pagemap: ", std::strerror(errno));
  }
  host->kpageflags_fd_ = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  const HostFacts& facts = host_facts();
  host->physical_pfns_ = host->pagemap_fd_ >= 0 && facts.pagemap_pfns;
  host->has_pagemap_scan_ = host->pagemap_fd_ >= 0 && facts.pagemap_scan;
  // The zero page: followed as probed; assumed on a kernel without it by emulation (reads of
  // untouched private anonymous pages are kept read-only); never denied on a kernel with it.
  const bool kernel_zero_page = facts.zero_page && !facts.zero_page_emulated;
  host->zero_page_ = options.zero_page.value_or(facts.zero_page);
  if (!host->zero_page_ && kernel_zero_page) {
    return make_error(EINVAL, "LinuxHost: zero_page = false on a kernel that maps the shared "
                      "zero page (", facts.zero_page_how, ")");
  }
  host->emulate_zero_page_ = host->zero_page_ && !kernel_zero_page;
  if (options.pfn_source == PfnSource::kPagemap && !host->physical_pfns_) {
    return make_error(EPERM, "pagemap PFN bits are not readable (needs CAP_SYS_ADMIN)");
  }
  if (options.pfn_source == PfnSource::kVirtual) host->physical_pfns_ = false;
  return host;
}

LinuxHost::~LinuxHost() {
  {
    std::lock_guard lk(notifier_mu_);
    for (MmuNotifier* n : notifiers_) n->release();
    notifiers_.clear();
  }
  const LinuxRegionSet* set = set_.load();
  for (const LinuxRegion& r : set->regions) {
    if (r.owned) munmap(ptr(r.start), r.end - r.start);
  }
  if (pagemap_fd_ >= 0) close(pagemap_fd_);
  if (kpageflags_fd_ >= 0) close(kpageflags_fd_);
}

const LinuxRegion* LinuxHost::find(Hva hva) const {
  const LinuxRegionSet* set = set_.load(std::memory_order_acquire);
  const auto& v = set->regions;
  if (v.empty()) return nullptr;
  uint32_t last = set->last.load(std::memory_order_relaxed);
  if (last < v.size() && v[last].contains(hva)) return &v[last];
  auto it = std::upper_bound(v.begin(), v.end(), hva,
                             [](Hva a, const LinuxRegion& r) { return a < r.start; });
  if (it == v.begin()) return nullptr;
  --it;
  if (!it->contains(hva)) return nullptr;
  set->last.store(static_cast<uint32_t>(it - v.begin()), std::memory_order_relaxed);
  return &*it;
}

void LinuxHost::publish_locked(std::vector<LinuxRegion> regions) {
  std::sort(regions.begin(), regions.end(),
            [](const LinuxRegion& a, const LinuxRegion& b) { return a.start < b.start; });
  auto set = std::make_unique<LinuxRegionSet>();
  set->regions = std::move(regions);
  set_.store(set.get(), std::memory_order_release);
  retired_.push_back(std::move(set));  // readers may still use the old one: keep all
}

Result<void> LinuxHost::check_range(Hva start, uint64_t size, const char* what) const {
  if (size == 0 || !aligned(start.value, kPageSize) || !aligned(size, kPageSize)) {
    return make_error(EINVAL, what, ": range [", std::to_string(start.value), ", +",
                      std::to_string(size), ") is empty or not page aligned");
  }
  if (start.value + size < start.value) return make_error(EINVAL, what, ": range wraps");
  // Every page must lie in a known region.
  Hva h = start;
  const Hva end = start + size;
  while (h < end) {
    const LinuxRegion* r = find(h);
    if (!r) {
      return make_error(EINVAL, what, ": address ", std::to_string(h.value),
                        " is not in a region LinuxHost knows");
    }
    h = r->end;
  }
  return {};
}

Result<RegionInfo> LinuxHost::add_region(const RegionSpec& spec, Hva start, bool owned,
                                         int fd_to_close) {
  std::unique_lock mm(mmap_lock_);
  std::lock_guard pub(publish_mu_);
  const Hva end = start + spec.size;
  const LinuxRegionSet* cur = set_.load();
  for (const LinuxRegion& r : cur->regions) {
    if (r.start < end && start < r.end) {
      if (owned) munmap(ptr(start), spec.size);
      if (fd_to_close >= 0) close(fd_to_close);
      return make_error(EEXIST, "region [", std::to_string(start.value), ", ",
                        std::to_string(end.value), ") overlaps the ", to_string(r.kind),
                        " region at ", std::to_string(r.start.value));
    }
  }
  LinuxRegion r;
  r.start = start;
  r.end = end;
  r.kind = spec.kind;
  r.prot = spec.prot;
  r.vm_flags = prot_to_vm_flags(spec.prot) | kind_vm_flags(spec.kind);
  r.owned = owned;
  r.lazy = spec.lazy;
  r.pages = std::make_shared<PageArrays>(start, spec.size >> kPageShift);
  std::vector<LinuxRegion> next = cur->regions;
  next.push_back(r);
  publish_locked(std::move(next));
  if (fd_to_close >= 0) close(fd_to_close);  // the mapping keeps the file
  return RegionInfo{r.start, r.end, r.kind, r.vm_flags, r.owned};
}

Result<RegionInfo> LinuxHost::create_region(const RegionSpec& spec) {
  const uint64_t align = kind_alignment(spec.kind);
  if (spec.size == 0 || !aligned(spec.size, align)) {
    return make_error(EINVAL, "create_region: size ", std::to_string(spec.size),
                      " is zero or not a multiple of ", std::to_string(align));
  }
  if (spec.prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) {
    return make_error(EINVAL, "create_region: bad prot ", std::to_string(spec.prot));
  }
  if (spec.kind == RegionKind::kLazy && spec.lazy == nullptr) {
    return make_error(EINVAL, "create_region: a lazy region needs its page server (spec.lazy)");
  }
  if (spec.kind == RegionKind::kLazy) {
    return make_error(EINVAL,
                      "create_region: lazy regions are created by uffd::PageServer::map_lazy");
  }
  int fd = -1;
  int close_fd = -1;
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  uint64_t offset = 0;
  switch (spec.kind) {
    case RegionKind::kAnonymous:
    case RegionKind::kThp:
    case RegionKind::kDevice:
    case RegionKind::kLazy:
      break;
    case RegionKind::kHugetlb2M:
      flags |= MAP_HUGETLB | MAP_HUGE_2MB;
      break;
    case RegionKind::kHugetlb1G:
      flags |= MAP_HUGETLB | MAP_HUGE_1GB;
      break;
    case RegionKind::kMemfdShared:
      if (spec.fd >= 0) {
        fd = spec.fd;
        offset = spec.offset;
      } else {
        fd = close_fd = memfd_create(spec.name.c_str(), MFD_CLOEXEC);
        if (fd < 0) return make_error(errno, "memfd_create: ", std::strerror(errno));
        if (ftruncate(fd, static_cast<off_t>(spec.size)) != 0) {
          int e = errno;
          close(fd);
          return make_error(e, "ftruncate of the memfd: ", std::strerror(e));
        }
      }
      flags = MAP_SHARED;
      break;
    case RegionKind::kFileShared:
    case RegionKind::kFilePrivate: {
      if (spec.fd < 0) return make_error(EBADF, "create_region: a file region needs spec.fd");
      struct stat st;
      if (fstat(spec.fd, &st) != 0) {
        return make_error(EBADF, "create_region: fd ", std::to_string(spec.fd),
                          " is not open: ", std::strerror(errno));
      }
      if (!aligned(spec.offset, kPageSize)) {
        return make_error(EINVAL, "create_region: file offset not page aligned");
      }
      fd = spec.fd;
      offset = spec.offset;
      flags = spec.kind == RegionKind::kFileShared ? MAP_SHARED : MAP_PRIVATE;
      break;
    }
  }
  if (fd >= 0 && spec.kind == RegionKind::kMemfdShared && spec.fd >= 0) {
    struct stat st;
    if (fstat(fd, &st) != 0) {
      return make_error(EBADF, "create_region: fd ", std::to_string(fd), " is not open");
    }
  }
  void* p = mmap(nullptr, spec.size, spec.prot, flags, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    int e = errno;
    if (close_fd >= 0) close(close_fd);
    if (spec.kind == RegionKind::kHugetlb2M || spec.kind == RegionKind::kHugetlb1G) {
      return make_error(e, "hugetlb mmap failed (", std::strerror(e),
                        "): the hugetlb pool is probably empty (vm.nr_hugepages)");
    }
    return make_error(e, "mmap of a ", to_string(spec.kind), " region: ", std::strerror(e));
  }
  if (spec.kind == RegionKind::kThp) madvise(p, spec.size, MADV_HUGEPAGE);
  if (spec.kind == RegionKind::kAnonymous) madvise(p, spec.size, MADV_NOHUGEPAGE);
  return add_region(spec, Hva(reinterpret_cast<uint64_t>(p)), true, close_fd);
}

Result<RegionInfo> LinuxHost::register_region(const RegionSpec& spec) {
  const uint64_t align = kind_alignment(spec.kind);
  if (spec.size == 0 || !aligned(spec.size, align) || !aligned(spec.addr.value, align)) {
    return make_error(EINVAL, "register_region: [", std::to_string(spec.addr.value), ", +",
                      std::to_string(spec.size), ") is empty or not aligned to ",
                      std::to_string(align));
  }
  if (spec.addr.value + spec.size < spec.addr.value || kvm_is_error_hva(spec.addr + spec.size)) {
    return make_error(EINVAL, "register_region: range is not user memory");
  }
  if (spec.kind == RegionKind::kLazy && spec.lazy == nullptr) {
    return make_error(EINVAL, "register_region: a lazy region needs its page server");
  }
  if (spec.prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) {
    return make_error(EINVAL, "register_region: bad prot ", std::to_string(spec.prot));
  }
  // The range must be mapped: mincore fails with ENOMEM on a hole.
  std::vector<unsigned char> vec(std::min<uint64_t>(spec.size >> kPageShift, 4096));
  for (uint64_t off = 0; off < spec.size; off += vec.size() * kPageSize) {
    uint64_t len = std::min<uint64_t>(spec.size - off, vec.size() * kPageSize);
    if (mincore(ptr(spec.addr + off), len, vec.data()) != 0 && errno == ENOMEM) {
      return make_error(EFAULT, "register_region: [", std::to_string(spec.addr.value), ", +",
                        std::to_string(spec.size), ") is not (fully) mapped");
    }
  }
  return add_region(spec, spec.addr, false, -1);
}

Result<void> LinuxHost::unregister_region(Hva start) {
  LinuxRegion victim;
  {
    std::unique_lock mm(mmap_lock_);
    std::lock_guard pub(publish_mu_);
    const LinuxRegionSet* cur = set_.load();
    std::vector<LinuxRegion> next;
    bool found = false;
    for (const LinuxRegion& r : cur->regions) {
      if (r.start == start && !found) {
        victim = r;
        found = true;
      } else {
        next.push_back(r);
      }
    }
    if (!found) {
      return make_error(ENOENT, "unregister_region: no region starts at ",
                        std::to_string(start.value));
    }
    invalidate_start(victim.start, victim.end);
    publish_locked(std::move(next));
  }
  if (victim.owned) munmap(ptr(victim.start), victim.end - victim.start);
  invalidate_end(victim.start, victim.end);
  return {};
}

std::vector<RegionInfo> LinuxHost::regions() const {
  std::vector<RegionInfo> out;
  for (const LinuxRegion& r : set_.load(std::memory_order_acquire)->regions) {
    out.push_back(RegionInfo{r.start, r.end, r.kind, r.vm_flags, r.owned});
  }
  return out;
}

LinuxHostStats LinuxHost::stats() const {
  LinuxHostStats s;
  s.fast_hits = fast_hits_.load();
  s.fast_misses = fast_misses_.load();
  s.slow_calls = slow_calls_.load();
  s.populate_errors = populate_errors_.load();
  s.nowait_needs_io = nowait_needs_io_.load();
  s.interrupted = interrupted_.load();
  s.invalidations = invalidations_.load();
  s.bad_puts = bad_puts_.load();
  s.populated_ahead = populated_ahead_.load();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Invalidations.

void LinuxHost::clear_state(Hva start, Hva end) {
  const LinuxRegionSet* set = set_.load(std::memory_order_acquire);
  for (const LinuxRegion& r : set->regions) {
    if (r.end <= start || end <= r.start) continue;
    Hva a = std::max(start, r.start);
    Hva b = std::min(end, r.end);
    for (uint64_t i = r.pages->index(a); i < r.pages->index(b); ++i) {
      r.pages->state[i].store(0, std::memory_order_release);
    }
  }
}

void LinuxHost::invalidate_start(Hva start, Hva end) {
  invalidations_.fetch_add(1, std::memory_order_relaxed);
  std::vector<MmuNotifier*> subs;
  {
    std::lock_guard lk(notifier_mu_);
    subs = notifiers_;
  }
  for (MmuNotifier* n : subs) n->invalidate_range_start(start, end);
  clear_state(start, end);
}

void LinuxHost::invalidate_end(Hva start, Hva end) {
  // A slow path that raced the change may have recorded the old page: forget it again.
  clear_state(start, end);
  std::vector<MmuNotifier*> subs;
  {
    std::lock_guard lk(notifier_mu_);
    subs = notifiers_;
  }
  for (MmuNotifier* n : subs) n->invalidate_range_end(start, end);
}

void LinuxHost::notify_external_begin(Hva start, Hva end) { invalidate_start(start, end); }
void LinuxHost::notify_external_end(Hva start, Hva end) { invalidate_end(start, end); }

void LinuxHost::notify_external_unmap(Hva start, Hva end) {
  invalidate_start(start, end);
  {
    std::unique_lock mm(mmap_lock_);
    std::lock_guard pub(publish_mu_);
    std::vector<LinuxRegion> next;
    for (const LinuxRegion& r : set_.load()->regions) {
      if (r.end <= start || end <= r.start) {
        next.push_back(r);
        continue;
      }
      if (r.start < start) {
        LinuxRegion left = r;
        left.end = start;
        next.push_back(left);
      }
      if (end < r.end) {
        LinuxRegion right = r;
        right.start = end;
        next.push_back(right);
      }
    }
    publish_locked(std::move(next));
  }
  invalidate_end(start, end);
}

Result<void> LinuxHost::discard(Hva start, uint64_t size) {
  if (auto ok = check_range(start, size, "discard"); !ok) return ok;
  const Hva end = start + size;
  invalidate_start(start, end);
  int err = 0;
  for (Hva h = start; h < end;) {
    const LinuxRegion* r = find(h);
    Hva stop = std::min(end, r->end);
    int advice = r->shared() ? MADV_REMOVE : MADV_DONTNEED;
    if (r->hugetlb() && r->shared()) advice = MADV_REMOVE;
    if (madvise(ptr(h), stop - h, advice) != 0 && err == 0) err = errno;
    h = stop;
  }
  invalidate_end(start, end);
  if (err) return make_error(err, "discard: madvise failed: ", std::strerror(err));
  return {};
}

Result<void> LinuxHost::protect(Hva start, uint64_t size, int prot) {
  if (auto ok = check_range(start, size, "protect"); !ok) return ok;
  if (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) {
    return make_error(EINVAL, "protect: bad prot ", std::to_string(prot));
  }
  const Hva end = start + size;
  std::unique_lock mm(mmap_lock_);
  invalidate_start(start, end);
  int err = mprotect(ptr(start), size, prot) != 0 ? errno : 0;
  if (err == 0) {
    std::lock_guard pub(publish_mu_);
    std::vector<LinuxRegion> next;
    for (const LinuxRegion& r : set_.load()->regions) {
      if (r.end <= start || end <= r.start) {
        next.push_back(r);
        continue;
      }
      if (r.start < start) {
        LinuxRegion left = r;
        left.end = start;
        next.push_back(left);
      }
      LinuxRegion mid = r;
      mid.start = std::max(start, r.start);
      mid.end = std::min(end, r.end);
      mid.prot = prot;
      mid.vm_flags = prot_to_vm_flags(prot) | kind_vm_flags(r.kind);
      next.push_back(mid);
      if (end < r.end) {
        LinuxRegion right = r;
        right.start = end;
        next.push_back(right);
      }
    }
    publish_locked(std::move(next));
  }
  mm.unlock();
  invalidate_end(start, end);
  if (err) return make_error(err, "protect: mprotect failed: ", std::strerror(err));
  return {};
}

Result<void> LinuxHost::unmap(Hva start, uint64_t size) {
  if (auto ok = check_range(start, size, "unmap"); !ok) return ok;
  const Hva end = start + size;
  {
    std::unique_lock mm(mmap_lock_);
    invalidate_start(start, end);
    std::lock_guard pub(publish_mu_);
    std::vector<LinuxRegion> next;
    for (const LinuxRegion& r : set_.load()->regions) {
      if (r.end <= start || end <= r.start) {
        next.push_back(r);
        continue;
      }
      if (r.start < start) {
        LinuxRegion left = r;
        left.end = start;
        next.push_back(left);
      }
      if (end < r.end) {
        LinuxRegion right = r;
        right.start = end;
        next.push_back(right);
      }
    }
    publish_locked(std::move(next));
  }
  // Outside the mmap lock: a userfaultfd UNMAP event for this range is read by a page-server
  // thread that calls notify_external_unmap, which takes the lock.
  int err = munmap(ptr(start), size) != 0 ? errno : 0;
  invalidate_end(start, end);
  if (err) return make_error(err, "unmap: munmap failed: ", std::strerror(err));
  return {};
}

Result<void> LinuxHost::remap(Hva start, uint64_t size) {
  if (auto ok = check_range(start, size, "remap"); !ok) return ok;
  const Hva end = start + size;
  for (Hva h = start; h < end;) {
    const LinuxRegion* r = find(h);
    if (r->kind != RegionKind::kAnonymous && r->kind != RegionKind::kThp &&
        r->kind != RegionKind::kDevice) {
      return make_error(EINVAL, "remap: only anonymous, THP and device regions, not ",
                        to_string(r->kind));
    }
    h = r->end;
  }
  std::unique_lock mm(mmap_lock_);
  invalidate_start(start, end);
  int err = 0;
  for (Hva h = start; h < end && !err;) {
    const LinuxRegion* r = find(h);
    Hva stop = std::min(end, r->end);
    void* p = mmap(ptr(h), stop - h, r->prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) err = errno;
    if (!err && r->kind == RegionKind::kThp) madvise(p, stop - h, MADV_HUGEPAGE);
    if (!err && r->kind == RegionKind::kAnonymous) madvise(p, stop - h, MADV_NOHUGEPAGE);
    h = stop;
  }
  mm.unlock();
  invalidate_end(start, end);
  if (err) return make_error(err, "remap: mmap failed: ", std::strerror(err));
  return {};
}

Result<void> LinuxHost::poison(Hva start, uint64_t size) {
  if (auto ok = check_range(start, size, "poison"); !ok) return ok;
  const Hva end = start + size;
  for (Hva h = start; h < end;) {
    const LinuxRegion* r = find(h);
    if (r->kind != RegionKind::kLazy || r->lazy == nullptr) {
      return make_error(EINVAL, "poison: only userfaultfd (lazy) regions can be poisoned ",
                        "(UFFDIO_POISON); this is a ", to_string(r->kind), " region");
    }
    h = r->end;
  }
  if (auto ok = discard(start, size); !ok) return ok;
  invalidate_start(start, end);
  int err = 0;
  for (Hva h = start; h < end;) {
    const LinuxRegion* r = find(h);
    Hva stop = std::min(end, r->end);
    int e = r->lazy->poison(h, stop);
    if (e && !err) err = -e;
    h = stop;
  }
  invalidate_end(start, end);
  if (err) return make_error(err, "poison: UFFDIO_POISON failed: ", std::strerror(err));
  return {};
}

// ---------------------------------------------------------------------------------------------
// Fast path.

bool LinuxHost::get_user_page_fast_only(Hva hva, FollFlags gup_flags, Page* page) {
  const LinuxRegion* r = find(hva);
  if (r == nullptr || r->device()) {
    fast_misses_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  PageArrays& pa = *r->pages;
  const uint64_t i = pa.index(hva);
  const uint8_t need = (gup_flags & kFollWrite) ? (kPagePresent | kPageWritable) : kPagePresent;
  const uint8_t s = pa.state[i].load(std::memory_order_acquire);
  if ((s & need) != need) {
    fast_misses_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const uint64_t pfn = pa.pfn[i].load(std::memory_order_relaxed);
  pa.refs[i].fetch_add(1, std::memory_order_acq_rel);
  // An invalidation that cleared the state meanwhile wins (GUP-fast's re-check of the PTE).
  if ((pa.state[i].load(std::memory_order_acquire) & need) != need) {
    pa.refs[i].fetch_sub(1, std::memory_order_relaxed);
    fast_misses_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  *page = Page{this, Pfn(pfn), page_down(hva), (gup_flags & kFollPin) != 0};
  return true;
}

// ---------------------------------------------------------------------------------------------
// Slow path.

uint64_t LinuxHost::read_pfn(Hva hva, uint64_t* entry) {
  uint64_t e = 0;
  if (pagemap_fd_ >= 0) {
    if (pread(pagemap_fd_, &e, 8, static_cast<off_t>((hva.value >> kPageShift) * 8)) != 8) e = 0;
  }
  if (entry) *entry = e;
  if (physical_pfns_ && (e & linux_abi::kPmPresent) && (e & linux_abi::kPmPfnMask)) {
    return e & linux_abi::kPmPfnMask;
  }
  return hva.value >> kPageShift;
}

void LinuxHost::note_populated(const LinuxRegion& r, Hva hva, bool write) {
  PageArrays& pa = *r.pages;
  const Hva page = page_down(hva);
  bool writable = write;
  uint64_t entry = 0;
  uint64_t pfn;
  if (write && !physical_pfns_) {
    pfn = page.value >> kPageShift;  // no pagemap read needed
  } else {
    pfn = read_pfn(page, &entry);
  }
  if (!write && (r.vm_flags & kVmWrite) && (entry & linux_abi::kPmPresent)) {
    if (r.kind == RegionKind::kMemfdShared) {
      writable = true;  // shmem: a read fault maps a writable PTE (no write-notify)
    } else if (!r.shared() && !(entry & linux_abi::kPmFile) && (entry & linux_abi::kPmExclusive)) {
      writable = true;  // an exclusive anonymous page: written before, PTE writable
    }
  }
  uint8_t st = kPagePresent | (writable ? kPageWritable : 0);
  if (r.kind == RegionKind::kThp || r.hugetlb()) {
    // A huge mapping: every 4K page of it is present now.
    const uint64_t huge = r.kind == RegionKind::kHugetlb1G ? k1G : k2M;
    const Hva base(page.value & ~(huge - 1));
    if (base >= r.start && base + huge <= r.end &&
        (r.hugetlb() || mapping_level_locked(r, page) != PgLevel::k4K)) {
      const uint64_t first_pfn = pfn - ((page - base) >> kPageShift);
      const uint64_t i0 = pa.index(base);
      for (uint64_t k = 0; k < (huge >> kPageShift); ++k) {
        if (i0 + k == pa.index(page)) continue;
        pa.pfn[i0 + k].store(first_pfn + k, std::memory_order_relaxed);
        uint8_t old = pa.state[i0 + k].load(std::memory_order_relaxed);
        pa.state[i0 + k].store(old | st, std::memory_order_release);
      }
    }
  }
  const uint64_t i = pa.index(page);
  pa.pfn[i].store(pfn, std::memory_order_relaxed);
  pa.state[i].store(st, std::memory_order_release);
}

std::bitset<LinuxHost::kMaxWindow> LinuxHost::zero_page_candidates(const LinuxRegion& r,
                                                                   Hva start, uint64_t n,
                                                                   bool write) {
  std::bitset<kMaxWindow> fresh;
  if (!emulate_zero_page_ || write || r.kind != RegionKind::kAnonymous || n > kMaxWindow) {
    return fresh;
  }
  uint64_t entries[kMaxWindow];
  const auto want = static_cast<ssize_t>(n * 8);
  if (pagemap_fd_ < 0 || pread(pagemap_fd_, entries, static_cast<size_t>(want),
                               static_cast<off_t>((start.value >> kPageShift) * 8)) != want) {
    return fresh;
  }
  for (uint64_t k = 0; k < n; ++k) {
    if (!(entries[k] & (linux_abi::kPmPresent | linux_abi::kPmSwapped))) fresh.set(k);
  }
  return fresh;
}

void LinuxHost::keep_read_only(const LinuxRegion& r, Hva start, uint64_t n,
                               const std::bitset<kMaxWindow>& fresh) {
  if (fresh.none()) return;
  PageArrays& pa = *r.pages;
  for (uint64_t k = 0; k < n; ++k) {
    if (fresh.test(k)) {
      pa.state[pa.index(start + k * kPageSize)].fetch_and(static_cast<uint8_t>(~kPageWritable),
                                                          std::memory_order_release);
    }
  }
}

bool LinuxHost::populate_window(const LinuxRegion& r, Hva start, Hva end, bool write) {
  const uint64_t n = (end - start) >> kPageShift;
  const std::bitset<kMaxWindow> fresh = zero_page_candidates(r, start, n, write);
  if (madvise(ptr(start), end - start, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
    return false;
  }
  PageArrays& pa = *r.pages;
  uint64_t entries[512];
  const bool need_pagemap = physical_pfns_ || !write;
  if (need_pagemap) {
    const ssize_t want = static_cast<ssize_t>(n * 8);
    if (pagemap_fd_ < 0 ||
        pread(pagemap_fd_, entries, static_cast<size_t>(want),
              static_cast<off_t>((start.value >> kPageShift) * 8)) != want) {
      for (uint64_t k = 0; k < n; ++k) note_populated(r, start + k * kPageSize, write);
      keep_read_only(r, start, n, fresh);
      return true;
    }
  }
  for (uint64_t k = 0; k < n; ++k) {
    const Hva page = start + k * kPageSize;
    const uint64_t e = need_pagemap ? entries[k] : 0;
    uint64_t pfn = page.value >> kPageShift;
    if (physical_pfns_ && (e & linux_abi::kPmPresent) && (e & linux_abi::kPmPfnMask)) {
      pfn = e & linux_abi::kPmPfnMask;
    }
    bool writable = write;
    if (!write && (r.vm_flags & kVmWrite) && (e & linux_abi::kPmPresent)) {
      writable = r.kind == RegionKind::kMemfdShared ||
                 (!(e & linux_abi::kPmFile) && (e & linux_abi::kPmExclusive));
    }
    const uint64_t idx = pa.index(page);
    pa.pfn[idx].store(pfn, std::memory_order_relaxed);
    pa.state[idx].store(kPagePresent | (writable ? kPageWritable : 0), std::memory_order_release);
  }
  keep_read_only(r, start, n, fresh);
  return true;
}

namespace {

// A write window must not break CoW (or replace the zero page) under a translation nobody is
// told about: it stops at the pages around pg known present read-only (slow_get invalidates
// around such a replacement for the faulting page alone). A page made present read-only by a
// concurrent read fault after this check is replaced unannounced; its translations keep the
// hva, so they still reach the page's data (only a physical pfn label goes stale).
void clip_write_window(const PageArrays& pa, Hva pg, Hva* ws, Hva* we) {
  auto read_only = [&](Hva h) {
    const uint8_t st = pa.state[pa.index(h)].load(std::memory_order_acquire);
    return (st & kPagePresent) && !(st & kPageWritable);
  };
  for (Hva h = pg + kPageSize; h < *we; h = h + kPageSize) {
    if (read_only(h)) {
      *we = h;
      break;
    }
  }
  for (Hva h = pg; h > *ws; h = h - kPageSize) {
    if (read_only(h - kPageSize)) {
      *ws = h;
      break;
    }
  }
}

}  // namespace

bool LinuxHost::fault_around(const LinuxRegion& r, Hva pg, bool write) {
  const uint64_t max = options_.fault_around_pages;
  if (options_.fault_around == FaultAround::kFixed) {
    const uint64_t span = max * kPageSize;
    Hva ws = std::max(r.start, Hva(pg.value & ~(span - 1)));
    Hva we = std::min(r.end, Hva((pg.value & ~(span - 1)) + span));
    if (write) clip_write_window(*r.pages, pg, &ws, &we);
    if (!populate_window(r, ws, we, write)) return false;
    populated_ahead_.fetch_add(((we - ws) >> kPageShift) - 1, std::memory_order_relaxed);
    return true;
  }
  // kSequential: continue the run that expects this page, or start one with this page alone.
  PageArrays& pa = *r.pages;
  const uint64_t i = pa.index(pg);
  PageArrays::Stream* run = nullptr;
  for (PageArrays::Stream& st : pa.streams) {
    uint64_t next = st.next.load(std::memory_order_relaxed);
    if (next == i && st.next.compare_exchange_strong(next, PageArrays::kNoStream,
                                                     std::memory_order_acquire)) {
      run = &st;
      break;
    }
  }
  if (run == nullptr) {
    run = &pa.streams[pa.victim.fetch_add(1, std::memory_order_relaxed) % kFaultAroundStreams];
    run->window.store(1, std::memory_order_relaxed);
    run->next.store(i + 1, std::memory_order_release);
    return false;  // the caller populates pg alone
  }
  const uint64_t window = std::min<uint64_t>(2 * run->window.load(std::memory_order_relaxed), max);
  Hva ws = pg;
  Hva we = std::min(r.end, pg + window * kPageSize);
  if (write) clip_write_window(pa, pg, &ws, &we);
  const uint64_t n = (we - pg) >> kPageShift;
  if (!populate_window(r, pg, we, write)) {
    run->window.store(1, std::memory_order_relaxed);  // the run starts again after pg
    run->next.store(i + 1, std::memory_order_release);
    return false;
  }
  populated_ahead_.fetch_add(n - 1, std::memory_order_relaxed);
  run->window.store(static_cast<uint32_t>(window), std::memory_order_relaxed);
  run->next.store(i + n, std::memory_order_release);
  return true;
}

int LinuxHost::wait_interruptible(const LinuxRegion& r, Hva hva, bool interruptible) {
  const int sigfd = interruptible ? t_sigfd.get() : -1;
  if (r.kind == RegionKind::kLazy) return r.lazy->wait_ready(hva, sigfd);
  // File page not in the page cache: start the read, wait interruptibly until it is there.
  madvise(ptr(page_down(hva)), kPageSize, MADV_WILLNEED);
  // The signal is looked at first: a pending signal ends the wait even if the read is quick.
  for (;;) {
    pollfd p{sigfd, POLLIN, 0};
    timespec ts{0, 0};
    int n = ppoll(&p, 1, &ts, nullptr);
    if (n > 0 || (n < 0 && errno == EINTR)) return -EINTR;
    unsigned char v = 0;
    if (mincore(ptr(page_down(hva)), kPageSize, &v) != 0 || (v & 1)) return 0;
    ts = timespec{0, 100000};
    n = ppoll(&p, 1, &ts, nullptr);
    if (n > 0 || (n < 0 && errno == EINTR)) return -EINTR;
  }
}

long LinuxHost::slow_get(const LinuxRegion& r, Hva hva, FollFlags flags, Page* page) {
  const bool write = flags & kFollWrite;
  const Hva pg = page_down(hva);
  PageArrays& pa = *r.pages;
  const uint64_t i = pa.index(pg);
  const uint8_t need = write ? (kPagePresent | kPageWritable) : kPagePresent;

  if ((pa.state[i].load(std::memory_order_acquire) & need) != need) {
    // Would this fault wait (page server, file I/O)?
    bool would_wait = false;
    if (r.kind == RegionKind::kLazy) {
      would_wait = !r.lazy->page_ready(pg);
    } else if (r.file_backed()) {
      unsigned char v = 1;
      would_wait = mincore(ptr(pg), kPageSize, &v) == 0 && !(v & 1);
    }
    if (would_wait && (flags & kFollNowait)) {
      if (r.kind == RegionKind::kLazy) {
        r.lazy->request(pg);
      } else {
        madvise(ptr(pg), kPageSize, MADV_WILLNEED);  // start the read, do not wait for it
      }
      nowait_needs_io_.fetch_add(1, std::memory_order_relaxed);
      return 0;
    }
    if (would_wait && (flags & kFollInterruptible)) {
      // MADV_POPULATE waits killably only (no FOLL_INTERRUPTIBLE): wait here instead.
      const int w = wait_interruptible(r, pg, true);
      if (w == -EINTR) {
        interrupted_.fetch_add(1, std::memory_order_relaxed);
        return -EINTR;
      }
      if (w < 0) return -EFAULT;  // the page server is gone: the fault could never complete
    }
    // A write to a page known present read-only breaks CoW or replaces the zero page: the old
    // translation dies, as with the kernel's wp_page_copy.
    const uint8_t before = pa.state[i].load(std::memory_order_acquire);
    const bool replaces = write && (before & kPagePresent) && !(before & kPageWritable);
    if (replaces) invalidate_start(pg, pg + kPageSize);
    const bool done = !replaces && options_.fault_around != FaultAround::kOff &&
                      (r.kind == RegionKind::kAnonymous || r.kind == RegionKind::kMemfdShared) &&
                      fault_around(r, pg, write);
    const std::bitset<kMaxWindow> fresh = done ? std::bitset<kMaxWindow>()
                                               : zero_page_candidates(r, pg, 1, write);
    if (!done &&
        madvise(ptr(pg), kPageSize, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
      const int e = errno;
      if (replaces) invalidate_end(pg, pg + kPageSize);
      populate_errors_.fetch_add(1, std::memory_order_relaxed);
      switch (e) {
        case EHWPOISON:
          return (flags & kFollHwpoison) ? -EHWPOISON : -EFAULT;
        case EINTR:
          return -EINTR;
        case EAGAIN:
          return -EAGAIN;
        case ENOMEM:
          return -ENOMEM;
        default:  // EINVAL: PROT_NONE, write to PROT_READ, VM_PFNMAP; EFAULT: SIGBUS/SIGSEGV
          return -EFAULT;
      }
    }
    if (!done) {
      note_populated(r, pg, write);
      keep_read_only(r, pg, 1, fresh);
    }
    if (replaces) {
      invalidate_end(pg, pg + kPageSize);
      note_populated(r, pg, write);  // invalidate_end forgot it
    }
  }
  pa.refs[i].fetch_add(1, std::memory_order_acq_rel);
  *page = Page{this, Pfn(pa.pfn[i].load(std::memory_order_relaxed)), pg, (flags & kFollPin) != 0};
  return 1;
}

long LinuxHost::get_user_pages_unlocked(Hva hva, FollFlags gup_flags, Page* page) {
  slow_calls_.fetch_add(1, std::memory_order_relaxed);
  if (page == nullptr) return -EFAULT;
  const LinuxRegion* r = find(hva);
  if (r == nullptr) return -EFAULT;  // no VMA
  if (r->device()) return -EFAULT;   // VM_IO | VM_PFNMAP: GUP refuses
  const bool write = gup_flags & kFollWrite;
  if (!(r->prot & PROT_READ) || (write && !(r->prot & PROT_WRITE))) return -EFAULT;
  return slow_get(*r, hva, gup_flags, page);
}

// ---------------------------------------------------------------------------------------------
// VMA, remapped path.

void LinuxHost::mmap_read_lock() { mmap_lock_.lock_shared(); }
void LinuxHost::mmap_read_unlock() { mmap_lock_.unlock_shared(); }

std::optional<Vma> LinuxHost::vma_lookup(Hva hva) {
  const LinuxRegion* r = find(hva);
  if (!r) return std::nullopt;
  return Vma{r->start, r->end, r->vm_flags};
}

int LinuxHost::follow_pfnmap(Hva hva, PfnmapPte* pte) {
  const LinuxRegion* r = find(hva);
  if (!r || !r->device()) return -EINVAL;
  const uint64_t i = r->pages->index(hva);
  const uint8_t s = r->pages->state[i].load(std::memory_order_acquire);
  if (!(s & kPagePresent)) return -ENOENT;
  pte->pfn = Pfn(r->pages->pfn[i].load(std::memory_order_relaxed));
  pte->writable = (s & kPageWritable) != 0;
  return 0;
}

int LinuxHost::fixup_user_fault(Hva hva, bool write, bool* unlocked) {
  if (unlocked) *unlocked = false;
  const LinuxRegion* r = find(hva);
  if (!r) return -EFAULT;
  if (!(r->prot & PROT_READ) || (write && !(r->prot & PROT_WRITE))) return -EFAULT;
  const Hva pg = page_down(hva);
  // A PFNMAP PTE carries the VMA's protection from the start: populate for write if allowed.
  const bool populate_write = r->device() ? (r->prot & PROT_WRITE) != 0 : write;
  if (madvise(ptr(pg), kPageSize, populate_write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) !=
      0) {
    const int e = errno;
    if (e == EHWPOISON) return -EHWPOISON;
    if (e == EINTR) return -EINTR;
    if (e == ENOMEM) return -ENOMEM;
    return -EFAULT;
  }
  note_populated(*r, pg, populate_write);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Pages: LinuxHost's own reference accounting.

void LinuxHost::put_page(const Page& page) {
  if (page.mm != this) {
    bad_puts_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  auto try_put = [](std::atomic<uint32_t>& ref) {
    uint32_t cur = ref.load(std::memory_order_relaxed);
    while (cur > 0 && !ref.compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel)) {
    }
    return cur > 0;
  };
  if (const LinuxRegion* r = find(page.hva)) {
    if (try_put(r->pages->refs[r->pages->index(page.hva)])) return;
  }
  // The newest arrays covering the address that hold a reference (the region may be gone).
  std::lock_guard pub(publish_mu_);
  for (auto it = retired_.rbegin(); it != retired_.rend(); ++it) {
    for (const LinuxRegion& r : (*it)->regions) {
      if (!r.pages->covers(page.hva)) continue;
      if (try_put(r.pages->refs[r.pages->index(page.hva)])) return;
    }
  }
  bad_puts_.fetch_add(1, std::memory_order_relaxed);
}

void LinuxHost::set_page_dirty(const Page&) {}
void LinuxHost::mark_page_accessed(const Page&) {}
bool LinuxHost::page_reserved(const Page&) { return false; }

std::optional<Page> LinuxHost::pfn_to_refcounted_page(Pfn pfn, Hva hva) {
  const LinuxRegion* r = find(hva);
  if (!r || r->device()) return std::nullopt;  // device memory is never refcounted
  return Page{this, pfn, page_down(hva), false};
}

bool LinuxHost::get_page_unless_zero(const Page& page) {
  const LinuxRegion* r = find(page.hva);
  if (page.mm != this || !r || r->device()) return false;
  r->pages->refs[r->pages->index(page.hva)].fetch_add(1, std::memory_order_acq_rel);
  return true;
}

uint64_t LinuxHost::outstanding_refs() const {
  std::lock_guard pub(publish_mu_);
  std::vector<const PageArrays*> seen;
  uint64_t total = 0;
  for (const auto& set : retired_) {
    for (const LinuxRegion& r : set->regions) {
      const PageArrays* pa = r.pages.get();
      if (std::find(seen.begin(), seen.end(), pa) != seen.end()) continue;
      seen.push_back(pa);
      for (uint64_t i = 0; i < pa->npages; ++i) {
        total += pa->refs[i].load(std::memory_order_relaxed);
      }
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Signals, mapping level, kmap, notifiers.

bool LinuxHost::signal_pending() { return any_blocked_signal_pending(); }
bool LinuxHost::fatal_signal_pending() { return false; }

PgLevel LinuxHost::mapping_level_locked(const LinuxRegion& r, Hva hva) {
  if (r.kind == RegionKind::kHugetlb2M) return PgLevel::k2M;
  if (r.kind == RegionKind::kHugetlb1G) return PgLevel::k1G;
  if (r.kind != RegionKind::kThp && r.kind != RegionKind::kAnonymous &&
      r.kind != RegionKind::kMemfdShared) {
    return PgLevel::k4K;
  }
  // An anonymous region LinuxHost created is MADV_NOHUGEPAGE (create_region): the kernel never
  // maps it with a PMD, so the answer needs no PAGEMAP_SCAN (a system call on every 4K fault).
  if (r.kind == RegionKind::kAnonymous && r.owned) return PgLevel::k4K;
  const Hva base(hva.value & ~(k2M - 1));
  if (base < r.start || base + k2M > r.end || pagemap_fd_ < 0) return PgLevel::k4K;
  if (has_pagemap_scan_) {
    linux_abi::PageRegion vec[2];
    linux_abi::PmScanArg arg{};
    arg.size = sizeof arg;
    arg.start = base.value;
    arg.end = base.value + k2M;
    arg.vec = reinterpret_cast<uint64_t>(vec);
    arg.vec_len = 2;
    arg.category_mask = linux_abi::kPageIsHuge | linux_abi::kPageIsPresent;
    arg.return_mask = linux_abi::kPageIsHuge | linux_abi::kPageIsPresent;
    long n = ioctl(pagemap_fd_, linux_abi::kPagemapScan, &arg);
    if (n == 1 && vec[0].start == base.value && vec[0].end == base.value + k2M) {
      return PgLevel::k2M;
    }
    return PgLevel::k4K;
  }
  // Fallback: the frame is a THP and the 2M block maps one aligned, contiguous compound page.
  if (!physical_pfns_ || kpageflags_fd_ < 0) return PgLevel::k4K;
  uint64_t e0 = 0;
  uint64_t pfn0 = read_pfn(base, &e0);
  if (!(e0 & linux_abi::kPmPresent) || (pfn0 & 511)) return PgLevel::k4K;
  uint64_t flags = 0;
  if (pread(kpageflags_fd_, &flags, 8, static_cast<off_t>(pfn0 * 8)) != 8 ||
      !(flags & linux_abi::kKpfThp)) {
    return PgLevel::k4K;
  }
  uint64_t e1 = 0;
  uint64_t pfn1 = read_pfn(base + (k2M - kPageSize), &e1);
  return ((e1 & linux_abi::kPmPresent) && pfn1 == pfn0 + 511) ? PgLevel::k2M : PgLevel::k4K;
}

PgLevel LinuxHost::host_mapping_level(Hva hva) {
  const LinuxRegion* r = find(hva);
  if (!r) return PgLevel::k4K;
  return mapping_level_locked(*r, hva);
}

std::byte* LinuxHost::page_address(Pfn, Hva hva) {
  const LinuxRegion* r = find(hva);
  if (!r || !(r->prot & PROT_READ)) return nullptr;
  return reinterpret_cast<std::byte*>(page_down(hva).value);
}

void LinuxHost::register_notifier(MmuNotifier* notifier) {
  if (!notifier) return;
  std::lock_guard lk(notifier_mu_);
  if (std::find(notifiers_.begin(), notifiers_.end(), notifier) == notifiers_.end()) {
    notifiers_.push_back(notifier);
  }
}

void LinuxHost::unregister_notifier(MmuNotifier* notifier) {
  std::lock_guard lk(notifier_mu_);
  notifiers_.erase(std::remove(notifiers_.begin(), notifiers_.end(), notifier), notifiers_.end());
}

}  // namespace gfnmap
