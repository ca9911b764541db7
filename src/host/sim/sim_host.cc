// gfnmap host/sim: SimHost, the deterministic host-MM model: VMAs, faults (zero page, CoW,
// page cache, swap, hugepages), GUP return codes, PFNMAP PTEs, notifiers and injections.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "sched/sched_hooks.h"
#include "sim_host_impl.h"

namespace gfnmap {

using detail::align_down;
using detail::align_up;
using detail::Blob;
using detail::File;
using detail::Frame;
using detail::kFaultNeedsIo;
using detail::page_no;
using detail::Pte;
using detail::Range;
using detail::VmaRec;
using State = PteInfo::State;

namespace {

// Nesting depth of notifier callbacks on this thread (unregister from inside must not wait).
thread_local int t_in_callback = 0;

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// VmaRec

uint32_t detail::VmaRec::vm_flags() const {
  uint32_t f = 0;
  if (has(prot, Prot::kRead)) f |= kVmRead;
  if (has(prot, Prot::kWrite)) f |= kVmWrite;
  if (has(prot, Prot::kExec)) f |= kVmExec;
  if (kind == VmaKind::kAnonShared || kind == VmaKind::kFileShared || kind == VmaKind::kPfnmap) {
    f |= kVmShared;
  }
  if (kind == VmaKind::kPfnmap) f |= kVmPfnmap | (vm_io ? kVmIo : 0);
  if (is_hugetlb()) f |= kVmHugetlb;
  return f;
}

uint64_t detail::VmaRec::huge_size() const {
  switch (backing) {
    case PageBacking::kThp:
    case PageBacking::kHugetlb2M:
      return k2M;
    case PageBacking::kHugetlb1G:
      return k1G;
    case PageBacking::k4K:
      break;
  }
  return kPageSize;
}

// ---------------------------------------------------------------------------------------------
// Impl: state helpers

SimHost::Impl::Impl(SimHost& s, SimHostConfig config) : self(s), cfg(config) {
  next_hva = align_up(cfg.hva_base.value, kPageSize);
  zero_data = detail::new_page_data();
  std::memset(zero_data.get(), 0, kPageSize);
  Frame zero;
  zero.kind = FrameKind::kZero;
  zero.refcount = 1;
  zero.reserved = true;
  frames.push_back(std::move(zero));
}

void SimHost::Impl::violate_locked(std::string what) {
  ++violation_count;
  if (violation_list.size() < 256) violation_list.push_back(SimViolation{std::move(what)});
}

VmaRec* SimHost::Impl::find_vma_locked(uint64_t addr) {
  auto it = vmas.upper_bound(addr);
  if (it == vmas.begin()) return nullptr;
  --it;
  return it->second.contains(addr) ? &it->second : nullptr;
}

const VmaRec* SimHost::Impl::find_vma_locked(uint64_t addr) const {
  return const_cast<Impl*>(this)->find_vma_locked(addr);
}

bool SimHost::Impl::any_vma_in_locked(uint64_t start, uint64_t end) const {
  auto it = vmas.upper_bound(start);
  if (it != vmas.begin() && std::prev(it)->second.end > start) return true;
  return it != vmas.end() && it->first < end;
}

bool SimHost::Impl::fully_mapped_locked(uint64_t start, uint64_t end) const {
  uint64_t a = start;
  while (a < end) {
    const VmaRec* v = find_vma_locked(a);
    if (!v) return false;
    a = v->end;
  }
  return true;
}

void SimHost::Impl::split_vma_locked(uint64_t addr) {
  VmaRec* v = find_vma_locked(addr);
  if (!v || v->start == addr) return;
  VmaRec tail = *v;
  tail.start = addr;
  tail.file_off += addr - v->start;
  if (tail.kind == VmaKind::kPfnmap) tail.device_pfn += page_no(addr - v->start);
  v->end = addr;
  vmas.emplace(addr, tail);
}

Frame* SimHost::Impl::frame_locked(uint64_t pfn) {
  if (pfn < cfg.first_pfn || pfn - cfg.first_pfn >= frames.size()) return nullptr;
  return &frames[pfn - cfg.first_pfn];
}

const Frame* SimHost::Impl::frame_locked(uint64_t pfn) const {
  return const_cast<Impl*>(this)->frame_locked(pfn);
}

uint64_t SimHost::Impl::alloc_frames_locked(uint64_t n, uint64_t align_pages, FrameKind kind) {
  uint64_t pfn = cfg.first_pfn + frames.size();
  uint64_t aligned = align_up(pfn, align_pages);
  while (pfn < aligned) {  // holes keep huge folios naturally aligned
    Frame hole;
    hole.kind = FrameKind::kHole;
    hole.has_struct_page = false;
    hole.freed = true;
    frames.push_back(std::move(hole));
    ++pfn;
  }
  for (uint64_t i = 0; i < n; ++i) {
    Frame f;
    f.kind = kind;
    frames.push_back(std::move(f));
  }
  return aligned;
}

std::byte* SimHost::Impl::data_locked(Frame& f) {
  if (f.kind == FrameKind::kZero) return zero_data.get();
  if (!f.data) {
    if (!data_pool.empty()) {
      f.data = std::move(data_pool.back());
      data_pool.pop_back();
    } else {
      f.data = detail::new_page_data();
    }
    std::memset(f.data.get(), 0, kPageSize);
  }
  return f.data.get();
}

void SimHost::Impl::free_frame_locked(Frame& f) {
  f.freed = true;
  // Buffers are recycled, never released: a stale page_address() pointer stays dereferenceable.
  if (f.data) data_pool.push_back(std::move(f.data));
}

void SimHost::Impl::ref_locked(uint64_t pfn) {
  if (Frame* f = frame_locked(pfn)) ++f->refcount;
}

void SimHost::Impl::unref_locked(uint64_t pfn) {
  Frame* f = frame_locked(pfn);
  if (!f) return;
  if (f->refcount <= 0) {
    violate_locked("refcount underflow on pfn " + hex(pfn));
    return;
  }
  if (--f->refcount == 0 && !f->poisoned &&
      (f->kind == FrameKind::kAnon || f->kind == FrameKind::kPageCache)) {
    free_frame_locked(*f);
  }
}

void SimHost::Impl::clear_pte_locked(uint64_t page) {
  auto it = ptes.find(page);
  if (it == ptes.end()) return;
  if (it->second.counted) unref_locked(it->second.pfn);
  ptes.erase(it);
}

void SimHost::Impl::map_pte_locked(uint64_t page, uint64_t pfn, bool writable, bool dirty,
                                   bool counted) {
  clear_pte_locked(page);
  Pte p;
  p.state = State::kPresent;
  p.pfn = pfn;
  p.writable = writable;
  p.young = true;
  p.dirty = dirty;
  p.counted = counted;
  if (counted) ref_locked(pfn);
  ptes[page] = std::move(p);
}

Blob SimHost::Impl::save_data_locked(Frame& f) {
  if (!f.data) return nullptr;
  auto blob = std::make_shared<std::vector<std::byte>>(f.data.get(), f.data.get() + kPageSize);
  return blob;
}

void SimHost::Impl::grab_locked(uint64_t pfn, uint64_t addr, bool pin, Page* out) {
  Frame* f = frame_locked(pfn);
  ++f->refcount;
  if (pin) {
    ++f->held_pins;
  } else {
    ++f->held_refs;
  }
  ++outstanding;
  *out = Page{&self, Pfn(pfn), Hva(align_down(addr, kPageSize)), pin};
}

SignalState SimHost::Impl::signal_locked() const {
  auto it = thread_signals.find(std::this_thread::get_id());
  return it != thread_signals.end() ? it->second : signal;
}

std::optional<PgLevel> SimHost::Impl::huge_level_locked(uint64_t addr,
                                                         uint64_t* region_start) const {
  for (uint64_t size : {detail::k2M, detail::k1G}) {
    auto it = huge.find(align_down(addr, size));
    if (it != huge.end() && pg_level_pages(it->second) * kPageSize == size) {
      if (region_start) *region_start = it->first;
      return it->second;
    }
  }
  return std::nullopt;
}

void SimHost::Impl::split_thp_locked(uint64_t start, uint64_t end) {
  for (auto it = huge.lower_bound(align_down(start, detail::k1G)); it != huge.end();) {
    uint64_t rs = it->first;
    uint64_t re = rs + pg_level_pages(it->second) * kPageSize;
    if (rs >= end) break;
    const VmaRec* v = find_vma_locked(rs);
    bool thp = v && v->backing == PageBacking::kThp;
    bool partial = re > start && (rs < start || re > end);
    it = (thp && partial) ? huge.erase(it) : std::next(it);
  }
}

void SimHost::Impl::forget_huge_in_locked(uint64_t start, uint64_t end) {
  for (auto it = huge.lower_bound(start); it != huge.end() && it->first < end;) {
    uint64_t re = it->first + pg_level_pages(it->second) * kPageSize;
    it = re <= end ? huge.erase(it) : std::next(it);
  }
}

Range SimHost::Impl::notify_range_locked(uint64_t start, uint64_t end) const {
  Range r{start, end};
  for (auto it = huge.lower_bound(align_down(start, detail::k1G)); it != huge.end(); ++it) {
    uint64_t rs = it->first;
    uint64_t re = rs + pg_level_pages(it->second) * kPageSize;
    if (rs >= end) break;
    if (re > start) {
      r.start = std::min(r.start, rs);
      r.end = std::max(r.end, re);
    }
  }
  return r;
}

bool SimHost::Impl::cuts_hugetlb_locked(uint64_t start, uint64_t end) const {
  for (uint64_t a : {start, end}) {
    const VmaRec* v = find_vma_locked(a);
    if (v && v->is_hugetlb() && a != v->start && (a % v->huge_size()) != 0) return true;
  }
  // The end may fall exactly at a VMA boundary (fine) or inside one (checked above).
  return false;
}

Result<uint64_t> SimHost::Impl::place_locked(uint64_t size, uint64_t align,
                                             std::optional<Hva> fixed) {
  if (fixed) {
    uint64_t s = fixed->value;
    if (s % align) return make_error(EINVAL, "fixed address ", hex(s), " is not aligned to ",
                                      hex(align));
    if (s + size < s || s + size > detail::kTaskLimit) {
      return make_error(ENOMEM, "fixed range beyond the user address space");
    }
    if (any_vma_in_locked(s, s + size)) {
      return make_error(EEXIST, "fixed range [", hex(s), ", ", hex(s + size),
                        ") overlaps a mapping");
    }
    return s;
  }
  uint64_t s = align_up(next_hva, align);
  for (;;) {
    if (s + size < s || s + size > detail::kTaskLimit) {
      return make_error(ENOMEM, "model address space exhausted");
    }
    if (!any_vma_in_locked(s, s + size)) break;
    // Skip past whatever is in the way.
    auto it = vmas.upper_bound(s + size - 1);
    s = align_up(std::prev(it)->second.end + kPageSize, align);
  }
  next_hva = s + size + kPageSize;  // one unmapped guard page after every VMA
  return s;
}

// ---------------------------------------------------------------------------------------------
// Notifiers

SimHost::Impl::Subscribers SimHost::Impl::acquire_subscribers() {
  std::lock_guard l(nmu);
  Subscribers s{notifiers, next_ticket++};
  active_tickets.insert(s.ticket);
  return s;
}

void SimHost::Impl::release_subscribers(const Subscribers& s) {
  std::lock_guard l(nmu);
  active_tickets.erase(active_tickets.find(s.ticket));
  ncv.notify_all();
}

namespace {

// Sorted, with overlapping and touching ranges merged: one bracket per distinct span (a hugetlb
// poison reaches every PTE of the huge page, each widened to the same 2M range).
std::vector<Range> merge_ranges(std::vector<Range> ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.start < b.start; });
  std::vector<Range> out;
  for (const Range& r : ranges) {
    if (r.start >= r.end) continue;
    if (!out.empty() && r.start <= out.back().end) {
      out.back().end = std::max(out.back().end, r.end);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

}  // namespace

template <class F>
void SimHost::Impl::invalidate(const std::vector<Range>& unmerged, F&& change) {
  const std::vector<Range> ranges = merge_ranges(unmerged);
  Subscribers s = acquire_subscribers();
  ++t_in_callback;
  for (const Range& r : ranges) {
    for (MmuNotifier* n : s.list) n->invalidate_range_start(Hva(r.start), Hva(r.end));
  }
  --t_in_callback;
  GFNMAP_YIELD("host.inv.started");
  {
    std::lock_guard l(mu);
    counts.invalidations += ranges.size();
    change();
  }
  GFNMAP_YIELD("host.inv.changed");
  ++t_in_callback;
  for (const Range& r : ranges) {
    for (MmuNotifier* n : s.list) n->invalidate_range_end(Hva(r.start), Hva(r.end));
  }
  --t_in_callback;
  release_subscribers(s);
}

// ---------------------------------------------------------------------------------------------
// Faults

long SimHost::Impl::fault_page(uint64_t addr, bool write, bool nowait, bool hwpoison, bool pin,
                               Page* out) {
  addr = align_down(addr, kPageSize);
  const uint64_t pg = page_no(addr);
  for (int attempt = 0; attempt < 64; ++attempt) {
    std::unique_lock l(mu);
    VmaRec* v = find_vma_locked(addr);
    if (!v) return -EFAULT;
    if (v->kind == VmaKind::kPfnmap) return -EFAULT;  // GUP never follows raw PFNMAP PTEs
    auto it = ptes.find(pg);
    Pte* p = it == ptes.end() ? nullptr : &it->second;

    if (p && p->state == State::kHwpoison) return hwpoison ? -EHWPOISON : -EFAULT;
    if (p && p->state == State::kPresent) {
      Frame* f = frame_locked(p->pfn);
      if (f->poisoned) return hwpoison ? -EHWPOISON : -EFAULT;
      const bool zero = f->kind == FrameKind::kZero;
      // FOLL_PIN of a CoW-shared anonymous page for reading unshares it (GUP-triggered
      // unshare): the pin must not see a page a write fault would replace.
      const bool unshare = !write && pin && p->cow;
      if (!write && !unshare) {
        p->young = true;
        if (out) grab_locked(p->pfn, addr, pin, out);
        return 0;
      }
      if (write && p->writable) {
        p->young = p->dirty = true;
        if (out) grab_locked(p->pfn, addr, pin, out);
        return 0;
      }
      const bool copy = unshare || p->cow || zero ||
                        (f->kind == FrameKind::kPageCache && v->kind == VmaKind::kFilePrivate);
      ++counts.faults;
      if (!copy) {
        // Exclusive page or shared-file page that was write-protected: reuse in place. A
        // hugetlb page, like a THP still mapped huge, is one PTE in Linux: all its 4K entries
        // become writable together (a huge mapping never mixes permissions).
        uint64_t hs = v->is_hugetlb() ? v->huge_size() : 0;
        for (uint64_t size : {detail::k1G, detail::k2M}) {
          auto h = hs ? huge.end() : huge.find(align_down(addr, size));
          if (h != huge.end() && pg_level_pages(h->second) * kPageSize == size) hs = size;
        }
        if (hs) {
          const uint64_t first = page_no(align_down(addr, hs));
          for (auto hit = ptes.lower_bound(first);
               hit != ptes.end() && hit->first < first + hs / kPageSize; ++hit) {
            if (hit->second.state == State::kPresent) hit->second.writable = true;
          }
        }
        p->writable = p->young = p->dirty = true;
        continue;
      }
      if (v->is_hugetlb()) return -EFAULT;  // hugetlb CoW is not modelled
      // CoW break (or unshare): a new frame replaces the mapped one, inside an invalidation.
      const uint64_t old_pfn = p->pfn;
      l.unlock();
      invalidate({Range{addr, addr + kPageSize}}, [&] {
        auto it2 = ptes.find(pg);
        if (it2 == ptes.end() || it2->second.state != State::kPresent ||
            it2->second.pfn != old_pfn || (it2->second.writable && !unshare)) {
          return;  // changed meanwhile: re-evaluate
        }
        // A THP region stops being huge-mapped once one page is replaced.
        split_thp_locked(addr, addr + kPageSize);
        uint64_t npfn = alloc_frames_locked(1, 1, FrameKind::kAnon);
        Frame& nf = *frame_locked(npfn);
        Frame& of = *frame_locked(old_pfn);
        if (of.data || of.kind == FrameKind::kZero) {
          std::memcpy(data_locked(nf), data_locked(of), kPageSize);
        }
        map_pte_locked(pg, npfn, !unshare, !unshare, true);
        ++counts.cow_breaks;
      });
      continue;
    }

    // No PTE (or a swap entry): bring a page in.
    ++counts.faults;
    if (v->is_hugetlb()) {
      const uint64_t hs = v->huge_size();
      const uint64_t rs = align_down(addr, hs);
      const uint64_t n = hs / kPageSize;
      uint64_t base = alloc_frames_locked(n, n, FrameKind::kAnon);
      // A private hugetlb read fault maps read-only (no zero page: a fresh page); the first
      // write makes it writable in place. A shared one maps writable.
      const bool w = has(v->prot, Prot::kWrite) && (write || v->kind == VmaKind::kAnonShared);
      for (uint64_t i = 0; i < n; ++i) {
        if (ptes.count(page_no(rs) + i)) continue;
        map_pte_locked(page_no(rs) + i, base + i, w, write, true);
      }
      // The frames not mapped above (none, normally) go back.
      for (uint64_t i = 0; i < n; ++i) {
        Frame& f = *frame_locked(base + i);
        if (f.refcount == 0) free_frame_locked(f);
      }
      huge[rs] = hs == detail::k1G ? PgLevel::k1G : PgLevel::k2M;
      continue;
    }

    if (v->kind == VmaKind::kAnonPrivate) {
      if (p && p->state == State::kSwapped) {
        if (nowait) return kFaultNeedsIo;
        Blob data = std::move(p->swap);
        uint64_t npfn = alloc_frames_locked(1, 1, FrameKind::kAnon);
        if (data) std::memcpy(data_locked(*frame_locked(npfn)), data->data(), kPageSize);
        ptes.erase(pg);
        // do_swap_page: an exclusive page comes back writable when the VMA allows writes.
        map_pte_locked(pg, npfn, has(v->prot, Prot::kWrite), write, true);
        ++counts.page_ins;
        continue;
      }
      if (!write && cfg.zero_page) {
        map_pte_locked(pg, cfg.first_pfn, false, false, true);
        ++counts.zero_page_maps;
        continue;
      }
      // A write, or a read on a host without the zero page: a fresh exclusive page (a THP where
      // the range allows), writable when the VMA allows, dirty only when written.
      const uint64_t rs = align_down(addr, detail::k2M);
      if (v->backing == PageBacking::kThp && rs >= v->start && rs + detail::k2M <= v->end) {
        auto first = ptes.lower_bound(page_no(rs));
        if (first == ptes.end() || first->first >= page_no(rs + detail::k2M)) {
          const uint64_t n = detail::k2M / kPageSize;
          uint64_t base = alloc_frames_locked(n, n, FrameKind::kAnon);
          for (uint64_t i = 0; i < n; ++i) {
            map_pte_locked(page_no(rs) + i, base + i, has(v->prot, Prot::kWrite), write, true);
          }
          huge[rs] = PgLevel::k2M;
          continue;
        }
      }
      uint64_t npfn = alloc_frames_locked(1, 1, FrameKind::kAnon);
      map_pte_locked(pg, npfn, has(v->prot, Prot::kWrite), write, true);
      continue;
    }

    // File-backed: find the page in the file's cache or read it in.
    File& file = files[v->file];
    const uint64_t idx = v->file_index(addr);
    if (idx >= file.npages) return -EFAULT;  // beyond EOF: SIGBUS
    uint64_t cpfn;
    auto cit = file.cache.find(idx);
    if (cit != file.cache.end()) {
      cpfn = cit->second;
    } else {
      auto dit = file.disk.find(idx);
      const bool needs_io = !file.memfd || dit != file.disk.end();
      if (needs_io && nowait) return kFaultNeedsIo;
      cpfn = alloc_frames_locked(1, 1, FrameKind::kPageCache);
      Frame& cf = *frame_locked(cpfn);
      cf.refcount = 1;  // the page cache's reference
      if (dit != file.disk.end()) {
        if (dit->second) std::memcpy(data_locked(cf), dit->second->data(), kPageSize);
        file.disk.erase(dit);
      }
      file.cache[idx] = cpfn;
      if (needs_io) ++counts.page_ins;
    }
    if (frame_locked(cpfn)->poisoned) return hwpoison ? -EHWPOISON : -EFAULT;
    if (v->kind == VmaKind::kFilePrivate) {
      map_pte_locked(pg, cpfn, false, false, true);  // a write re-faults and copies
    } else {
      const bool w = has(v->prot, Prot::kWrite) && (write || !v->writenotify);
      map_pte_locked(pg, cpfn, w, write, true);
    }
  }
  return -EFAULT;
}

// ---------------------------------------------------------------------------------------------
// SimHost: construction, setup

SimHost::SimHost(SimHostConfig config) : impl_(std::make_unique<Impl>(*this, config)) {}
SimHost::~SimHost() = default;

namespace {

Result<void> check_range(Hva hva, uint64_t len, uint64_t* start, uint64_t* end) {
  if (hva.value % kPageSize) {
    return make_error(EINVAL, "address ", hex(hva.value), " is not page aligned");
  }
  if (len == 0) return make_error(EINVAL, "length 0");
  uint64_t e = align_up(hva.value + len, kPageSize);
  if (e <= hva.value || e > detail::kTaskLimit) {
    return make_error(EINVAL, "range [", hex(hva.value), ", +", hex(len), ") overflows");
  }
  *start = hva.value;
  *end = e;
  return {};
}

Error deadlock_error() {
  return make_error(EDEADLK, "this thread holds the model mmap lock shared");
}

// Exclusive mmap-lock hold for setup calls.
class WriteHold {
 public:
  explicit WriteHold(detail::MmapLock& lock) : lock_(lock), ok_(lock.lock()) {}
  ~WriteHold() {
    if (ok_) lock_.unlock();
  }
  WriteHold(const WriteHold&) = delete;
  WriteHold& operator=(const WriteHold&) = delete;
  bool ok() const { return ok_; }

 private:
  detail::MmapLock& lock_;
  bool ok_;
};

}  // namespace

Result<FileId> SimHost::create_memfd(uint64_t size) {
  if (size == 0) return make_error(EINVAL, "memfd size 0");
  std::lock_guard l(impl_->mu);
  FileId id = impl_->next_file++;
  File& f = impl_->files[id];
  f.memfd = true;
  f.npages = align_up(size, kPageSize) / kPageSize;
  return id;
}

Result<FileId> SimHost::create_file(uint64_t size, bool resident) {
  if (size == 0) return make_error(EINVAL, "file size 0");
  std::lock_guard l(impl_->mu);
  FileId id = impl_->next_file++;
  File& f = impl_->files[id];
  f.memfd = false;
  f.npages = align_up(size, kPageSize) / kPageSize;
  if (resident) {
    uint64_t base = impl_->alloc_frames_locked(f.npages, 1, FrameKind::kPageCache);
    for (uint64_t i = 0; i < f.npages; ++i) {
      impl_->frame_locked(base + i)->refcount = 1;
      f.cache[i] = base + i;
    }
  }
  return id;
}

Result<Hva> SimHost::mmap(uint64_t size, Prot prot, VmaKind kind, const MmapOptions& options) {
  if (size == 0) return make_error(EINVAL, "mmap of 0 bytes");
  if (static_cast<uint32_t>(prot) & ~7u) return make_error(EINVAL, "unknown prot bits");
  VmaRec v;
  v.prot = prot;
  v.kind = kind;
  v.backing = options.backing;
  const bool hugetlb = v.is_hugetlb();
  if (options.backing == PageBacking::kThp && kind != VmaKind::kAnonPrivate) {
    return make_error(EINVAL, "THP is modelled for anonymous private VMAs only");
  }
  if (hugetlb && kind != VmaKind::kAnonPrivate && kind != VmaKind::kAnonShared) {
    return make_error(EINVAL, "hugetlb is modelled for anonymous VMAs only");
  }
  if (hugetlb && options.file) return make_error(EINVAL, "hugetlb VMAs cannot map a file");
  if (options.file_offset % kPageSize) return make_error(EINVAL, "file offset not page aligned");
  if (kind == VmaKind::kPfnmap && options.file) return make_error(EINVAL, "PFNMAP maps no file");
  const uint64_t align = v.huge_size();
  size = align_up(size, align);
  if (size == 0) return make_error(EINVAL, "mmap size overflows");

  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  std::lock_guard l(impl_->mu);
  Impl& im = *impl_;
  if (v.file_backed() && !hugetlb) {
    if (options.file) {
      auto it = im.files.find(options.file);
      if (it == im.files.end()) return make_error(ENOENT, "no file ", options.file);
      if (kind == VmaKind::kAnonShared && !it->second.memfd) {
        return make_error(EINVAL, "anon-shared VMAs map a memfd, not a disk file");
      }
      v.file = options.file;
    } else {
      v.file = im.next_file++;
      File& f = im.files[v.file];
      f.memfd = kind == VmaKind::kAnonShared;
      f.npages = (options.file_offset + size) / kPageSize;
      if (!f.memfd && options.page_cache_resident) {
        uint64_t base = im.alloc_frames_locked(f.npages, 1, FrameKind::kPageCache);
        for (uint64_t i = 0; i < f.npages; ++i) {
          im.frame_locked(base + i)->refcount = 1;
          f.cache[i] = base + i;
        }
      }
    }
    v.file_off = options.file_offset;
    v.writenotify = kind == VmaKind::kFileShared && options.writenotify;
  }
  Result<uint64_t> start = im.place_locked(size, align, options.fixed);
  if (!start) return start.error();
  v.start = *start;
  v.end = *start + size;
  if (kind == VmaKind::kPfnmap) {
    const uint64_t n = size / kPageSize;
    v.device_pfn = im.alloc_frames_locked(n, 1, FrameKind::kDevice);
    v.pfnmap_backing = options.pfnmap_backing;
    v.vm_io = options.vm_io;
    v.ptes_writable = options.ptes_writable;
    for (uint64_t i = 0; i < n; ++i) {
      Frame& f = *im.frame_locked(v.device_pfn + i);
      switch (options.pfnmap_backing) {
        case PfnmapBacking::kRefcounted:
          f.refcount = 1;
          break;
        case PfnmapBacking::kRefcountZero:
          f.refcount = 0;
          break;
        case PfnmapBacking::kReserved:
          f.refcount = 1;
          f.reserved = true;
          break;
        case PfnmapBacking::kNoStructPage:
          f.has_struct_page = false;
          break;
      }
      if (options.ptes_present) {
        im.map_pte_locked(page_no(v.start) + i, v.device_pfn + i,
                          options.ptes_writable && has(prot, Prot::kWrite), false, false);
      }
    }
  }
  im.vmas.emplace(v.start, v);
  return Hva(v.start);
}

Result<void> SimHost::Impl::munmap_excl(uint64_t start, uint64_t end) {
  std::vector<Range> ranges;
  {
    std::lock_guard l(mu);
    if (cuts_hugetlb_locked(start, end)) {
      return make_error(EINVAL, "range cuts a hugetlb page");
    }
    if (!any_vma_in_locked(start, end)) return {};
    ranges.push_back(notify_range_locked(start, end));
  }
  invalidate(ranges, [&] {
    split_vma_locked(start);
    split_vma_locked(end);
    for (auto it = vmas.lower_bound(start); it != vmas.end() && it->first < end;) {
      it = vmas.erase(it);
    }
    split_thp_locked(start, end);
    forget_huge_in_locked(start, end);
    for (auto it = ptes.lower_bound(page_no(start));
         it != ptes.end() && it->first < page_no(end);) {
      if (it->second.counted) unref_locked(it->second.pfn);
      it = ptes.erase(it);
    }
  });
  return {};
}

Result<void> SimHost::munmap(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  return impl_->munmap_excl(start, end);
}

Result<void> SimHost::mprotect(Hva hva, uint64_t len, Prot prot) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  if (static_cast<uint32_t>(prot) & ~7u) return make_error(EINVAL, "unknown prot bits");
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    if (!im.fully_mapped_locked(start, end)) {
      return make_error(ENOMEM, "[", hex(start), ", ", hex(end), ") is not fully mapped");
    }
    if (im.cuts_hugetlb_locked(start, end)) return make_error(EINVAL, "range cuts a hugetlb page");
    ranges.push_back(im.notify_range_locked(start, end));
  }
  im.invalidate(ranges, [&] {
    im.split_vma_locked(start);
    im.split_vma_locked(end);
    for (auto it = im.vmas.lower_bound(start); it != im.vmas.end() && it->first < end; ++it) {
      it->second.prot = prot;
    }
    im.split_thp_locked(start, end);
    if (!has(prot, Prot::kWrite)) {
      for (auto it = im.ptes.lower_bound(page_no(start));
           it != im.ptes.end() && it->first < page_no(end); ++it) {
        it->second.writable = false;
      }
    }
  });
  return {};
}

Result<Hva> SimHost::mremap(Hva old_hva, uint64_t old_len, uint64_t new_len,
                            std::optional<Hva> new_hva) {
  uint64_t os, oe;
  if (Result<void> r = check_range(old_hva, old_len, &os, &oe); !r) return r.error();
  if (new_len == 0) return make_error(EINVAL, "new length 0");
  new_len = align_up(new_len, kPageSize);
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  VmaRec moved;
  {
    std::lock_guard l(im.mu);
    const VmaRec* v = im.find_vma_locked(os);
    if (!v || oe > v->end) {
      return make_error(EFAULT, "[", hex(os), ", ", hex(oe), ") is not inside one VMA");
    }
    moved = *v;
    const uint64_t hs = v->huge_size();
    if (v->is_hugetlb() && (os % hs || oe % hs || new_len % hs)) {
      return make_error(EINVAL, "hugetlb mremap must be huge-page aligned");
    }
    if (new_len > oe - os && (v->kind == VmaKind::kPfnmap)) {
      return make_error(EFAULT, "VM_PFNMAP mappings cannot grow (VM_DONTEXPAND)");
    }
    if (new_hva) {
      uint64_t ns = new_hva->value;
      if (ns % (v->is_hugetlb() ? hs : kPageSize)) return make_error(EINVAL, "new address unaligned");
      if (ns < oe && os < ns + new_len) return make_error(EINVAL, "new range overlaps the old one");
    }
  }
  if (!new_hva && new_len <= oe - os) {  // shrink in place
    if (new_len < oe - os) {
      if (Result<void> r = im.munmap_excl(os + new_len, oe); !r) return r.error();
    }
    return Hva(os);
  }
  uint64_t ns = 0;
  if (new_hva) {
    ns = new_hva->value;
    if (Result<void> r = im.munmap_excl(ns, ns + new_len); !r) return r.error();  // MREMAP_FIXED
  }
  {
    std::lock_guard l(im.mu);
    Result<uint64_t> placed = im.place_locked(new_len, moved.huge_size(),
                                              new_hva ? std::optional<Hva>(Hva(ns)) : std::nullopt);
    if (!placed) return placed.error();
    ns = *placed;
  }
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    ranges.push_back(im.notify_range_locked(os, oe));
  }
  im.invalidate(ranges, [&] {
    im.split_vma_locked(os);
    im.split_vma_locked(oe);
    auto vit = im.vmas.find(os);
    VmaRec v = vit->second;
    im.vmas.erase(vit);
    const uint64_t keep = std::min(new_len, oe - os);
    // Move PTEs; those beyond the new length are unmapped.
    std::vector<std::pair<uint64_t, Pte>> moved_ptes;
    for (auto it = im.ptes.lower_bound(page_no(os));
         it != im.ptes.end() && it->first < page_no(oe);) {
      uint64_t off = (it->first - page_no(os)) * kPageSize;
      if (off < keep) {
        moved_ptes.emplace_back(page_no(ns + off), std::move(it->second));
      } else if (it->second.counted) {
        im.unref_locked(it->second.pfn);
      }
      it = im.ptes.erase(it);
    }
    for (auto& [pg, pte] : moved_ptes) im.ptes[pg] = std::move(pte);
    // Huge mappings move when the new place keeps their alignment, else they are split.
    std::vector<std::pair<uint64_t, PgLevel>> moved_huge;
    for (auto it = im.huge.lower_bound(os); it != im.huge.end() && it->first < oe;) {
      uint64_t size = pg_level_pages(it->second) * kPageSize;
      uint64_t off = it->first - os;
      if ((ns + off) % size == 0 && off + size <= keep) moved_huge.emplace_back(ns + off, it->second);
      it = im.huge.erase(it);
    }
    for (auto& [a, lvl] : moved_huge) im.huge[a] = lvl;
    v.start = ns;
    v.end = ns + new_len;
    im.vmas.emplace(ns, v);
  });
  return Hva(ns);
}

