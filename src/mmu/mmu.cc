// gfnmap MMU: table maintenance under the MMU lock, the page-fault handler (spec 8.3, 9), the
// MMU-notifier callbacks (spec 8.2), memslot hooks (spec 7.4) and dirty-log write protection.
//
// Lock order (outermost first), asserted in debug builds by Impl::lock_mmu / assert_held:
//   Memslots slots lock > memslots read lock (SRCU) > Mmu::Impl::lock > HostMm page-op locks,
//   DirtyLog internals. Never call a HostMm mapping operation (GUP, faultin_pfn) or DirtyLog's
//   ioctls under the MMU lock; never take the MMU lock inside a vCPU access window.
#include <linux/membarrier.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <string>

#include "mmu_impl.h"

namespace gfnmap {

using detail::SptNode;
using detail::SptScatter;
using detail::spt_index;
using detail::spt_pages;

// ---------------------------------------------------------------------------------------------
// Names.

std::string spte::to_string(uint64_t e) {
  if (e == 0) return "0";
  if (e & kTable) return "TABLE";
  std::string s;
  auto add = [&](uint64_t bit, const char* name) {
    if (e & bit) {
      if (!s.empty()) s += '|';
      s += name;
    }
  };
  add(kPresent, "P");
  add(kWritable, "W");
  add(kExecutable, "X");
  add(kHostWritable, "HW");
  add(kMmuWritable, "MW");
  add(kAccessed, "A");
  add(kDirty, "D");
  add(kRefcounted, "RC");
  add(kLarge, "L");
  add(kScattered, "S");
  return s;
}

std::string_view to_string(Access access) {
  switch (access) {
    case Access::kRead: return "read";
    case Access::kWrite: return "write";
    case Access::kExec: return "exec";
  }
  return "?";
}

std::string_view to_string(ExitReason reason) {
  switch (reason) {
    case ExitReason::kNone: return "none";
    case ExitReason::kMmio: return "mmio";
    case ExitReason::kMemoryFault: return "memory-fault";
    case ExitReason::kHwpoison: return "hwpoison";
    case ExitReason::kIntr: return "intr";
    case ExitReason::kDirtyRingFull: return "dirty-ring-full";
    case ExitReason::kAsyncPfNotPresent: return "async-pf-not-present";
    case ExitReason::kAsyncPfHalt: return "async-pf-halt";
  }
  return "?";
}

std::string_view to_string(FaultResult result) {
  switch (result) {
    case FaultResult::kFixed: return "fixed";
    case FaultResult::kRetry: return "retry";
    case FaultResult::kExit: return "exit";
    case FaultResult::kAsync: return "async";
    case FaultResult::kSpurious: return "spurious";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// The "IPI" of a TLB flush.

namespace detail {
bool g_vcpu_needs_fence = true;

bool membarrier_available() {
  static const bool ok = [] {
    long r = syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0);
    g_vcpu_needs_fence = (r != 0);
    return r == 0;
  }();
  return ok;
}
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Chunks (table.h).

namespace detail {

SptChunk* spt_map_chunk() {
  // Twice the size, then the unaligned head and tail go: an aligned reservation.
  const uint64_t span = 2 * kSptChunkBytes;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const auto raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t start = (raw + kSptChunkBytes - 1) & ~(kSptChunkBytes - 1);
  if (start > raw) munmap(p, start - raw);
  if (raw + span > start + kSptChunkBytes) {
    munmap(reinterpret_cast<void*>(start + kSptChunkBytes), raw + span - start - kSptChunkBytes);
  }
  // 4K pages, so the memory a chunk uses is exactly the slots written (metadata_bytes).
  madvise(reinterpret_cast<void*>(start), kSptChunkBytes, MADV_NOHUGEPAGE);
  // SAFETY: zero-filled storage of a trivial type is a chunk with no slot used.
  return reinterpret_cast<SptChunk*>(start);
}

void spt_unmap_chunk(SptChunk* chunk) { munmap(chunk, kSptChunkBytes); }

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Table operations (Impl). All run under the MMU lock.

namespace {

bool bit_test(const uint64_t* words, unsigned i) { return (words[i / 64] >> (i % 64)) & 1; }
void bit_set(uint64_t* words, unsigned i) { words[i / 64] |= uint64_t{1} << (i % 64); }
void bit_clear(uint64_t* words, unsigned i) { words[i / 64] &= ~(uint64_t{1} << (i % 64)); }

// Marks slot i of c used (and resident, the first time); returns its node.
SptNode* take_slot(detail::SptChunk* c, unsigned i, std::atomic<uint64_t>& nr_resident) {
  bit_set(c->used, i);
  ++c->nr_used;
  if (!bit_test(c->resident, i)) {
    bit_set(c->resident, i);
    ++c->nr_resident;
    nr_resident.fetch_add(1, std::memory_order_relaxed);
  }
  detail::SptSide& side = c->side[i];
  side.pfn_base.store(0, std::memory_order_relaxed);
  side.pfn_base_set = false;
  side.block = nullptr;
  return &c->node[i];
}

}  // namespace

SptNode* Mmu::Impl::alloc_table(int level) {
  detail::SptChunk* chunk = nullptr;
  for (detail::SptChunk* p : pool) {
    if (p->nr_used < detail::kSptEntries) {
      chunk = p;
      break;
    }
  }
  if (chunk == nullptr) {
    chunk = detail::spt_map_chunk();
    pool.push_back(chunk);
  }
  unsigned i = 0;
  while (bit_test(chunk->used, i)) ++i;
  SptNode* n = take_slot(chunk, i, nr_resident);
  // A reused slot: its entries were last read before the flush that freed it.
  std::memset(static_cast<void*>(n), 0, sizeof(SptNode));
  if (level == 2) {
    spt_side(n).block = detail::spt_map_chunk();
  }
  nr_nodes.fetch_add(1, std::memory_order_relaxed);
  return n;
}

SptNode* Mmu::Impl::alloc_child(SptNode* parent, int level, unsigned idx) {
  if (level > 2) return alloc_table(level - 1);
  detail::SptChunk* b = spt_side(parent).block;
  assert(!bit_test(b->used, idx) && "level-1 table linked twice");
  nr_nodes.fetch_add(1, std::memory_order_relaxed);
  return take_slot(b, idx, nr_resident);  // all zero: the SptNode invariant
}

void Mmu::Impl::release_l1(SptNode* node) {
  for (auto& e : node->e) e.store(0, std::memory_order_relaxed);
  detail::SptChunk* b = detail::spt_chunk_of(node);
  bit_clear(b->used, detail::spt_slot_of(node));
  --b->nr_used;
  nr_nodes.fetch_sub(1, std::memory_order_relaxed);
}

void Mmu::Impl::free_table(SptNode* node, int level) {
  detail::SptChunk* chunk = detail::spt_chunk_of(node);
  if (level == 2) {
    detail::SptChunk* b = spt_side(node).block;
    nr_nodes.fetch_sub(b->nr_used, std::memory_order_relaxed);
    nr_resident.fetch_sub(b->nr_resident, std::memory_order_relaxed);
    detail::spt_unmap_chunk(b);
  }
  bit_clear(chunk->used, detail::spt_slot_of(node));
  --chunk->nr_used;
  nr_nodes.fetch_sub(1, std::memory_order_relaxed);
  if (chunk->nr_used == 0 && pool.size() > 1) {
    nr_resident.fetch_sub(chunk->nr_resident, std::memory_order_relaxed);
    std::erase(pool, chunk);
    detail::spt_unmap_chunk(chunk);
  }
}

void Mmu::Impl::set_leaf_pfn(SptNode* node, unsigned idx, uint64_t pfn, uint64_t* e) {
  detail::SptSide& side = spt_side(node);
  if (!side.pfn_base_set) {
    side.pfn_base.store(pfn > (uint64_t{1} << 31) ? pfn - (uint64_t{1} << 31) : 0,
                        std::memory_order_relaxed);
    side.pfn_base_set = true;
  }
  uint64_t base = side.pfn_base.load(std::memory_order_relaxed);
  if (pfn >= base && pfn - base < 0xffffffffULL) {
    spt_pfn_off(node)[idx].store(static_cast<uint32_t>(pfn - base), std::memory_order_relaxed);
  } else {
    pfn_overflow[&node->e[idx]] = pfn;
    *e |= spte::kPfnOverflow;
  }
}

uint64_t Mmu::Impl::leaf_pfn(const SptNode* node, unsigned idx, uint64_t e) const {
  if (e & spte::kPfnOverflow) {
    auto it = pfn_overflow.find(&node->e[idx]);
    return it == pfn_overflow.end() ? 0 : it->second;
  }
  return spt_side(node).pfn_base.load(std::memory_order_relaxed) +
         spt_pfn_off(node)[idx].load(std::memory_order_relaxed);
}

// Clears a leaf's bookkeeping (the entry itself is cleared or replaced by the caller).
void Mmu::Impl::drop_leaf(SptNode* node, unsigned idx, uint64_t e) {
  if (e & spte::kPfnOverflow) pfn_overflow.erase(&node->e[idx]);
  if (e & spte::kScattered) {
    // SAFETY: the address bits of a scattered leaf are its SptScatter.
    retired_scatter.push_back(reinterpret_cast<SptScatter*>(e & spte::kAddrMask));
  }
}

void Mmu::Impl::retire_subtree(SptNode* node, int level, ZapCtx& ctx, bool in_retired) {
  for (unsigned i = 0; i < detail::kSptEntries; ++i) {
    uint64_t e = node->e[i].load(std::memory_order_relaxed);
    if (e & spte::kTable) {
      retire_subtree(detail::spt_child(e), level - 1, ctx, true);
    } else if (spte::is_leaf(e)) {
      drop_leaf(node, i, e);
      ++ctx.zapped;
    }
  }
  ctx.flush = true;
  if (level == 1) {
    // Under a retired level-2 table the block goes with it; alone, the table is zeroed now.
    if (!in_retired) release_l1(node);
    return;
  }
  retired_nodes.emplace_back(node, level);
  table_epoch.fetch_add(1, std::memory_order_relaxed);
}

void Mmu::Impl::zap_node(SptNode* node, int level, uint64_t base, uint64_t start, uint64_t end,
                         ZapCtx& ctx) {
  uint64_t span = spt_pages(level);
  uint64_t lo = std::max(start, base);
  uint64_t hi = std::min(end, base + span * detail::kSptEntries);
  if (lo >= hi) return;
  unsigned first = static_cast<unsigned>((lo - base) / span);
  unsigned last = static_cast<unsigned>((hi - 1 - base) / span);
  for (unsigned i = first; i <= last; ++i) {
    uint64_t e = node->e[i].load(std::memory_order_relaxed);
    if (e == 0) continue;
    uint64_t eg = base + i * span;
    if (e & spte::kTable) {
      if (start <= eg && eg + span <= end) {
        node->e[i].store(0, std::memory_order_release);
        retire_subtree(detail::spt_child(e), level - 1, ctx);
      } else {
        zap_node(detail::spt_child(e), level - 1, eg, start, end, ctx);
      }
    } else if (spte::is_leaf(e)) {
      // A huge leaf partly inside the range goes whole (its other pages fault back in).
      node->e[i].store(0, std::memory_order_release);
      drop_leaf(node, i, e);
      ++ctx.zapped;
      ctx.flush = true;
    }
  }
}

void Mmu::Impl::zap_range(unsigned as_id, uint64_t start, uint64_t end, ZapCtx& ctx) {
  assert_held();
  if (as_id >= roots.size()) return;
  end = std::min(end, kMmuMaxGfn);
  if (start >= end) return;
  zap_node(roots[as_id], static_cast<int>(kMmuLevels), 0, start, end, ctx);
}

template <class Fn>
void Mmu::Impl::for_each_leaf(SptNode* node, int level, uint64_t base, uint64_t start,
                              uint64_t end, Fn& fn) {
  uint64_t span = spt_pages(level);
  uint64_t lo = std::max(start, base);
  uint64_t hi = std::min(end, base + span * detail::kSptEntries);
  if (lo >= hi) return;
  unsigned first = static_cast<unsigned>((lo - base) / span);
  unsigned last = static_cast<unsigned>((hi - 1 - base) / span);
  for (unsigned i = first; i <= last; ++i) {
    uint64_t e = node->e[i].load(std::memory_order_relaxed);
    if (e & spte::kTable) {
      for_each_leaf(detail::spt_child(e), level - 1, base + i * span, start, end, fn);
    } else if (spte::is_leaf(e)) {
      fn(node, i, e, level, base + i * span);
    }
  }
}

// Replaces the huge leaf at node->e[idx] (level 2 or 3) by a table of 512 leaves one level
// down that map the same pages with the same permissions (minus W with write_protect). The
// children are written before the table is linked: a vCPU reading the flat level-1 array sees
// each of them map what the huge leaf maps.
SptNode* Mmu::Impl::split_leaf(SptNode* node, unsigned idx, int level, uint64_t leaf_gfn,
                               bool write_protect) {
  uint64_t e = node->e[idx].load(std::memory_order_relaxed);
  assert(spte::is_leaf(e) && (e & spte::kLarge) && level > 1);
  uint64_t pfn = leaf_pfn(node, idx, e);
  SptNode* child = alloc_child(node, level, idx);
  uint64_t keep = e & (spte::kPresent | spte::kWritable | spte::kExecutable |
                       spte::kHostWritable | spte::kMmuWritable | spte::kAccessed |
                       spte::kDirty | spte::kRefcounted);
  if (write_protect) keep &= ~spte::kWritable;
  int child_level = level - 1;
  uint64_t child_pages = spt_pages(child_level);
  for (unsigned i = 0; i < detail::kSptEntries; ++i) {
    // A contiguous leaf's children keep its address bits (host minus guest address is the same
    // for all its pages); a scattered 2M leaf's 4K children each get their page's.
    const uint64_t g = leaf_gfn + i * child_pages;
    uint64_t ce = (e & spte::kScattered)
                      ? detail::spt_encode_leaf(detail::spt_leaf_ptr(e, level, g), g)
                      : (e & spte::kAddrMask);
    ce |= keep;
    if (child_level > 1) ce |= spte::kLarge;
    set_leaf_pfn(child, i, pfn + i * child_pages, &ce);
    child->e[i].store(ce, std::memory_order_relaxed);
  }
  drop_leaf(node, idx, e);
  node->e[idx].store(reinterpret_cast<uint64_t>(child) | spte::kTable, std::memory_order_release);
  inc(c.splits);
  return child;
}

void Mmu::Impl::pte_prefetch(Vcpu& vcpu, const MemslotSet& set, SptNode* node, unsigned idx,
                             uint64_t gfn) {
  assert_held();
  const unsigned first = idx & ~(kPtePrefetchNum - 1);
  const uint64_t gfn_first = gfn - (idx - first);
  // One run [start, i) of empty entries at a time, as __direct_pte_prefetch collects them.
  auto prefetch_run = [&](unsigned start, unsigned end) {
    const Gfn g(gfn_first + (start - first));
    // gfn_to_memslot_dirty_bitmap: no slot for a dirty-logging slot (a write access would be
    // missed by the log); prefetch_pages gives -1 for a read-only slot (write hva lookup).
    const Memslot* slot = set.vcpu_gfn_to_memslot(vcpu.memslot_cache(), g);
    if (slot == nullptr || slot->invalid() || slot->logs_dirty()) return;
    Page pages[kPtePrefetchNum];
    const int got = prefetch_pages(self.mm_, slot, g, pages, static_cast<int>(end - start));
    for (int k = 0; k < got; ++k) {
      const unsigned i = start + static_cast<unsigned>(k);
      const Hva hva = gfn_to_hva_many(slot, Gfn(g.value + static_cast<uint64_t>(k)), nullptr,
                                      false);
      std::byte* ptr = self.mm_.page_address(pages[k].pfn, hva);
      if (ptr != nullptr && detail::spt_addr_encodable(reinterpret_cast<uint64_t>(ptr)) &&
          node->e[i].load(std::memory_order_relaxed) == 0) {
        // mmu_set_spte for a prefetch: host-writable (a write GUP succeeded), no accessed or
        // dirty bit (the guest has not touched it).
        uint64_t e = detail::spt_encode_leaf(ptr, gfn_first + (i - first)) | spte::kPresent |
                     spte::kExecutable |
                     spte::kHostWritable | spte::kMmuWritable | spte::kWritable;
        if (pages[k]) e |= spte::kRefcounted;
        set_leaf_pfn(node, i, pages[k].pfn.value, &e);
        node->e[i].store(e, std::memory_order_release);
        inc(c.pte_prefetches);
      }
      release_page_clean(pages[k]);  // kvm_release_page_clean, under the lock
    }
  };
  unsigned start = kPtePrefetchNum;  // none open
  for (unsigned i = first; i < first + kPtePrefetchNum; ++i) {
    if (i == idx || node->e[i].load(std::memory_order_relaxed) != 0) {
      if (start != kPtePrefetchNum) prefetch_run(start, i);
      start = kPtePrefetchNum;
    } else if (start == kPtePrefetchNum) {
      start = i;
    }
  }
  if (start != kPtePrefetchNum) prefetch_run(start, first + kPtePrefetchNum);
}

// kvm_flush_remote_tlbs: make every vCPU drop translations read before now. The membarrier is
// the IPI; then wait for each vCPU that is inside an access window to leave it. Frees what was
// retired before the flush (no vCPU can still hold a pointer into it).
void Mmu::Impl::flush(bool needed) {
  assert_held();
  if (!needed && retired_nodes.empty() && retired_scatter.empty()) return;
  inc(c.tlb_flushes);
  if (detail::membarrier_available()) {
    syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
  } else {
    detail::full_fence();
  }
  // Kick every vCPU inside a window first (a GuestMode ends its window on its next access),
  // then wait for each of those windows to end.
  waits.clear();
  for (Vcpu* v : vcpus) {
    uint64_t s = v->access_seq_.load(std::memory_order_acquire);
    if (!(s & 1)) continue;
    assert(v->guest_thread_.load(std::memory_order_relaxed) != std::this_thread::get_id() &&
           "flush from a thread whose vCPU is in guest mode: it would wait for itself");
    v->kick_guest_mode();
    waits.emplace_back(v, s);
  }
  for (auto [v, s] : waits) {
    while (v->access_seq_.load(std::memory_order_acquire) == s) std::this_thread::yield();
  }
  free_retired();
}

void Mmu::Impl::free_retired() {
  for (auto [node, level] : retired_nodes) free_table(node, level);
  retired_nodes.clear();
  for (SptScatter* s : retired_scatter) {
    delete s;
    nr_scatter.fetch_sub(1, std::memory_order_relaxed);
  }
  retired_scatter.clear();
}

// mmu_invalidate_retry_gfn (lock held).
bool Mmu::Impl::retry_gfn(uint64_t mmu_seq, uint64_t gfn) const {
  if (in_progress > 0) {
    if (range_start == kInvalidGfn) return true;  // WARN in KVM: begin without range_add
    if (gfn >= range_start && gfn < range_end) return true;
  }
  return self.invalidate_seq_.load(std::memory_order_relaxed) != mmu_seq;
}

// ---------------------------------------------------------------------------------------------
// Construction.

Mmu::Mmu(Memslots& slots, HostMm& mm, MmuOptions options)
    : slots_(slots), mm_(mm), options_(std::move(options)), impl_(std::make_unique<Impl>(*this)) {
  detail::membarrier_available();
  unsigned nr_as = std::max(1u, slots_.config().nr_address_spaces);
  for (unsigned i = 0; i < nr_as; ++i) impl_->roots.push_back(impl_->alloc_table(kMmuLevels));
  if (options_.max_level < PgLevel::k4K || options_.max_level > PgLevel::k1G) {
    options_.max_level = PgLevel::k1G;
  }
  slots_.add_listener(this);
  if (options_.dirty) options_.dirty->set_write_protector(this);
  mm_.register_notifier(this);
}

Mmu::~Mmu() {
  mm_.unregister_notifier(this);
  if (options_.dirty) options_.dirty->set_write_protector(nullptr);
  slots_.remove_listener(this);
  {
    std::lock_guard g(impl_->vmm_mutex);
    impl_->vmm_vcpu.reset();
  }
  impl_->lock_mmu();
  Impl::ZapCtx ctx;
  for (SptNode* root : impl_->roots) impl_->retire_subtree(root, static_cast<int>(kMmuLevels), ctx);
  impl_->free_retired();
  for (detail::SptChunk* c : impl_->pool) detail::spt_unmap_chunk(c);
  impl_->pool.clear();
  impl_->unlock_mmu();
}

void Mmu::register_vcpu(Vcpu* vcpu) {
  impl_->lock_mmu();
  impl_->vcpus.push_back(vcpu);
  impl_->unlock_mmu();
}

void Mmu::unregister_vcpu(Vcpu* vcpu) {
  impl_->lock_mmu();
  std::erase(impl_->vcpus, vcpu);
  impl_->unlock_mmu();
}

// ---------------------------------------------------------------------------------------------
// The page-fault handler.

namespace {

// The exit KVM's kvm_handle_error_pfn (and the no-slot MMIO path) produce for an error pfn.
void error_pfn_to_exit(Pfn pfn, Gpa gpa, Hva hva, bool write, VcpuExit* exit) {
  exit->gpa = gpa;
  exit->hva = hva;
  if (pfn == kPfnNoslot || pfn == kPfnErrRoFault) {
    exit->reason = ExitReason::kMmio;
    exit->mmio.is_write = write;
  } else if (pfn == kPfnErrHwpoison) {
    exit->reason = ExitReason::kHwpoison;
    exit->error = EHWPOISON;
  } else if (pfn == kPfnErrSigpending) {
    exit->reason = ExitReason::kIntr;
    exit->error = EINTR;
  } else {
    exit->reason = ExitReason::kMemoryFault;
    exit->error = EFAULT;
  }
}

}  // namespace

FaultResult Mmu::page_fault(Vcpu& vcpu, Gpa gpa, Access access, bool prefetch, VcpuExit* exit) {
  Impl& im = *impl_;
  Impl::inc(im.c.faults);
  if (prefetch) Impl::inc(im.c.prefetches);
  VcpuExit scratch;
  if (exit == nullptr) exit = &scratch;
  const bool write = access == Access::kWrite;
  const Gfn gfn = gpa_to_gfn(gpa);

  // 1. Snapshot the invalidation sequence before anything is resolved (spec 8.3 step 1).
  const uint64_t mmu_seq = invalidate_seq_.load(std::memory_order_acquire);
  GFNMAP_YIELD2("pf.snapshot", mmu_seq, gfn.value);

  MemslotsReadLock rl = slots_.read_lock();
  const MemslotSet& set = rl.set(vcpu.as_id());
  const Memslot* slot =
      gfn.value < kMmuMaxGfn ? set.vcpu_gfn_to_memslot(vcpu.memslot_cache(), gfn) : nullptr;
  if (slot != nullptr && slot->invalid()) {
    // A slot being deleted or moved: x86 retries instead of caching an MMIO translation.
    Impl::inc(im.c.retries);
    return FaultResult::kRetry;
  }
  if (slot == nullptr) {
    error_pfn_to_exit(kPfnNoslot, gpa, kHvaErrBad, write, exit);
    Impl::inc(im.c.exits);
    return FaultResult::kExit;
  }
  const Hva hva = gfn_to_hva_many(slot, gfn, nullptr, false);

  // 2. NOWAIT first; NEEDS_IO goes async when the vCPU allows, else a synchronous retry.
  bool writable = false;
  Page page;
  const FollFlags wflag = write ? kFollWrite : 0;
  Pfn pfn = faultin_pfn(mm_, slot, gfn, kFollNowait | wflag, &writable, &page);
  if (pfn == kPfnErrNeedsIo) {
    AsyncPfQueue* q = vcpu.async_pf_queue();
    if (!prefetch && q != nullptr && vcpu.options().async_pf) {
      if (q->find_gfn(gfn)) {
        // kvm_find_async_pf_gfn: KVM_REQ_APF_HALT, RET_PF_RETRY.
        exit->reason = ExitReason::kAsyncPfHalt;
        exit->gpa = gpa;
        Impl::inc(im.c.async_halts);
        return FaultResult::kAsync;
      }
      uint32_t token = q->setup_async_pf(gpa, gfn, hva, write ? 1 : 0);
      if (token != 0) {
        exit->reason = ExitReason::kAsyncPfNotPresent;
        exit->gpa = gpa;
        exit->token = token;
        Impl::inc(im.c.async_queued);
        return FaultResult::kAsync;
      }
    }
    Impl::inc(im.c.slow_faults);
    writable = false;
    page = Page{};
    pfn = faultin_pfn(mm_, slot, gfn, kFollInterruptible | wflag, &writable, &page);
  } else if (!is_error_noslot_pfn(pfn)) {
    Impl::inc(im.c.nowait_hits);
  }
  if (is_error_noslot_pfn(pfn)) {
    error_pfn_to_exit(pfn, gpa, hva, write, exit);
    Impl::inc(im.c.exits);
    return FaultResult::kExit;
  }
  GFNMAP_YIELD2("pf.faultin", pfn.value, writable);
  if (options_.after_faultin_hook) options_.after_faultin_hook(gfn);

  // 3. Under the lock: the retry check, then install, then release (spec 8.3 steps 4-5).
  im.lock_mmu();
  if (!GFNMAP_SEEDED_BUG(kNoRetryCheck) && im.retry_gfn(mmu_seq, gfn.value)) {
    release_faultin_page(page, /*unused=*/true, /*dirty=*/false);
    im.unlock_mmu();
    Impl::inc(im.c.retries);
    return FaultResult::kRetry;
  }

  // Leaf size: the host mapping level, capped by options, the slot's bounds and congruence,
  // and 4K while the slot logs dirty pages.
  int level = 1;
  if (!slot->logs_dirty()) {
    level = std::min(static_cast<int>(mm_.host_mapping_level(hva)),
                     static_cast<int>(options_.max_level));
    for (; level > 1; --level) {
      uint64_t n = spt_pages(level);
      uint64_t base = gfn.value & ~(n - 1);
      bool inside = base >= slot->base_gfn.value && base + n <= slot->end_gfn().value;
      bool congruent =
          ((slot->base_gfn.value ^ (slot->userspace_addr.value >> kPageShift)) & (n - 1)) == 0;
      if (inside && congruent) break;
    }
  }

  std::byte* ptr = mm_.page_address(pfn, hva);
  if (ptr == nullptr || !detail::spt_addr_encodable(reinterpret_cast<uint64_t>(ptr))) {
    release_faultin_page(page, /*unused=*/false, writable);
    im.unlock_mmu();
    error_pfn_to_exit(kPfnErrFault, gpa, hva, write, exit);
    Impl::inc(im.c.exits);
    return FaultResult::kExit;
  }
  uint64_t addr = 0;
  SptScatter* scatter = nullptr;
  for (; level > 1; --level) {
    uint64_t n = spt_pages(level);
    uint64_t off = gfn.value & (n - 1);
    std::byte* base_ptr = ptr - (off << kPageShift);
    Pfn base_pfn(pfn.value - off);
    Hva base_hva = hva - (off << kPageShift);
    std::byte* last = mm_.page_address(Pfn(base_pfn.value + n - 1),
                                       base_hva + ((n - 1) << kPageShift));
    if (mm_.page_address(base_pfn, base_hva) == base_ptr &&
        last == base_ptr + ((n - 1) << kPageShift) &&
        detail::spt_addr_encodable(reinterpret_cast<uint64_t>(base_ptr))) {
      addr = reinterpret_cast<uint64_t>(base_ptr);
      break;
    }
    if (level == 2) {
      // Host pages not contiguous in our address space (the model): one pointer per 4K page.
      auto* s = new SptScatter();
      bool ok = true;
      for (uint64_t i = 0; i < n && ok; ++i) {
        s->ptr[i] = mm_.page_address(Pfn(base_pfn.value + i), base_hva + (i << kPageShift));
        ok = s->ptr[i] != nullptr;
      }
      if (ok) {
        scatter = s;
        im.nr_scatter.fetch_add(1, std::memory_order_relaxed);
        addr = reinterpret_cast<uint64_t>(s);
        break;
      }
      delete s;
    }
  }
  if (level == 1) addr = reinterpret_cast<uint64_t>(ptr);

  const bool host_writable = writable && !slot->readonly();
  const uint64_t leaf_gfn = gfn.value & ~(spt_pages(level) - 1);
  uint64_t e = (scatter != nullptr ? addr
                                   : detail::spt_encode_leaf(reinterpret_cast<void*>(addr), leaf_gfn)) |
               spte::kPresent | spte::kExecutable;
  if (host_writable) {
    // A read fault maps writable too whenever the host mapping is (the map_writable upgrade),
    // also on a logging slot, where the writable leaf is then logged below as make_spte does:
    // the kernel reports such read faults dirty (docs/spec-notes.md, G1). Never writable when
    // the host mapping was not.
    e |= spte::kHostWritable | spte::kMmuWritable | spte::kWritable;
  }
  if (!prefetch) e |= spte::kAccessed;
  if (write && (e & spte::kWritable)) e |= spte::kDirty;
  if (page) e |= spte::kRefcounted;
  if (level > 1) e |= spte::kLarge;
  if (scatter != nullptr) e |= spte::kScattered;

  Impl::ZapCtx ctx;
  SptNode* n = im.roots[vcpu.as_id()];
  for (int l = static_cast<int>(kMmuLevels); l > level; --l) {
    unsigned idx = spt_index(gfn.value, l);
    uint64_t cur = n->e[idx].load(std::memory_order_relaxed);
    if (cur & spte::kTable) {
      n = detail::spt_child(cur);
    } else if (spte::is_leaf(cur)) {
      // A larger leaf covers gfn (the host level shrank under it): split it, keep the rest.
      n = im.split_leaf(n, idx, l, gfn.value & ~(spt_pages(l) - 1), false);
      ctx.flush = true;
    } else {
      SptNode* child = im.alloc_child(n, l, idx);
      n->e[idx].store(reinterpret_cast<uint64_t>(child) | spte::kTable,
                      std::memory_order_release);
      n = child;
    }
  }
  unsigned idx = spt_index(gfn.value, level);
  uint64_t old = n->e[idx].load(std::memory_order_relaxed);
  if (old & spte::kTable) {
    // Huge mappings come back (dirty logging turned off): the smaller leaves go.
    n->e[idx].store(0, std::memory_order_relaxed);
    im.retire_subtree(detail::spt_child(old), level - 1, ctx);
  } else if (spte::is_leaf(old)) {
    bool same = (old & (spte::kAddrMask | spte::kScattered)) == (e & (spte::kAddrMask | spte::kScattered)) &&
                !(old & spte::kScattered);
    if (same) {
      e |= old & (spte::kAccessed | spte::kDirty);
      if ((old & spte::kWritable) && !(e & spte::kWritable)) ctx.flush = true;
    } else {
      ctx.flush = true;
    }
    im.drop_leaf(n, idx, old);
  }
  im.set_leaf_pfn(n, idx, pfn.value - (gfn.value - leaf_gfn), &e);
  n->e[idx].store(e, std::memory_order_release);
  Impl::inc(im.c.installs);
  if (level == 2) Impl::inc(im.c.installs_2m);
  if (level == 3) Impl::inc(im.c.installs_1g);
  if (ctx.zapped) Impl::inc(im.c.zapped, ctx.zapped);
  // direct_pte_prefetch: 4K leaves only, never while addresses are being invalidated.
  if (level == 1 && options_.pte_prefetch && im.in_progress == 0) {
    im.pte_prefetch(vcpu, set, n, idx, gfn.value);
  }
  im.flush(ctx.flush);

  // Release under the lock (spec 6): dirty when the host mapping was writable.
  release_faultin_page(page, /*unused=*/false, /*dirty=*/writable);
  im.unlock_mmu();
  GFNMAP_YIELD2("pf.installed", gfn.value, e & spte::kFlagsMask);

  // Logged after the lock is dropped (DirtyLog may block on its own locks); still under the
  // memslots read lock, so the slot is the one the leaf was installed for.
  if ((e & spte::kWritable) && slot->logs_dirty()) mark_page_dirty(&vcpu, *slot, gfn);
  return FaultResult::kFixed;
}

bool Mmu::mark_page_dirty(Vcpu* vcpu, const Memslot& slot, Gfn gfn) {
  if (options_.dirty == nullptr || !slot.logs_dirty()) return false;
  DirtyRing* ring = vcpu != nullptr && vcpu->id() != kVmmVcpuId ? vcpu->dirty_ring() : nullptr;
  return options_.dirty->mark_page_dirty_in_slot(slot, gfn, ring);
}

// ---------------------------------------------------------------------------------------------
// MMU notifier (spec 8.2).

namespace {

// The gfn range of slot covering [start, end) of hva, partial pages rounded outward.
std::pair<uint64_t, uint64_t> hva_range_to_gfns(const Memslot& s, Hva start, Hva end) {
  uint64_t lo = std::max(start.value, s.userspace_addr.value);
  uint64_t hi = std::min(end.value, s.hva_end().value);
  uint64_t g0 = s.base_gfn.value + ((lo - s.userspace_addr.value) >> kPageShift);
  uint64_t g1 = s.base_gfn.value + ((hi - s.userspace_addr.value + kPageSize - 1) >> kPageShift);
  return {g0, g1};
}

}  // namespace

void Mmu::invalidate_range_start(Hva start, Hva end) {
  Impl& im = *impl_;
  slots_.mn_invalidate_begin();
  GFNMAP_YIELD2("mn.start.counted", start.value, end.value);
  MemslotsReadLock rl = slots_.read_lock();
  bool locked = false;
  Impl::ZapCtx ctx;
  unsigned nr_as = static_cast<unsigned>(im.roots.size());
  for (unsigned as = 0; as < nr_as; ++as) {
    rl.set(as).for_each_hva_overlap(start, end, [&](const Memslot& s) {
      auto [g0, g1] = hva_range_to_gfns(s, start, end);
      if (g0 >= g1) return;
      if (!locked) {
        im.lock_mmu();
        locked = true;
        // kvm_mmu_invalidate_begin
        if (++im.in_progress == 1) {
          im.range_start = kInvalidGfn;
          im.range_end = kInvalidGfn;
        }
        im.in_progress_pub.store(im.in_progress, std::memory_order_relaxed);
      }
      // kvm_mmu_invalidate_range_add
      if (im.range_start == kInvalidGfn) {
        im.range_start = g0;
        im.range_end = g1;
      } else {
        im.range_start = std::min(im.range_start, g0);
        im.range_end = std::max(im.range_end, g1);
      }
      im.zap_range(as, g0, g1, ctx);
    });
  }
  if (locked) {
    if (ctx.zapped) Impl::inc(im.c.zapped, ctx.zapped);
    Impl::inc(im.c.invalidations);
    im.flush(ctx.flush);
    im.unlock_mmu();
  }
}

void Mmu::invalidate_range_end(Hva start, Hva end) {
  Impl& im = *impl_;
  {
    MemslotsReadLock rl = slots_.read_lock();
    bool found = false;
    unsigned nr_as = static_cast<unsigned>(im.roots.size());
    for (unsigned as = 0; as < nr_as; ++as) {
      rl.set(as).for_each_hva_overlap(start, end, [&](const Memslot& s) {
        auto [g0, g1] = hva_range_to_gfns(s, start, end);
        if (g0 < g1) found = true;
      });
    }
    if (found) {
      // kvm_mmu_invalidate_end: seq++ before in_progress-- (a fault that sees in_progress == 0
      // also sees the new seq).
      im.lock_mmu();
      invalidate_seq_.fetch_add(1, std::memory_order_release);
      assert(im.in_progress > 0 && "invalidate_range_end without a start");
      if (im.in_progress > 0) --im.in_progress;
      im.in_progress_pub.store(im.in_progress, std::memory_order_relaxed);
      im.unlock_mmu();
    }
  }
  GFNMAP_YIELD2("mn.end.seq_bumped", start.value, end.value);
  slots_.mn_invalidate_end();
}

namespace {
enum class AgeOp { kClear, kClearFlush, kTest };
}

static bool age_range(Mmu::Impl& im, Memslots& slots, Hva start, Hva end, AgeOp op) {
  MemslotsReadLock rl = slots.read_lock();
  bool young = false;
  bool locked = false;
  unsigned nr_as = static_cast<unsigned>(im.roots.size());
  for (unsigned as = 0; as < nr_as; ++as) {
    rl.set(as).for_each_hva_overlap(start, end, [&](const Memslot& s) {
      auto [g0, g1] = hva_range_to_gfns(s, start, end);
      if (g0 >= g1) return;
      if (!locked) {
        im.lock_mmu();
        locked = true;
      }
      auto fn = [&](SptNode* node, unsigned idx, uint64_t e, int, uint64_t) {
        if (!(e & spte::kAccessed)) return;
        young = true;
        if (op == AgeOp::kTest) return;
        // The vCPU may set A or D concurrently: clear A with a CAS loop.
        uint64_t cur = e;
        while ((cur & spte::kAccessed) &&
               !node->e[idx].compare_exchange_weak(cur, cur & ~spte::kAccessed,
                                                   std::memory_order_relaxed)) {
        }
      };
      im.for_each_leaf(im.roots[as], static_cast<int>(kMmuLevels), 0, g0,
                       std::min(g1, kMmuMaxGfn), fn);
    });
  }
  if (locked) {
    // clear_flush_young flushes iff something was young; clear_young never; test_young never.
    if (op == AgeOp::kClearFlush && young) im.flush(true);
    im.unlock_mmu();
  }
  return young;
}

bool Mmu::clear_flush_young(Hva start, Hva end) {
  return age_range(*impl_, slots_, start, end, AgeOp::kClearFlush);
}
bool Mmu::clear_young(Hva start, Hva end) {
  return age_range(*impl_, slots_, start, end, AgeOp::kClear);
}
bool Mmu::test_young(Hva start, Hva end) {
  return age_range(*impl_, slots_, start, end, AgeOp::kTest);
}

void Mmu::release() { zap_all(); }

void Mmu::zap_all() {
  Impl& im = *impl_;
  im.lock_mmu();
  Impl::ZapCtx ctx;
  for (unsigned as = 0; as < im.roots.size(); ++as) im.zap_range(as, 0, kMmuMaxGfn, ctx);
  if (ctx.zapped) Impl::inc(im.c.zapped, ctx.zapped);
  im.flush(ctx.flush);
  im.unlock_mmu();
}

// ---------------------------------------------------------------------------------------------
// Memslot hooks (spec 7.4).

Result<void> Mmu::prepare_memory_region(const Memslot*, const Memslot* new_slot,
                                        MemslotChange change) {
  if ((change == MemslotChange::kCreate || change == MemslotChange::kMove) && new_slot &&
      new_slot->end_gfn().value > kMmuMaxGfn) {
    return make_error(EINVAL, "memslot ends at gfn 0x", std::to_string(new_slot->end_gfn().value),
                      ", beyond the MMU's 48-bit guest physical address width");
  }
  return {};
}

void Mmu::flush_shadow_memslot(const Memslot& slot) {
  Impl& im = *impl_;
  im.lock_mmu();
  Impl::ZapCtx ctx;
  im.zap_range(slot.as_id, slot.base_gfn.value, slot.end_gfn().value, ctx);
  if (ctx.zapped) Impl::inc(im.c.zapped, ctx.zapped);
  im.flush(ctx.flush);
  im.unlock_mmu();
}

void Mmu::commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                               MemslotChange change) {
  if (change != MemslotChange::kFlagsOnly || old_slot == nullptr || new_slot == nullptr) return;
  bool was = old_slot->logs_dirty();
  bool now = new_slot->logs_dirty();
  if (!was && now) {
    // kvm_mmu_slot_apply_flags: split huge leaves; write-protect unless the bitmap starts all
    // set (manual protect + initially set: pages are protected when the VMM clears them).
    bool initially_set = options_.dirty != nullptr && options_.dirty->initially_set();
    Impl& im = *impl_;
    im.lock_mmu();
    Impl::ZapCtx ctx;
    uint64_t wp = 0;
    auto fn = [&](SptNode* node, unsigned idx, uint64_t e, int level, uint64_t leaf_gfn) {
      if (level > 1) {
        im.split_leaf(node, idx, level, leaf_gfn, !initially_set);
        ctx.flush = true;
        return;
      }
      if (!initially_set && (e & spte::kWritable)) {
        uint64_t cur = e;
        while ((cur & spte::kWritable) &&
               !node->e[idx].compare_exchange_weak(cur, cur & ~spte::kWritable,
                                                   std::memory_order_relaxed)) {
        }
        ++wp;
        ctx.flush = true;
      }
    };
    // Split until no huge leaf is left (a 1G leaf splits into 2M leaves, then again).
    for (int pass = 0; pass < 3; ++pass) {
      im.for_each_leaf(im.roots[new_slot->as_id], static_cast<int>(kMmuLevels), 0,
                       new_slot->base_gfn.value, new_slot->end_gfn().value, fn);
    }
    Impl::inc(im.c.write_protected, wp);
    im.flush(ctx.flush);
    im.unlock_mmu();
  } else if (was && !now) {
    // Huge mappings may come back: drop the 4K leaves so the next faults install huge ones
    // (kvm_mmu_zap_collapsible_sptes, applied to the whole slot).
    flush_shadow_memslot(*new_slot);
  }
}

// ---------------------------------------------------------------------------------------------
// Dirty-log write protection (DirtyWriteProtector).

void Mmu::begin_batch() {
  impl_->lock_mmu();
  impl_->batch_locked = true;
  impl_->batch_needs_flush = false;
}

void Mmu::end_batch() {
  Impl& im = *impl_;
  if (!im.batch_locked) return;
  im.flush(im.batch_needs_flush);
  im.batch_needs_flush = false;
  im.batch_locked = false;
  im.unlock_mmu();
}

void Mmu::flush_remote_tlbs(const Memslot&) {
  Impl& im = *impl_;
  bool own = !im.held_by_me();
  if (own) im.lock_mmu();
  im.flush(im.batch_needs_flush);
  im.batch_needs_flush = false;
  if (own) im.unlock_mmu();
}

void Mmu::write_protect(const Memslot& slot, Gfn base, uint64_t mask) {
  Impl& im = *impl_;
  bool own = !im.held_by_me();
  if (own) im.lock_mmu();
  if (slot.as_id < im.roots.size()) {
    uint64_t wp = 0;
    while (mask != 0) {
      unsigned bit = static_cast<unsigned>(__builtin_ctzll(mask));
      mask &= mask - 1;
      uint64_t gfn = base.value + bit;
      if (gfn >= kMmuMaxGfn) continue;
      // Walk under the lock, splitting any huge leaf on the way.
      SptNode* n = im.roots[slot.as_id];
      for (int l = static_cast<int>(kMmuLevels); l >= 1; --l) {
        unsigned idx = spt_index(gfn, l);
        uint64_t e = n->e[idx].load(std::memory_order_relaxed);
        if (e & spte::kTable) {
          n = detail::spt_child(e);
          continue;
        }
        if (!spte::is_leaf(e)) break;
        if (l > 1) {
          n = im.split_leaf(n, idx, l, gfn & ~(spt_pages(l) - 1), false);
          im.batch_needs_flush = true;
          continue;
        }
        uint64_t cur = e;
        while ((cur & spte::kWritable) &&
               !n->e[idx].compare_exchange_weak(cur, cur & ~spte::kWritable,
                                                std::memory_order_relaxed)) {
        }
        if (e & spte::kWritable) {
          ++wp;
          im.batch_needs_flush = true;
        }
        break;
      }
    }
    Impl::inc(im.c.write_protected, wp);
  }
  if (own) {
    im.flush(im.batch_needs_flush);
    im.batch_needs_flush = false;
    im.unlock_mmu();
  }
}

// ---------------------------------------------------------------------------------------------
// Introspection.

long Mmu::invalidate_in_progress() const {
  return impl_->in_progress_pub.load(std::memory_order_relaxed);
}

std::pair<uint64_t, uint64_t> Mmu::invalidate_range() const {
  impl_->lock_mmu();
  auto r = std::make_pair(impl_->range_start, impl_->range_end);
  impl_->unlock_mmu();
  return r;
}

bool Mmu::invalidate_retry_gfn(uint64_t seq, Gfn gfn) const {
  impl_->lock_mmu();
  bool r = impl_->retry_gfn(seq, gfn.value);
  impl_->unlock_mmu();
  return r;
}

Mmu::Leaf Mmu::lookup(unsigned as_id, Gfn gfn) const {
  Leaf leaf;
  if (as_id >= impl_->roots.size() || gfn.value >= kMmuMaxGfn) return leaf;
  impl_->lock_mmu();
  detail::SptWalk w = detail::spt_walk(impl_->roots[as_id], gfn.value);
  if (spte::is_leaf(w.e)) {
    leaf.spte = w.e;
    leaf.level = static_cast<PgLevel>(w.level);
    leaf.pfn = Pfn(impl_->leaf_pfn(w.node, w.idx, w.e) + (gfn.value & (spt_pages(w.level) - 1)));
    leaf.host_ptr = detail::spt_leaf_ptr(w.e, w.level, gfn.value);
  }
  impl_->unlock_mmu();
  return leaf;
}

uint64_t Mmu::count_mapped(unsigned as_id, Gfn start, Gfn end) const {
  if (as_id >= impl_->roots.size()) return 0;
  uint64_t total = 0;
  uint64_t s = start.value;
  uint64_t t = std::min(end.value, kMmuMaxGfn);
  if (s >= t) return 0;
  auto fn = [&](SptNode*, unsigned, uint64_t, int level, uint64_t g) {
    uint64_t g1 = g + spt_pages(level);
    total += std::min(g1, t) - std::max(g, s);
  };
  impl_->lock_mmu();
  impl_->for_each_leaf(impl_->roots[as_id], static_cast<int>(kMmuLevels), 0, s, t, fn);
  impl_->unlock_mmu();
  return total;
}

uint64_t Mmu::metadata_bytes() const {
  uint64_t bytes = impl_->nr_resident.load(std::memory_order_relaxed) * detail::kSptNodeBytes +
                   impl_->nr_scatter.load(std::memory_order_relaxed) * sizeof(SptScatter);
  impl_->lock_mmu();
  bytes += impl_->pfn_overflow.size() * 48;  // node + key + value, approximately
  impl_->unlock_mmu();
  return bytes;
}

MmuStats Mmu::stats() const {
  const auto& c = impl_->c;
  auto g = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  MmuStats s;
  s.faults = g(c.faults);
  s.fast_faults = g(c.fast_faults);
  s.nowait_hits = g(c.nowait_hits);
  s.slow_faults = g(c.slow_faults);
  s.async_queued = g(c.async_queued);
  s.async_halts = g(c.async_halts);
  s.retries = g(c.retries);
  s.exits = g(c.exits);
  s.installs = g(c.installs);
  s.installs_2m = g(c.installs_2m);
  s.installs_1g = g(c.installs_1g);
  s.prefetches = g(c.prefetches);
  s.pte_prefetches = g(c.pte_prefetches);
  s.zapped = g(c.zapped);
  s.write_protected = g(c.write_protected);
  s.splits = g(c.splits);
  s.tlb_flushes = g(c.tlb_flushes);
  s.invalidations = g(c.invalidations);
  s.tables = impl_->nr_nodes.load(std::memory_order_relaxed);
  return s;
}

// ---------------------------------------------------------------------------------------------
// VMM accesses.

VcpuExit Mmu::read_guest(Gpa gpa, std::span<std::byte> out, unsigned as_id) {
  std::lock_guard g(impl_->vmm_mutex);
  if (!impl_->vmm_vcpu || impl_->vmm_vcpu->as_id() != as_id) {
    impl_->vmm_vcpu.reset();
    VcpuOptions o;
    o.as_id = as_id;
    impl_->vmm_vcpu = std::make_unique<Vcpu>(*this, kVmmVcpuId, o);
  }
  return impl_->vmm_vcpu->read(gpa, out);
}

VcpuExit Mmu::write_guest(Gpa gpa, std::span<const std::byte> data, unsigned as_id) {
  std::lock_guard g(impl_->vmm_mutex);
  if (!impl_->vmm_vcpu || impl_->vmm_vcpu->as_id() != as_id) {
    impl_->vmm_vcpu.reset();
    VcpuOptions o;
    o.as_id = as_id;
    impl_->vmm_vcpu = std::make_unique<Vcpu>(*this, kVmmVcpuId, o);
  }
  return impl_->vmm_vcpu->write(gpa, data);
}

}  // namespace gfnmap
