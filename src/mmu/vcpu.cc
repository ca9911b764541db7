// gfnmap MMU: the software vCPU. Guest accesses walk the second-level table lock-free inside an
// access window, fix dirty-log write faults lock-free, and fault everything else in.
#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <thread>

#include "mmu_impl.h"

namespace gfnmap {

using detail::spt_leaf_ptr;
using detail::spt_walk;

// kvm_arch_async_page_*: a not-present event is always "injected" (the vCPU's user sees an
// exit); page ready re-runs the fault as a prefetch on the vCPU's thread.
struct Vcpu::ApfClient final : AsyncPfClient {
  explicit ApfClient(Vcpu& v) : vcpu(v) {}
  bool page_not_present(const AsyncPfWork&) override { return true; }
  void page_ready(const AsyncPfWork& work) override {
    VcpuExit ignored;
    (void)vcpu.mmu_.page_fault(vcpu, work.cr2_or_gpa,
                               (work.error_code & 1) ? Access::kWrite : Access::kRead,
                               /*prefetch=*/true, &ignored);
  }
  Vcpu& vcpu;
};

Vcpu::Vcpu(Mmu& mmu, uint32_t id, VcpuOptions options) : mmu_(mmu), id_(id), options_(options) {
  Mmu::Impl& im = *mmu_.impl_;
  if (options_.as_id >= im.roots.size()) options_.as_id = 0;
  root_ = im.roots[options_.as_id];
  table_epoch_ = &im.table_epoch;
  if (mmu_.options_.dirty != nullptr && id_ != Mmu::kVmmVcpuId) {
    auto ring = mmu_.options_.dirty->create_vcpu(id_);
    ring_ = ring.ok() ? *ring : mmu_.options_.dirty->vcpu_ring(id_);
  }
  if (options_.async_pf && mmu_.options_.async_pf_pool != nullptr && id_ != Mmu::kVmmVcpuId) {
    apf_client_ = std::make_unique<ApfClient>(*this);
    apf_ = std::make_unique<AsyncPfQueue>(*mmu_.options_.async_pf_pool, id_, apf_client_.get());
  }
  mmu_.register_vcpu(this);
}

Vcpu::~Vcpu() {
  apf_.reset();
  mmu_.unregister_vcpu(this);
}

// The slow side of an access: a fault, then either "try again" (*again) or an exit.
VcpuExit Vcpu::handle_miss(Gpa gpa, bool write, uint64_t, uint64_t len_left,
                           const std::byte* src, uint32_t* tries, bool* again) {
  *again = false;
  ++stats_.faults;
  VcpuExit ex;
  FaultResult r = mmu_.page_fault(*this, gpa, write ? Access::kWrite : Access::kRead,
                                  /*prefetch=*/false, &ex);
  switch (r) {
    case FaultResult::kFixed:
    case FaultResult::kSpurious:
      *again = true;
      return {};
    case FaultResult::kRetry:
      ++stats_.retries;
      if (options_.max_retries != 0 && ++*tries > options_.max_retries) {
        ex.reason = ExitReason::kIntr;
        ex.error = EINTR;
        ex.gpa = gpa;
        return ex;
      }
      std::this_thread::yield();
      *again = true;
      return {};
    case FaultResult::kAsync:
      ++stats_.async;
      ex.gpa = gpa;
      return ex;
    case FaultResult::kExit:
      ex.gpa = gpa;
      if (ex.reason == ExitReason::kMmio) {
        ex.mmio.len = static_cast<uint32_t>(std::min<uint64_t>(len_left, 8));
        ex.mmio.is_write = write;
        if (write && src != nullptr) std::memcpy(ex.mmio.data.data(), src, ex.mmio.len);
      }
      return ex;
  }
  return ex;
}

template <class Fn>
[[gnu::noinline]] VcpuExit Vcpu::access_range(Gpa gpa, uint64_t len, bool write,
                                              const std::byte* src, Fn&& fn) {
  VcpuExit ex;
  // KVM_RUN entry check (the ring may have filled or been reset outside this vCPU's accesses).
  ring_full_ = ring_ != nullptr && ring_->soft_full();
  if (ring_full_) {
    ex.reason = ExitReason::kDirtyRingFull;
    ex.gpa = gpa;
    return ex;
  }
  const uint64_t need = write ? (spte::kPresent | spte::kWritable) : spte::kPresent;
  const uint64_t ad = write ? (spte::kAccessed | spte::kDirty) : spte::kAccessed;
  const bool vmm = id_ == Mmu::kVmmVcpuId;
  uint64_t done = 0;
  uint32_t tries = 0;
  while (done < len) {
    const Gpa cur = gpa + done;
    const uint64_t off = cur.value & (kPageSize - 1);
    const uint64_t n = std::min(len - done, kPageSize - off);
    const uint64_t gfn = cur.value >> kPageShift;
    uint64_t e = 0;
    bool hit = false;
    bool fixed_fast = false;
    if (gfn < kMmuMaxGfn) {
      const uint64_t s = enter_access_window();
      detail::SptWalk w = spt_walk(root_, gfn);
      e = w.e;
      if ((e & need) == need && !(e & spte::kTable)) {
        hit = (e & ad) == ad ||
              w.node->e[w.idx].compare_exchange_strong(e, e | ad, std::memory_order_relaxed);
        if (hit) fn(spt_leaf_ptr(e, w.level, gfn) + off, done, n);
      } else if (write && spte::is_dirty_log_protected(e)) {
        // fast_page_fault: write-protected only for dirty logging; make it writable.
        fixed_fast = w.node->e[w.idx].compare_exchange_strong(
            e, e | spte::kWritable | spte::kAccessed | spte::kDirty, std::memory_order_relaxed);
      }
      leave_access_window(s);
    }
    if (hit) {
      done += n;
      ++stats_.accesses;
      tries = 0;
      if (vmm && write) {
        // kvm_write_guest: every write gfnmap makes for the VMM is logged.
        MemslotsReadLock rl = mmu_.slots_.read_lock();
        const Memslot* slot =
            rl.set(options_.as_id).vcpu_gfn_to_memslot(memslot_cache_, Gfn(gfn));
        if (slot != nullptr && !slot->invalid()) mmu_.mark_page_dirty(nullptr, *slot, Gfn(gfn));
      }
      continue;
    }
    if (fixed_fast) {
      GFNMAP_YIELD2("vcpu.fast_fixed", gfn, 0);
      ++stats_.fast_faults;
      Mmu::Impl::inc(mmu_.impl_->c.fast_faults);
      MemslotsReadLock rl = mmu_.slots_.read_lock();
      const Memslot* slot = rl.set(options_.as_id).vcpu_gfn_to_memslot(memslot_cache_, Gfn(gfn));
      if (slot != nullptr && !slot->invalid()) mmu_.mark_page_dirty(this, *slot, Gfn(gfn));
    } else if (e != 0 && (e & need) == need) {
      continue;  // the A/D update raced with a change of the entry: walk again
    } else {
      bool again = false;
      VcpuExit r = handle_miss(cur, write, e, len - done, src ? src + done : nullptr, &tries,
                               &again);
      if (!again) {
        r.bytes_done = done;
        return r;
      }
    }
    if (ring_ != nullptr && (ring_full_ = ring_->soft_full())) {
      // KVM_REQ_DIRTY_RING_SOFT_FULL: exit before the access is retried.
      ex.reason = ExitReason::kDirtyRingFull;
      ex.gpa = cur;
      ex.bytes_done = done;
      return ex;
    }
  }
  ex.bytes_done = done;
  return ex;
}

VcpuExit Vcpu::read(Gpa gpa, std::span<std::byte> out) {
  std::byte* dst = out.data();
  return access_range(gpa, out.size(), false, nullptr,
                      [dst](std::byte* p, uint64_t at, uint64_t n) { std::memcpy(dst + at, p, n); });
}

VcpuExit Vcpu::write(Gpa gpa, std::span<const std::byte> data) {
  const std::byte* src = data.data();
  return access_range(gpa, data.size(), true, src,
                      [src](std::byte* p, uint64_t at, uint64_t n) { std::memcpy(p, src + at, n); });
}

VcpuExit Vcpu::read_u64(Gpa gpa, uint64_t* value) {
  if (try_read_u64(gpa, value)) return VcpuExit{};
  return access_range(gpa, sizeof(uint64_t), false, nullptr,
                      [value](std::byte* p, uint64_t at, uint64_t n) {
                        std::memcpy(reinterpret_cast<std::byte*>(value) + at, p, n);
                      });
}

VcpuExit Vcpu::write_u64(Gpa gpa, uint64_t value) {
  if (try_write_u64(gpa, value)) return VcpuExit{};
  const auto* src = reinterpret_cast<const std::byte*>(&value);
  return access_range(gpa, sizeof(uint64_t), true, src,
                      [src](std::byte* p, uint64_t at, uint64_t n) { std::memcpy(p, src + at, n); });
}

Vcpu::Translation Vcpu::translate(Gpa gpa, Access access) {
  Translation t;
  t.exit = access_range(gpa, 1, access == Access::kWrite, nullptr,
                        [](std::byte*, uint64_t, uint64_t) {});
  if (!t.exit.ok()) return t;
  Mmu::Leaf leaf = mmu_.lookup(options_.as_id, gpa_to_gfn(gpa));
  if (leaf.spte == 0) {
    // Zapped between the access and the lookup: report what a retry would.
    t.exit.reason = ExitReason::kIntr;
    t.exit.error = EAGAIN;
    t.exit.gpa = gpa;
    return t;
  }
  t.host_ptr = leaf.host_ptr + (gpa.value & (kPageSize - 1));
  t.pfn = leaf.pfn;
  t.level = leaf.level;
  t.spte = leaf.spte;
  return t;
}

FaultResult Vcpu::fault(Gpa gpa, Access access, VcpuExit* exit) {
  ++stats_.faults;
  return mmu_.page_fault(*this, gpa, access, /*prefetch=*/false, exit);
}

std::vector<AsyncPfEvent> Vcpu::check_async_pf_completion() {
  if (!apf_) return {};
  apf_->check_completion();
  return apf_->take_events();
}

bool Vcpu::wait_async_pf(long timeout_ms) {
  if (!apf_) return false;
  return apf_->wait_for_completion(timeout_ms);
}

// ---------------------------------------------------------------------------------------------
// The out-of-line table hit: the region cache and every leaf kind.

namespace {

// The leaf for gfn below level-2 table l2, through its flat level-1 array first. *level is the
// leaf's level; 0 when no leaf maps gfn.
uint64_t region_leaf(detail::SptNode* l2, const detail::SptEntry* l1, uint64_t gfn, int* level) {
  const uint64_t e1 = l1[gfn & (detail::kSptRegionPages - 1)].load(std::memory_order_acquire);
  if (e1 != 0) {
    *level = 1;
    return e1;
  }
  const uint64_t e2 = l2->e[detail::spt_index(gfn, 2)].load(std::memory_order_acquire);
  *level = 2;
  return spte::is_leaf(e2) ? e2 : 0;
}

// The level-2 table of gfn's region from the top levels; nullptr when there is none (nothing
// mapped, or a 1G leaf).
detail::SptNode* walk_to_l2(detail::SptNode* root, uint64_t gfn) {
  const uint64_t e4 = root->e[detail::spt_index(gfn, 4)].load(std::memory_order_acquire);
  if (!(e4 & spte::kTable)) return nullptr;
  const uint64_t e3 =
      detail::spt_child(e4)->e[detail::spt_index(gfn, 3)].load(std::memory_order_acquire);
  return (e3 & spte::kTable) ? detail::spt_child(e3) : nullptr;
}

template <bool kWrite>
constexpr uint64_t kFullNeed = kWrite ? (spte::kPresent | spte::kWritable | spte::kAccessed |
                                         spte::kDirty)
                                      : (spte::kPresent | spte::kAccessed);

// The access through leaf e (any level), when it has the bits; inside the caller's window.
template <bool kWrite>
bool leaf_access(uint64_t e, int level, Gpa gpa, uint64_t* value) {
  if (level == 0 || (e & (kFullNeed<kWrite> | spte::kTable)) != kFullNeed<kWrite>) return false;
  std::byte* p = spt_leaf_ptr(e, level, gpa.value >> kPageShift) + (gpa.value & (kPageSize - 1));
  if constexpr (kWrite) {
    std::memcpy(p, value, sizeof(uint64_t));
  } else {
    std::memcpy(value, p, sizeof(uint64_t));
  }
  return true;
}

}  // namespace

template <bool kWrite>
bool Vcpu::fast_u64_full(Gpa gpa, uint64_t* value) {
  const uint64_t off = gpa.value & (kPageSize - 1);
  const uint64_t gfn = gpa.value >> kPageShift;
  if (off > kPageSize - sizeof(uint64_t) || gfn >= kMmuMaxGfn || ring_full_) return false;
  if (kWrite && id_ == Mmu::kVmmVcpuId) return false;  // VMM writes are always logged
  const uint64_t s = enter_access_window();
  const uint64_t epoch = table_epoch_->load(std::memory_order_relaxed);
  if (gfn - l1_base_ >= detail::kSptRegionPages || epoch != l1_epoch_) {
    // Refill the region cache from the top levels (or drop it: a 1G leaf, nothing mapped).
    l2_node_ = walk_to_l2(root_, gfn);
    l1_base_ = l2_node_ != nullptr ? gfn & ~(detail::kSptRegionPages - 1) : kNoBase;
    l1_ = l2_node_ != nullptr ? detail::spt_region_entries(l2_node_) : nullptr;
    l1_epoch_ = epoch;
  }
  bool hit;
  int level = 0;
  if (l2_node_ != nullptr) {
    const uint64_t e = region_leaf(l2_node_, l1_, gfn, &level);
    hit = leaf_access<kWrite>(e, level, gpa, value);
  } else {
    const detail::SptWalk w = spt_walk(root_, gfn);
    hit = leaf_access<kWrite>(w.e, spte::is_leaf(w.e) ? w.level : 0, gpa, value);
  }
  leave_access_window(s);
  return hit;
}

template bool Vcpu::fast_u64_full<false>(Gpa, uint64_t*);
template bool Vcpu::fast_u64_full<true>(Gpa, uint64_t*);

// ---------------------------------------------------------------------------------------------
// GuestMode.

Vcpu::GuestMode::GuestMode(Vcpu& vcpu) : vcpu_(vcpu) {
  [[maybe_unused]] std::atomic<uint64_t>* prev =
      vcpu_.guest_kick_.exchange(&base_, std::memory_order_seq_cst);
  assert(prev == nullptr && "two GuestModes on one Vcpu");
  enter();
}

Vcpu::GuestMode::~GuestMode() {
  if (inside_) leave();
  vcpu_.guest_kick_.store(nullptr, std::memory_order_seq_cst);
  while (vcpu_.kicking_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
}

// Under the MMU lock (one flush at a time), with this vCPU in a window: the Dekker pair with
// ~GuestMode (see Vcpu::guest_kick_).
void Vcpu::kick_guest_mode() {
  kicking_.store(1, std::memory_order_seq_cst);
  if (std::atomic<uint64_t>* base = guest_kick_.load(std::memory_order_seq_cst)) {
    base->store(GuestMode::kKicked, std::memory_order_relaxed);
  }
  kicking_.store(0, std::memory_order_release);
}

// The base (and so any kick) is reset before the window opens (the window's release store
// orders the two): a flush that sees the new window kicks after this reset, so the kick cannot
// be lost; a kick left from an earlier window is overwritten (that window has ended).
void Vcpu::GuestMode::enter() {
  Vcpu& v = vcpu_;
  base_.store(kNoBase, std::memory_order_relaxed);
  v.guest_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  seq_ = v.enter_access_window();
  inside_ = true;
  // KVM_RUN entry check, as access_range does: a soft-full ring lets nothing run.
  v.ring_full_ = v.ring_ != nullptr && v.ring_->soft_full();
  ring_full_ = v.ring_full_;
  writes_ = v.id_ != Mmu::kVmmVcpuId;
}

// The base is reset first, so the inline hit misses while outside.
void Vcpu::GuestMode::leave() {
  base_.store(kNoBase, std::memory_order_relaxed);
  vcpu_.guest_thread_.store(std::thread::id{}, std::memory_order_relaxed);
  inside_ = false;
  vcpu_.leave_access_window(seq_);
}

template <bool kWrite>
bool Vcpu::GuestMode::hit_full(Gpa gpa, uint64_t* value) {
  const uint64_t off = gpa.value & (kPageSize - 1);
  const uint64_t gfn = gpa.value >> kPageShift;
  if (!inside_) enter();  // outside since an exit
  uint64_t base = base_.load(std::memory_order_relaxed);
  for (;;) {
    if (base == kKicked) {
      leave();  // the flush waiting for this window goes on
      enter();
      base = kNoBase;
    }
    if (ring_full_ || off > kPageSize - sizeof(uint64_t) || gfn >= kMmuMaxGfn ||
        (kWrite && !writes_)) {
      return false;  // (the base stays unmatched while the ring is full)
    }
    if (gfn - base < detail::kSptRegionPages) break;
    // Refill the region cache from the top levels (valid until this window ends). l1_ and l2_
    // are this thread's; base_ publishes them to its own later hits only.
    detail::SptNode* l2 = walk_to_l2(vcpu_.root_, gfn);
    if (l2 == nullptr) {
      // Nothing cached: a 1G leaf (or nothing) maps the region; walk from the root.
      const detail::SptWalk w = spt_walk(vcpu_.root_, gfn);
      return leaf_access<kWrite>(w.e, spte::is_leaf(w.e) ? w.level : 0, gpa, value);
    }
    l2_ = l2;
    l1_ = detail::spt_region_entries(l2);
    if (base_.compare_exchange_strong(base, gfn & ~(detail::kSptRegionPages - 1),
                                      std::memory_order_relaxed)) {
      break;
    }
    // A kick came in between (base now holds it).
  }
  int level = 0;
  const uint64_t e = region_leaf(l2_, l1_, gfn, &level);
  return leaf_access<kWrite>(e, level, gpa, value);
}

template bool Vcpu::GuestMode::hit_full<false>(Gpa, uint64_t*);
template bool Vcpu::GuestMode::hit_full<true>(Gpa, uint64_t*);

// An exit leaves the GuestMode outside (KVM leaves guest mode on every exit).
VcpuExit Vcpu::GuestMode::read_u64(Gpa gpa, uint64_t* value) {
  if (try_read_u64(gpa, value)) return VcpuExit{};
  if (inside_) leave();
  VcpuExit ex = vcpu_.read_u64(gpa, value);
  if (ex.ok()) enter();
  return ex;
}

VcpuExit Vcpu::GuestMode::write_u64(Gpa gpa, uint64_t value) {
  if (try_write_u64(gpa, value)) return VcpuExit{};
  if (inside_) leave();
  VcpuExit ex = vcpu_.write_u64(gpa, value);
  if (ex.ok()) enter();
  return ex;
}

}  // namespace gfnmap