Result<void> SimHost::discard(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    if (!im.fully_mapped_locked(start, end)) {
      return make_error(ENOMEM, "[", hex(start), ", ", hex(end), ") is not fully mapped");
    }
    for (uint64_t a = start; a < end;) {
      const VmaRec* v = im.find_vma_locked(a);
      if (v->kind == VmaKind::kPfnmap) return make_error(EINVAL, "MADV_DONTNEED on VM_PFNMAP");
      a = v->end;
    }
    if (im.cuts_hugetlb_locked(start, end)) return make_error(EINVAL, "range cuts a hugetlb page");
    ranges.push_back(im.notify_range_locked(start, end));
  }
  im.invalidate(ranges, [&] {
    im.split_thp_locked(start, end);
    im.forget_huge_in_locked(start, end);
    for (auto it = im.ptes.lower_bound(page_no(start));
         it != im.ptes.end() && it->first < page_no(end);) {
      if (it->second.counted) im.unref_locked(it->second.pfn);
      it = im.ptes.erase(it);
    }
  });
  return {};
}

Result<void> SimHost::populate(Hva hva, uint64_t len, bool write) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  Impl& im = *impl_;
  detail::MmapReadGuard guard(im.mmap_lock);
  for (uint64_t a = start; a < end; a += kPageSize) {
    {
      std::lock_guard l(im.mu);
      const VmaRec* v = im.find_vma_locked(a);
      if (!v) return make_error(ENOMEM, "populate: ", hex(a), " is not mapped");
      if (v->kind == VmaKind::kPfnmap) return make_error(EINVAL, "populate: VM_PFNMAP at ", hex(a));
      if (!has(v->prot, Prot::kRead) && !has(v->prot, Prot::kWrite)) {
        return make_error(EINVAL, "populate: PROT_NONE at ", hex(a));
      }
      if (write && !has(v->prot, Prot::kWrite)) {
        return make_error(EINVAL, "populate: write to a read-only VMA at ", hex(a));
      }
    }
    long r = im.fault_page(a, write, false, true, false, nullptr);
    if (r == -EHWPOISON) return make_error(EHWPOISON, "populate: poisoned page at ", hex(a));
    if (r < 0) return make_error(static_cast<int>(-r), "populate: fault failed at ", hex(a));
  }
  return {};
}

Result<void> SimHost::make_cow_shared(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  {
    std::lock_guard l(im.mu);
    for (uint64_t a = start; a < end;) {
      const VmaRec* v = im.find_vma_locked(a);
      if (!v) return make_error(ENOMEM, "make_cow_shared: ", hex(a), " is not mapped");
      if (v->kind != VmaKind::kAnonPrivate || v->is_hugetlb()) {
        return make_error(EINVAL, "make_cow_shared: only anonymous private 4K/THP VMAs");
      }
      a = v->end;
    }
  }
  for (uint64_t a = start; a < end; a += kPageSize) {
    bool need;
    {
      std::lock_guard l(im.mu);
      auto it = im.ptes.find(page_no(a));
      need = it == im.ptes.end() || it->second.state != State::kPresent ||
             it->second.pfn == im.cfg.first_pfn;
    }
    if (need) {
      long r = im.fault_page(a, true, false, true, false, nullptr);
      if (r < 0) return make_error(static_cast<int>(-r), "make_cow_shared: fault at ", hex(a));
    }
  }
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    ranges.push_back(im.notify_range_locked(start, end));
  }
  im.invalidate(ranges, [&] {
    im.split_thp_locked(start, end);
    im.forget_huge_in_locked(start, end);  // the child's copy is mapped with 4K PTEs
    for (auto it = im.ptes.lower_bound(page_no(start));
         it != im.ptes.end() && it->first < page_no(end); ++it) {
      Pte& p = it->second;
      if (p.state != State::kPresent || p.cow || p.pfn == im.cfg.first_pfn) continue;
      im.ref_locked(p.pfn);  // the child's mapping
      p.cow = true;
      p.writable = false;
    }
  });
  return {};
}

Result<void> SimHost::write_protect(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    if (!im.fully_mapped_locked(start, end)) {
      return make_error(ENOMEM, "[", hex(start), ", ", hex(end), ") is not fully mapped");
    }
    ranges.push_back(im.notify_range_locked(start, end));
  }
  im.invalidate(ranges, [&] {
    im.split_thp_locked(start, end);  // a huge mapping never mixes permissions
    for (auto it = im.ptes.lower_bound(page_no(start));
         it != im.ptes.end() && it->first < page_no(end); ++it) {
      it->second.writable = false;
    }
  });
  return {};
}

Result<void> SimHost::poison(Hva hva) {
  const uint64_t a = align_down(hva.value, kPageSize);
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  bool need;
  {
    std::lock_guard l(im.mu);
    const VmaRec* v = im.find_vma_locked(a);
    if (!v) return make_error(ENOMEM, "poison: ", hex(a), " is not mapped");
    if (v->kind == VmaKind::kPfnmap) return make_error(EINVAL, "poison of VM_PFNMAP memory");
    auto it = im.ptes.find(page_no(a));
    if (it != im.ptes.end() && it->second.state == State::kHwpoison) return {};
    need = it == im.ptes.end() || it->second.state != State::kPresent ||
           it->second.pfn == im.cfg.first_pfn;
  }
  if (need) {
    long r = im.fault_page(a, true, false, true, false, nullptr);
    if (r < 0) return make_error(static_cast<int>(-r), "poison: fault at ", hex(a));
  }
  std::vector<uint64_t> pfns;
  std::vector<Range> ranges;
  {
    std::lock_guard l(im.mu);
    const VmaRec* v = im.find_vma_locked(a);
    uint64_t rs = 0;
    std::optional<PgLevel> lvl = im.huge_level_locked(a, &rs);
    if (v->is_hugetlb() && lvl) {
      for (uint64_t i = 0; i < pg_level_pages(*lvl); ++i) {
        auto it = im.ptes.find(page_no(rs) + i);
        if (it != im.ptes.end() && it->second.state == State::kPresent) pfns.push_back(it->second.pfn);
      }
    } else {
      pfns.push_back(im.ptes.at(page_no(a)).pfn);
    }
    std::set<uint64_t> targets(pfns.begin(), pfns.end());
    for (const auto& [pg, p] : im.ptes) {
      if (p.state == State::kPresent && targets.count(p.pfn)) {
        uint64_t s = pg << kPageShift;
        ranges.push_back(im.notify_range_locked(s, s + kPageSize));
      }
    }
  }
  im.invalidate(ranges, [&] {
    std::set<uint64_t> targets(pfns.begin(), pfns.end());
    for (uint64_t pfn : pfns) im.frame_locked(pfn)->poisoned = true;
    for (auto& [pg, p] : im.ptes) {
      if (p.state != State::kPresent || !targets.count(p.pfn)) continue;
      uint64_t s = pg << kPageShift;
      const VmaRec* v = im.find_vma_locked(s);
      if (v && !v->is_hugetlb()) im.split_thp_locked(s, s + kPageSize);
      if (p.counted) im.unref_locked(p.pfn);
      p.counted = false;
      p.state = State::kHwpoison;
      p.writable = false;
    }
  });
  return {};
}

Result<uint64_t> SimHost::Impl::evict_excl(uint64_t start, uint64_t end, bool anon) {
  // Pages to evict: (file, index) for file pages, page numbers for anon pages.
  std::vector<std::pair<FileId, uint64_t>> file_pages;
  std::vector<uint64_t> anon_pages;
  std::vector<Range> ranges;
  {
    std::lock_guard l(mu);
    if (!fully_mapped_locked(start, end)) {
      return make_error(ENOMEM, "[", hex(start), ", ", hex(end), ") is not fully mapped");
    }
    std::set<uint64_t> pfns;
    for (uint64_t a = start; a < end; a += kPageSize) {
      const VmaRec* v = find_vma_locked(a);
      if (v->is_hugetlb()) return make_error(EINVAL, "hugetlb pages are not evictable");
      if (anon) {
        if (v->kind != VmaKind::kAnonPrivate) {
          return make_error(EINVAL, "swap_out: ", hex(a), " is not anonymous private");
        }
        auto it = ptes.find(page_no(a));
        if (it == ptes.end() || it->second.state != State::kPresent || it->second.cow) continue;
        const Frame& f = *frame_locked(it->second.pfn);
        if (f.kind != FrameKind::kAnon || f.held_refs || f.held_pins) continue;
        anon_pages.push_back(page_no(a));
        ranges.push_back(notify_range_locked(a, a + kPageSize));
      } else {
        if (!v->file_backed()) {
          return make_error(EINVAL, "evict_from_page_cache: ", hex(a), " is not file-backed");
        }
        const File& file = files.at(v->file);
        auto cit = file.cache.find(v->file_index(a));
        if (cit == file.cache.end()) continue;
        const Frame& f = *frame_locked(cit->second);
        if (f.held_refs || f.held_pins || f.poisoned) continue;
        file_pages.emplace_back(v->file, cit->first);
        pfns.insert(cit->second);
      }
    }
    for (const auto& [pg, p] : ptes) {
      if (p.state == State::kPresent && pfns.count(p.pfn)) {
        uint64_t s = pg << kPageShift;
        ranges.push_back(notify_range_locked(s, s + kPageSize));
      }
    }
  }
  uint64_t evicted = 0;
  if (file_pages.empty() && anon_pages.empty()) return evicted;
  invalidate(ranges, [&] {
    for (uint64_t pg : anon_pages) {
      Pte& p = ptes.at(pg);
      Frame& f = *frame_locked(p.pfn);
      if (f.held_refs || f.held_pins) continue;  // grabbed by a fast lookup meanwhile
      Blob data = save_data_locked(f);
      split_thp_locked(pg << kPageShift, (pg + 1) << kPageShift);
      if (p.counted) unref_locked(p.pfn);
      p = Pte{};
      p.state = State::kSwapped;
      p.swap = std::move(data);
      ++evicted;
    }
    for (const auto& [fid, idx] : file_pages) {
      File& file = files.at(fid);
      uint64_t pfn = file.cache.at(idx);
      Frame& f = *frame_locked(pfn);
      if (f.held_refs || f.held_pins) continue;
      for (auto it = ptes.begin(); it != ptes.end();) {
        if (it->second.state == State::kPresent && it->second.pfn == pfn) {
          if (it->second.counted) unref_locked(pfn);
          it = ptes.erase(it);
        } else {
          ++it;
        }
      }
      file.disk[idx] = save_data_locked(f);
      file.cache.erase(idx);
      unref_locked(pfn);  // the page cache's reference
      ++evicted;
    }
  });
  return evicted;
}

Result<uint64_t> SimHost::evict_from_page_cache(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r.error();
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  return impl_->evict_excl(start, end, false);
}

Result<uint64_t> SimHost::swap_out(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r.error();
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  return impl_->evict_excl(start, end, true);
}

Result<void> SimHost::zap_pfnmap(Hva hva, uint64_t len) {
  uint64_t start, end;
  if (Result<void> r = check_range(hva, len, &start, &end); !r) return r;
  WriteHold hold(impl_->mmap_lock);
  if (!hold.ok()) return deadlock_error();
  Impl& im = *impl_;
  {
    std::lock_guard l(im.mu);
    for (uint64_t a = start; a < end;) {
      const VmaRec* v = im.find_vma_locked(a);
      if (!v || v->kind != VmaKind::kPfnmap) {
        return make_error(EINVAL, "zap_pfnmap: ", hex(a), " is not in a VM_PFNMAP VMA");
      }
      a = v->end;
    }
  }
  im.invalidate({Range{start, end}}, [&] {
    for (auto it = im.ptes.lower_bound(page_no(start));
         it != im.ptes.end() && it->first < page_no(end);) {
      it = im.ptes.erase(it);  // PFNMAP PTEs hold no reference
    }
  });
  return {};
}

// ---------------------------------------------------------------------------------------------
// Signals and injections

void SimHost::set_signal(SignalState state) {
  std::lock_guard l(impl_->mu);
  impl_->signal = state;
}

void SimHost::set_thread_signal(std::thread::id thread, SignalState state) {
  std::lock_guard l(impl_->mu);
  impl_->thread_signals[thread] = state;
}

void SimHost::clear_thread_signals() {
  std::lock_guard l(impl_->mu);
  impl_->thread_signals.clear();
}

Result<void> SimHost::inject_gup_result(Hva hva, GupInjection injection) {
  if (injection.result > 0) {
    return make_error(EINVAL, "GUP result ", injection.result, " cannot be injected (use 0 or -errno)");
  }
  if (injection.times == 0 || injection.times < -1) return make_error(EINVAL, "times must be -1 or > 0");
  std::lock_guard l(impl_->mu);
  impl_->gup_inj[page_no(hva.value)] = injection;
  return {};
}

Result<void> SimHost::inject_fast_miss(Hva hva, int times) {
  if (times == 0 || times < -1) return make_error(EINVAL, "times must be -1 or > 0");
  std::lock_guard l(impl_->mu);
  impl_->fast_inj[page_no(hva.value)] = times;
  return {};
}

Result<void> SimHost::inject_fixup(Hva hva, FixupInjection injection) {
  if (injection.error > 0) return make_error(EINVAL, "fixup error must be a negative errno");
  if (injection.drop_lock_times < 0) return make_error(EINVAL, "drop_lock_times < 0");
  std::lock_guard l(impl_->mu);
  impl_->fixup_inj[page_no(hva.value)] = std::move(injection);
  return {};
}

void SimHost::clear_injections() {
  std::lock_guard l(impl_->mu);
  impl_->gup_inj.clear();
  impl_->fast_inj.clear();
  impl_->fixup_inj.clear();
}

// ---------------------------------------------------------------------------------------------
// Aging and teardown

AgeResult SimHost::age_range(Hva start, Hva end, bool flush) {
  const uint64_t s = align_down(start.value, kPageSize);
  const uint64_t e = align_up(end.value, kPageSize);
  AgeResult r;
  if (e <= s) return r;
  Impl& im = *impl_;
  {
    std::lock_guard l(im.mu);
    for (auto it = im.ptes.lower_bound(page_no(s)); it != im.ptes.end() && it->first < page_no(e);
         ++it) {
      r.primary_young |= it->second.young;
      it->second.young = false;
    }
  }
  Impl::Subscribers subs = im.acquire_subscribers();
  ++t_in_callback;
  for (MmuNotifier* n : subs.list) {
    r.secondary_young |= flush ? n->clear_flush_young(Hva(s), Hva(e)) : n->clear_young(Hva(s), Hva(e));
  }
  --t_in_callback;
  im.release_subscribers(subs);
  return r;
}

AgeResult SimHost::test_young(Hva start, Hva end) {
  const uint64_t s = align_down(start.value, kPageSize);
  const uint64_t e = align_up(end.value, kPageSize);
  AgeResult r;
  if (e <= s) return r;
  Impl& im = *impl_;
  {
    std::lock_guard l(im.mu);
    for (auto it = im.ptes.lower_bound(page_no(s)); it != im.ptes.end() && it->first < page_no(e);
         ++it) {
      r.primary_young |= it->second.young;
    }
  }
  Impl::Subscribers subs = im.acquire_subscribers();
  ++t_in_callback;
  for (MmuNotifier* n : subs.list) r.secondary_young |= n->test_young(Hva(s), Hva(e));
  --t_in_callback;
  im.release_subscribers(subs);
  return r;
}

void SimHost::exit_mmap() {
  Impl& im = *impl_;
  Impl::Subscribers subs = im.acquire_subscribers();
  ++t_in_callback;
  for (MmuNotifier* n : subs.list) n->release();
  --t_in_callback;
  im.release_subscribers(subs);
  WriteHold hold(im.mmap_lock);
  std::lock_guard l(im.mu);
  for (auto& [pg, p] : im.ptes) {
    if (p.counted) im.unref_locked(p.pfn);
  }
  im.ptes.clear();
  im.vmas.clear();
  im.huge.clear();
}

// ---------------------------------------------------------------------------------------------
// HostMm

bool SimHost::get_user_page_fast_only(Hva hva, FollFlags gup_flags, Page* page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  ++im.counts.fast_lookups;
  if (!page) {
    im.violate_locked("get_user_page_fast_only with a null Page*");
    return false;
  }
  if (gup_flags & ~(kFollWrite | kFollPin)) return false;
  const uint64_t a = align_down(hva.value, kPageSize);
  const uint64_t pg = page_no(a);
  if (auto it = im.fast_inj.find(pg); it != im.fast_inj.end()) {
    if (it->second > 0 && --it->second == 0) im.fast_inj.erase(it);
    return false;
  }
  const VmaRec* v = im.find_vma_locked(a);
  if (!v || v->kind == VmaKind::kPfnmap) return false;  // special PTEs: never GUP-fast
  auto it = im.ptes.find(pg);
  if (it == im.ptes.end() || it->second.state != State::kPresent) return false;
  const Pte& p = it->second;
  const Frame* f = im.frame_locked(p.pfn);
  if (!f || f->poisoned || f->kind == FrameKind::kZero) return false;
  const bool write = gup_flags & kFollWrite;
  if (write && (!p.writable || p.cow || !has(v->prot, Prot::kWrite))) return false;
  if (!write && !has(v->prot, Prot::kRead)) return false;
  im.grab_locked(p.pfn, a, gup_flags & kFollPin, page);
  ++im.counts.fast_hits;
  return true;
}

long SimHost::get_user_pages_unlocked(Hva hva, FollFlags gup_flags, Page* page) {
  Impl& im = *impl_;
  const uint64_t a = align_down(hva.value, kPageSize);
  SignalState sig;
  {
    std::lock_guard l(im.mu);
    ++im.counts.slow_gups;
    im.counts.last_gup_flags = gup_flags;
    if (!page) {
      im.violate_locked("get_user_pages_unlocked with a null Page*");
      return -EINVAL;
    }
    constexpr FollFlags kKnown = kFollWrite | kFollNowait | kFollInterruptible | kFollGet |
                                 kFollHwpoison | kFollHonorNumaFault | kFollPin;
    if (gup_flags & ~kKnown) return -EINVAL;
    if (auto it = im.gup_inj.find(page_no(a)); it != im.gup_inj.end()) {
      long r = it->second.result;
      if (it->second.times > 0 && --it->second.times == 0) im.gup_inj.erase(it);
      return r;
    }
    sig = im.signal_locked();
  }
  // mmap_read_lock_killable: a fatal signal that arrives while waiting for the lock.
  if (sig == SignalState::kFatalBeforeLock) return -EAGAIN;
  detail::MmapReadGuard guard(im.mmap_lock);
  if (sig == SignalState::kFatal) return -EINTR;
  if (sig == SignalState::kPending && (gup_flags & kFollInterruptible)) return -EINTR;
  const bool write = gup_flags & kFollWrite;
  {
    std::lock_guard l(im.mu);
    const VmaRec* v = im.find_vma_locked(a);
    if (!v) return -EFAULT;
    if (v->kind == VmaKind::kPfnmap) return -EFAULT;  // check_vma_flags: VM_IO | VM_PFNMAP
    if (write ? !has(v->prot, Prot::kWrite) : !has(v->prot, Prot::kRead)) return -EFAULT;
  }
  long r = im.fault_page(a, write, gup_flags & kFollNowait, gup_flags & kFollHwpoison,
                         gup_flags & kFollPin, page);
  if (r == kFaultNeedsIo) return 0;
  if (r < 0) return r;
  std::lock_guard l(im.mu);
  ++im.counts.slow_gup_pages;
  return 1;
}

void SimHost::mmap_read_lock() { impl_->mmap_lock.lock_shared(); }

void SimHost::mmap_read_unlock() {
  if (!impl_->mmap_lock.unlock_shared()) {
    std::lock_guard l(impl_->mu);
    impl_->violate_locked("mmap_read_unlock without mmap_read_lock");
  }
}

std::optional<Vma> SimHost::vma_lookup(Hva hva) {
  Impl& im = *impl_;
  const bool held = im.mmap_lock.held_by_this_thread();
  std::lock_guard l(im.mu);
  ++im.counts.vma_lookups;
  if (!held) im.violate_locked("vma_lookup without the mmap lock");
  const VmaRec* v = im.find_vma_locked(hva.value);
  if (!v) return std::nullopt;
  return Vma{Hva(v->start), Hva(v->end), v->vm_flags()};
}

int SimHost::follow_pfnmap(Hva hva, PfnmapPte* pte) {
  Impl& im = *impl_;
  const bool held = im.mmap_lock.held_by_this_thread();
  std::lock_guard l(im.mu);
  ++im.counts.follow_pfnmaps;
  if (!held) im.violate_locked("follow_pfnmap without the mmap lock");
  if (!pte) {
    im.violate_locked("follow_pfnmap with a null PfnmapPte*");
    return -EINVAL;
  }
  const VmaRec* v = im.find_vma_locked(hva.value);
  if (!v || v->kind != VmaKind::kPfnmap) return -EINVAL;
  auto it = im.ptes.find(page_no(hva.value));
  if (it == im.ptes.end() || it->second.state != State::kPresent) return -ENOENT;
  *pte = PfnmapPte{Pfn(it->second.pfn), it->second.writable};
  return 0;
}

int SimHost::fixup_user_fault(Hva hva, bool write, bool* unlocked) {
  Impl& im = *impl_;
  const uint64_t a = align_down(hva.value, kPageSize);
  FixupInjection inj;
  bool drop = false;
  bool more_drops = false;  // later calls drop the lock too: leave the PTE missing for them
  {
    std::lock_guard l(im.mu);
    ++im.counts.fixups;
    if (!im.mmap_lock.held_by_this_thread()) im.violate_locked("fixup_user_fault without the mmap lock");
    if (auto it = im.fixup_inj.find(page_no(a)); it != im.fixup_inj.end()) {
      inj.error = it->second.error;
      if (it->second.drop_lock_times > 0) {
        --it->second.drop_lock_times;
        more_drops = it->second.drop_lock_times > 0;
        drop = true;
        inj.while_unlocked = it->second.while_unlocked;
      }
    }
    if (drop) ++im.counts.fixup_unlocks;
  }
  if (drop) {
    if (unlocked) *unlocked = true;
    int depth = im.mmap_lock.drop_shared();
    if (inj.while_unlocked) inj.while_unlocked(*this);
    im.mmap_lock.retake_shared(depth);
  }
  if (inj.error) return inj.error;
  // The retried fault raced with another zap: success, the PTE still missing, so the caller's
  // fresh lookup calls fixup_user_fault again (and it drops the lock again).
  if (more_drops) return 0;
  VmaRec v;
  {
    std::lock_guard l(im.mu);
    const VmaRec* vp = im.find_vma_locked(a);
    if (!vp) return -EFAULT;
    v = *vp;
    if (write ? !has(v.prot, Prot::kWrite) : !has(v.prot, Prot::kRead)) return -EFAULT;
    if (v.kind == VmaKind::kPfnmap) {
      // The driver's fault handler (vmf_insert_pfn) installs the PTE if it is missing.
      auto it = im.ptes.find(page_no(a));
      if (it == im.ptes.end()) {
        im.map_pte_locked(page_no(a), v.device_pfn + page_no(a - v.start),
                          v.ptes_writable && has(v.prot, Prot::kWrite), false, false);
        ++im.counts.faults;
      }
      return 0;
    }
  }
  long r = im.fault_page(a, write, false, false, false, nullptr);
  return r < 0 ? static_cast<int>(r) : 0;
}

namespace {

Frame* page_frame(SimHost::Impl& im, SimHost* self, const Page& page, const char* op) {
  if (page.mm != self) {
    im.violate_locked(std::string(op) + " of a Page not handed out by this SimHost");
    return nullptr;
  }
  Frame* f = im.frame_locked(page.pfn.value);
  if (!f || f->kind == FrameKind::kHole) {
    im.violate_locked(std::string(op) + " of unknown pfn " + hex(page.pfn.value));
    return nullptr;
  }
  if (f->freed) {
    im.violate_locked(std::string(op) + " of freed pfn " + hex(page.pfn.value));
    return nullptr;
  }
  return f;
}

}  // namespace

void SimHost::put_page(const Page& page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  ++im.counts.puts;
  Frame* f = page_frame(im, this, page, "put_page");
  if (!f) return;
  uint32_t& held = page.pinned ? f->held_pins : f->held_refs;
  if (held == 0) {
    im.violate_locked(std::string(page.pinned ? "unpin_user_page" : "put_page") + " of pfn " +
                      hex(page.pfn.value) + " with no " + (page.pinned ? "pin" : "reference") +
                      " held");
    return;
  }
  --held;
  --im.outstanding;
  im.unref_locked(page.pfn.value);
}

void SimHost::set_page_dirty(const Page& page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  Frame* f = page_frame(im, this, page, "set_page_dirty");
  if (!f) return;
  if (f->reserved) {
    im.violate_locked("set_page_dirty of reserved pfn " + hex(page.pfn.value));
  } else if (f->refcount == 0) {
    im.violate_locked("set_page_dirty of refcount-0 pfn " + hex(page.pfn.value));
  } else if (f->held_refs + f->held_pins == 0) {
    im.violate_locked("set_page_dirty of pfn " + hex(page.pfn.value) + " that nobody holds");
  } else {
    f->dirty = true;
  }
}

void SimHost::mark_page_accessed(const Page& page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  Frame* f = page_frame(im, this, page, "mark_page_accessed");
  if (!f) return;
  if (f->reserved) {
    im.violate_locked("mark_page_accessed of reserved pfn " + hex(page.pfn.value));
  } else if (f->refcount == 0) {
    im.violate_locked("mark_page_accessed of refcount-0 pfn " + hex(page.pfn.value));
  } else if (f->held_refs + f->held_pins == 0) {
    im.violate_locked("mark_page_accessed of pfn " + hex(page.pfn.value) + " that nobody holds");
  } else {
    f->accessed = true;
  }
}

bool SimHost::page_reserved(const Page& page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  Frame* f = page_frame(im, this, page, "page_reserved");
  return f && f->reserved;
}

std::optional<Page> SimHost::pfn_to_refcounted_page(Pfn pfn, Hva hva) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  const Frame* f = im.frame_locked(pfn.value);
  if (!f || !f->has_struct_page) return std::nullopt;              // !pfn_valid
  if (f->reserved && f->kind != FrameKind::kZero) return std::nullopt;  // PG_reserved
  return Page{this, pfn, Hva(align_down(hva.value, kPageSize)), false};
}

bool SimHost::get_page_unless_zero(const Page& page) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  ++im.counts.get_page_unless_zero;
  if (page.mm != this) {
    im.violate_locked("get_page_unless_zero of a Page not from this SimHost");
    return false;
  }
  Frame* f = im.frame_locked(page.pfn.value);
  if (!f || !f->has_struct_page || f->refcount <= 0) return false;
  ++f->refcount;
  if (page.pinned) {
    ++f->held_pins;
  } else {
    ++f->held_refs;
  }
  ++im.outstanding;
  return true;
}

bool SimHost::signal_pending() {
  std::lock_guard l(impl_->mu);
  return impl_->signal_locked() != SignalState::kNone;
}

bool SimHost::fatal_signal_pending() {
  std::lock_guard l(impl_->mu);
  SignalState s = impl_->signal_locked();
  return s == SignalState::kFatal || s == SignalState::kFatalBeforeLock;
}

PgLevel SimHost::host_mapping_level(Hva hva) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  auto it = im.ptes.find(page_no(hva.value));
  if (it == im.ptes.end() || it->second.state != State::kPresent) return PgLevel::k4K;
  return im.huge_level_locked(hva.value, nullptr).value_or(PgLevel::k4K);
}

std::byte* SimHost::page_address(Pfn pfn, Hva) {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  Frame* f = im.frame_locked(pfn.value);
  if (!f || f->freed || f->poisoned || f->kind == FrameKind::kHole) return nullptr;
  return im.data_locked(*f);
}

void SimHost::register_notifier(MmuNotifier* notifier) {
  if (!notifier) return;
  std::lock_guard l(impl_->nmu);
  impl_->notifiers.push_back(notifier);
}

void SimHost::unregister_notifier(MmuNotifier* notifier) {
  Impl& im = *impl_;
  std::unique_lock l(im.nmu);
  std::erase(im.notifiers, notifier);
  if (t_in_callback > 0) return;  // waiting for ourselves would deadlock
  const uint64_t before = im.next_ticket;
  im.ncv.wait(l, [&] { return im.active_tickets.empty() || *im.active_tickets.begin() >= before; });
}

uint64_t SimHost::outstanding_refs() const {
  std::lock_guard l(impl_->mu);
  return impl_->outstanding;
}

// ---------------------------------------------------------------------------------------------
// Queries

std::optional<VmaInfo> SimHost::vma_info(Hva hva) const {
  std::lock_guard l(impl_->mu);
  const VmaRec* v = impl_->find_vma_locked(hva.value);
  if (!v) return std::nullopt;
  VmaInfo info;
  info.vma = Vma{Hva(v->start), Hva(v->end), v->vm_flags()};
  info.kind = v->kind;
  info.prot = v->prot;
  info.backing = v->backing;
  info.file = v->file;
  info.file_offset = v->file_off;
  info.device_pfn = Pfn(v->device_pfn);
  info.pfnmap_backing = v->pfnmap_backing;
  return info;
}

PteInfo SimHost::pte(Hva hva) const {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  PteInfo info;
  auto it = im.ptes.find(page_no(hva.value));
  if (it == im.ptes.end()) return info;
  const Pte& p = it->second;
  info.state = p.state;
  info.pfn = Pfn(p.pfn);
  info.writable = p.writable;
  info.young = p.young;
  info.dirty = p.dirty;
  info.cow_shared = p.cow;
  info.zero_page = p.state == State::kPresent && p.pfn == im.cfg.first_pfn;
  if (p.state == State::kPresent) {
    info.level = im.huge_level_locked(hva.value, nullptr).value_or(PgLevel::k4K);
  }
  return info;
}

FrameInfo SimHost::frame(Pfn pfn) const {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  FrameInfo info;
  const Frame* f = im.frame_locked(pfn.value);
  if (!f) {
    info.has_struct_page = false;
    return info;
  }
  info.valid = true;
  info.kind = f->kind;
  info.has_struct_page = f->has_struct_page;
  info.refcount = f->refcount;
  info.held_refs = f->held_refs;
  info.held_pins = f->held_pins;
  info.reserved = f->reserved;
  info.poisoned = f->poisoned;
  info.dirty = f->dirty;
  info.accessed = f->accessed;
  info.freed = f->freed;
  return info;
}

Pfn SimHost::zero_pfn() const { return Pfn(impl_->cfg.first_pfn); }

bool SimHost::page_cache_resident(Hva hva) const {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  const VmaRec* v = im.find_vma_locked(hva.value);
  if (!v || !v->file_backed() || v->is_hugetlb()) return false;
  const File& f = im.files.at(v->file);
  return f.cache.count(v->file_index(align_down(hva.value, kPageSize))) != 0;
}

SimCounters SimHost::counters() const {
  std::lock_guard l(impl_->mu);
  return impl_->counts;
}

void SimHost::reset_counters() {
  std::lock_guard l(impl_->mu);
  impl_->counts = SimCounters{};
}

uint64_t SimHost::violations() const {
  std::lock_guard l(impl_->mu);
  return impl_->violation_count;
}

std::vector<SimViolation> SimHost::violation_log() const {
  std::lock_guard l(impl_->mu);
  return impl_->violation_list;
}

}  // namespace gfnmap
