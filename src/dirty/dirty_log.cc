// gfnmap dirty: the VM's dirty-log state: bitmaps per (as_id, slot id) kept in step with memslot
// changes, KVM_GET/CLEAR_DIRTY_LOG, the dirty-ring capability and KVM_RESET_DIRTY_RINGS.
#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <map>
#include <mutex>
#include <new>
#include <vector>

#include "gfnmap/dirty.h"
#include "sched/sched_hooks.h"

namespace gfnmap {

namespace {

// One slot's dirty bitmap (memslot->dirty_bitmap). Bit i of word i / 64 is page base_gfn + i;
// bits at or above npages are always 0.
struct SlotBitmap {
  uint64_t npages = 0;
  uint64_t nwords = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> words;
};

constexpr uint32_t kChunkShift = 8;
constexpr uint32_t kChunkSize = 1u << kChunkShift;      // ids per chunk
constexpr uint32_t kNrChunks = 65536u >> kChunkShift;  // every uint16_t id
constexpr unsigned kMaxAddressSpaces = 2;

struct Chunk {
  std::array<std::atomic<SlotBitmap*>, kChunkSize> bitmaps{};
};

// Set when reporting bits to the protector: one begin/end pair per ioctl.
class ProtectBatch {
 public:
  explicit ProtectBatch(DirtyWriteProtector* p) : p_(p) {}
  ~ProtectBatch() {
    if (started_) p_->end_batch();
  }
  ProtectBatch(const ProtectBatch&) = delete;
  ProtectBatch& operator=(const ProtectBatch&) = delete;

  void protect(const Memslot& slot, Gfn base, uint64_t mask) {
    if (p_ == nullptr || mask == 0) return;
    if (!started_) {
      p_->begin_batch();
      started_ = true;
    }
    p_->write_protect(slot, base, mask);
  }
  void flush(const Memslot& slot) {
    if (p_ != nullptr && started_) p_->flush_remote_tlbs(slot);
  }

 private:
  DirtyWriteProtector* p_;
  bool started_ = false;
};

}  // namespace

struct DirtyLog::Impl {
  Memslots& memslots;
  DirtyLogConfig config;
  unsigned nr_as;
  uint32_t nr_user_slots;

  std::atomic<DirtyWriteProtector*> protector{nullptr};
  std::atomic<uint64_t> manual_flags{0};
  std::atomic<uint32_t> ring_size_bytes{0};
  std::atomic<bool> ring_with_bitmap{false};

  // Bitmap table: chunks are allocated once and live as long as DirtyLog; bitmaps are
  // published with release stores. Lifetime rule (KVM's: memslot->dirty_bitmap is freed after
  // the memslot swap's synchronize_srcu): every reader of a bitmap holds a MemslotsReadLock in
  // which the slot logs dirty pages, and a bitmap is freed only (a) in commit_memory_region,
  // which Memslots calls after the swap has waited out every reader of the sets that still
  // showed the slot logging, or (b) in prepare_memory_region when it is a leftover of an
  // aborted change, which no published set shows as logging. So no second grace period (and
  // no SRCU of dirty/'s own) is needed.
  std::array<std::array<std::atomic<Chunk*>, kNrChunks>, kMaxAddressSpaces> table{};
  std::mutex table_mu;  // serialises table writers (memslot listener calls)
  std::atomic<uint64_t> bitmap_bytes{0};

  mutable std::mutex vcpu_mu;  // kvm->lock for vCPU creation and the ring map
  bool vcpu_created = false;
  std::map<uint32_t, std::unique_ptr<DirtyRing>> rings;
  std::mutex reset_mu;  // serialises KVM_RESET_DIRTY_RINGS (kvm->slots_lock)

  Impl(Memslots& m, DirtyLogConfig c)
      : memslots(m),
        config(c),
        nr_as(std::min(m.config().nr_address_spaces, kMaxAddressSpaces)),
        nr_user_slots(m.config().nr_user_slots) {}

  ~Impl() {
    for (auto& as : table) {
      for (auto& chunk_ptr : as) {
        Chunk* chunk = chunk_ptr.load(std::memory_order_relaxed);
        if (chunk == nullptr) continue;
        for (auto& b : chunk->bitmaps) delete b.load(std::memory_order_relaxed);
        delete chunk;
      }
    }
  }

  bool uses_bitmaps() const {
    return ring_size_bytes.load(std::memory_order_acquire) == 0 ||
           ring_with_bitmap.load(std::memory_order_acquire);
  }
  bool manual() const { return manual_flags.load(std::memory_order_acquire) != 0; }

  // Reader side; call inside a MemslotsReadLock whose set shows (as_id, id) logging.
  SlotBitmap* lookup(unsigned as_id, uint16_t id) const {
    if (as_id >= nr_as) return nullptr;
    const Chunk* chunk = table[as_id][id >> kChunkShift].load(std::memory_order_acquire);
    if (chunk == nullptr) return nullptr;
    return chunk->bitmaps[id & (kChunkSize - 1)].load(std::memory_order_acquire);
  }

  // Writer side (table_mu held). Publishes `bitmap` (may be nullptr) for (as_id, id) and frees
  // the previous one at once: callers only replace bitmaps no reader can hold (see `table`).
  void publish_locked(unsigned as_id, uint16_t id, SlotBitmap* bitmap) {
    std::atomic<Chunk*>& chunk_ptr = table[as_id][id >> kChunkShift];
    Chunk* chunk = chunk_ptr.load(std::memory_order_relaxed);
    if (chunk == nullptr) {
      if (bitmap == nullptr) return;
      chunk = new Chunk();
      chunk_ptr.store(chunk, std::memory_order_release);
    }
    SlotBitmap* old = chunk->bitmaps[id & (kChunkSize - 1)].exchange(bitmap,
                                                                     std::memory_order_acq_rel);
    if (bitmap != nullptr) bitmap_bytes.fetch_add(bitmap->nwords * 8, std::memory_order_relaxed);
    if (old != nullptr) {
      bitmap_bytes.fetch_sub(old->nwords * 8, std::memory_order_relaxed);
      delete old;
    }
  }

  SlotBitmap* current_locked(unsigned as_id, uint16_t id) const {
    const Chunk* chunk = table[as_id][id >> kChunkShift].load(std::memory_order_relaxed);
    return chunk ? chunk->bitmaps[id & (kChunkSize - 1)].load(std::memory_order_relaxed) : nullptr;
  }

  // kvm_alloc_dirty_bitmap (+ bitmap_set when initially set). nullptr on allocation failure.
  SlotBitmap* alloc_bitmap(uint64_t npages) const {
    auto* bitmap = new (std::nothrow) SlotBitmap();
    if (bitmap == nullptr) return nullptr;
    bitmap->npages = npages;
    bitmap->nwords = dirty_bitmap_words(npages);
    bitmap->words.reset(new (std::nothrow) std::atomic<uint64_t>[bitmap->nwords]);
    if (bitmap->nwords != 0 && !bitmap->words) {
      delete bitmap;
      return nullptr;
    }
    const bool all_ones = (manual_flags.load(std::memory_order_acquire) &
                           kDirtyLogInitiallySet) != 0;
    for (uint64_t i = 0; i < bitmap->nwords; ++i) {
      uint64_t value = 0;
      if (all_ones) {
        const uint64_t left = npages - i * 64;
        value = left >= 64 ? ~uint64_t{0} : (uint64_t{1} << left) - 1;
      }
      bitmap->words[i].store(value, std::memory_order_relaxed);
    }
    return bitmap;
  }

  // Shared argument checks of GET/CLEAR_DIRTY_LOG, in KVM's order up to the slot lookup.
  Result<void> check_ids(uint32_t slot, unsigned* as_id, uint16_t* id) const {
    if (!uses_bitmaps()) {
      return make_error(ENXIO, "dirty log: only the dirty ring is in use");
    }
    *as_id = slot >> 16;
    *id = static_cast<uint16_t>(slot & 0xffff);
    if (*as_id >= nr_as) {
      return make_error(EINVAL, "dirty log: address space ", *as_id, " >= ", nr_as);
    }
    if (*id >= nr_user_slots) {
      return make_error(EINVAL, "dirty log: slot id ", *id, " is not a user slot (< ",
                        nr_user_slots, ")");
    }
    return {};
  }
};

DirtyLog::DirtyLog(Memslots& memslots, DirtyLogConfig config)
    : impl_(std::make_unique<Impl>(memslots, config)) {
  memslots.add_listener(this);
  // Slots that already log dirty pages get their bitmap now (a late DirtyLog).
  std::lock_guard<std::mutex> guard(impl_->table_mu);
  auto lock = memslots.read_lock();
  for (unsigned as = 0; as < impl_->nr_as; ++as) {
    for (const Memslot& slot : lock.set(as).slots()) {
      if (slot.logs_dirty() && impl_->current_locked(as, slot.id) == nullptr) {
        impl_->publish_locked(as, slot.id, impl_->alloc_bitmap(slot.npages));
      }
    }
  }
}

DirtyLog::~DirtyLog() { impl_->memslots.remove_listener(this); }

void DirtyLog::set_write_protector(DirtyWriteProtector* protector) {
  impl_->protector.store(protector, std::memory_order_release);
}

Result<void> DirtyLog::enable_manual_dirty_log_protect(uint64_t flags) {
  // As KVM: KVM_DIRTY_LOG_INITIALLY_SET is only allowed together with the enable bit.
  const uint64_t allowed =
      (flags & kDirtyLogManualProtectEnable) != 0 ? kDirtyLogManualCaps : kDirtyLogManualProtectEnable;
  if ((flags & ~allowed) != 0) {
    return make_error(EINVAL, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: flags ", flags,
                      " (unknown bits, or INITIALLY_SET without MANUAL_PROTECT_ENABLE)");
  }
  impl_->manual_flags.store(flags, std::memory_order_release);
  return {};
}

bool DirtyLog::manual_protect() const { return impl_->manual(); }
bool DirtyLog::initially_set() const {
  return (impl_->manual_flags.load(std::memory_order_acquire) & kDirtyLogInitiallySet) != 0;
}

Result<void> DirtyLog::enable_dirty_ring(uint32_t size_bytes) {
  const uint64_t reserved_bytes =
      (uint64_t{kDirtyRingRsvdEntries} + impl_->config.ring_arch_reserved_entries) *
      sizeof(DirtyGfn);
  if (size_bytes == 0 || !std::has_single_bit(size_bytes)) {
    return make_error(EINVAL, "dirty ring: size ", size_bytes, " is not a power of two");
  }
  if (size_bytes < kPageSize || size_bytes < reserved_bytes) {
    return make_error(EINVAL, "dirty ring: size ", size_bytes,
                      " is below one page or the reserved area of ", reserved_bytes, " bytes");
  }
  if (uint64_t{size_bytes} > uint64_t{kDirtyRingMaxEntries} * sizeof(DirtyGfn)) {
    return make_error(E2BIG, "dirty ring: ", size_bytes / sizeof(DirtyGfn), " entries > ",
                      kDirtyRingMaxEntries);
  }
  std::lock_guard<std::mutex> guard(impl_->vcpu_mu);
  if (impl_->ring_size_bytes.load(std::memory_order_relaxed) != 0) {
    return make_error(EINVAL, "dirty ring: already enabled");
  }
  if (impl_->vcpu_created) {
    return make_error(EINVAL, "dirty ring: vCPUs already exist");
  }
  impl_->ring_size_bytes.store(size_bytes, std::memory_order_release);
  // Bitmaps are no longer used (kvm_use_dirty_bitmap); existing ones stay until their slot
  // stops logging, as in KVM, but GET/CLEAR_DIRTY_LOG now give ENXIO.
  return {};
}

Result<void> DirtyLog::enable_dirty_ring_with_bitmap() {
  if (impl_->ring_size_bytes.load(std::memory_order_acquire) == 0) {
    return make_error(EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: the dirty ring is not enabled");
  }
  auto lock = impl_->memslots.read_lock();
  for (unsigned as = 0; as < impl_->nr_as; ++as) {
    if (lock.set(as).size() != 0) {
      return make_error(EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: memslots are not empty");
    }
  }
  impl_->ring_with_bitmap.store(true, std::memory_order_release);
  return {};
}

uint32_t DirtyLog::dirty_ring_size_bytes() const {
  return impl_->ring_size_bytes.load(std::memory_order_acquire);
}

bool DirtyLog::uses_bitmaps() const { return impl_->uses_bitmaps(); }

Result<DirtyRing*> DirtyLog::create_vcpu(uint32_t vcpu_id) {
  std::lock_guard<std::mutex> guard(impl_->vcpu_mu);
  if (impl_->rings.count(vcpu_id) != 0) {
    return make_error(EEXIST, "dirty log: vCPU ", vcpu_id, " already created");
  }
  impl_->vcpu_created = true;
  const uint32_t size_bytes = impl_->ring_size_bytes.load(std::memory_order_relaxed);
  std::unique_ptr<DirtyRing> ring;
  if (size_bytes != 0) {
    ring = std::make_unique<DirtyRing>(
        vcpu_id, size_bytes / static_cast<uint32_t>(sizeof(DirtyGfn)),
        kDirtyRingRsvdEntries + impl_->config.ring_arch_reserved_entries);
  }
  DirtyRing* result = ring.get();
  impl_->rings.emplace(vcpu_id, std::move(ring));
  return result;
}

DirtyRing* DirtyLog::vcpu_ring(uint32_t vcpu_id) const {
  std::lock_guard<std::mutex> guard(impl_->vcpu_mu);
  auto it = impl_->rings.find(vcpu_id);
  return it == impl_->rings.end() ? nullptr : it->second.get();
}

bool DirtyLog::mark_page_dirty_in_slot(const Memslot& slot, Gfn gfn, DirtyRing* vcpu_ring) {
  if (!slot.logs_dirty() || !slot.contains(gfn)) return false;
  const uint64_t rel_gfn = gfn - slot.base_gfn;
  if (vcpu_ring != nullptr && impl_->ring_size_bytes.load(std::memory_order_relaxed) != 0) {
    vcpu_ring->push(dirty_log_slot(slot.as_id, slot.id), rel_gfn);
    return vcpu_ring->soft_full();
  }
  // The caller's MemslotsReadLock keeps the bitmap alive (see Impl::table).
  SlotBitmap* bitmap = impl_->lookup(slot.as_id, slot.id);
  // A stale slot (deleted or re-created under the caller) may find another bitmap or none; the
  // bound check keeps the write inside it, and a spurious bit is harmless.
  if (bitmap != nullptr && rel_gfn < bitmap->npages) {
    bitmap->words[rel_gfn / 64].fetch_or(uint64_t{1} << (rel_gfn % 64),
                                         std::memory_order_release);
  }
  return false;
}

Result<uint64_t> DirtyLog::get_dirty_log(uint32_t slot, std::span<uint64_t> out) {
  unsigned as_id = 0;
  uint16_t id = 0;
  if (auto r = impl_->check_ids(slot, &as_id, &id); !r) return r.error();
  auto lock = impl_->memslots.read_lock();
  const Memslot* memslot = lock.set(as_id).id_to_memslot(id);
  if (memslot == nullptr || !memslot->logs_dirty()) {
    return make_error(ENOENT, "KVM_GET_DIRTY_LOG: slot ", as_id, ":", id,
                      memslot ? " does not log dirty pages" : " does not exist");
  }
  SlotBitmap* bitmap = impl_->lookup(as_id, id);
  if (bitmap == nullptr || bitmap->npages != memslot->npages) {
    return make_error(ENOENT, "KVM_GET_DIRTY_LOG: slot ", as_id, ":", id, " has no dirty bitmap");
  }
  if (out.size() < bitmap->nwords) {
    return make_error(EFAULT, "KVM_GET_DIRTY_LOG: buffer of ", out.size(), " words < ",
                      bitmap->nwords);
  }
  uint64_t dirty = 0;
  if (impl_->manual()) {
    for (uint64_t i = 0; i < bitmap->nwords; ++i) {
      out[i] = bitmap->words[i].load(std::memory_order_acquire);
      dirty += static_cast<uint64_t>(std::popcount(out[i]));
    }
    return dirty;
  }
  ProtectBatch batch(impl_->protector.load(std::memory_order_acquire));
  for (uint64_t i = 0; i < bitmap->nwords; ++i) {
    // Skip clean words without a write (the common case of a sparse log).
    if (bitmap->words[i].load(std::memory_order_relaxed) == 0) {
      out[i] = 0;
      continue;
    }
    const uint64_t mask = bitmap->words[i].exchange(0, std::memory_order_acq_rel);
    GFNMAP_YIELD2("dirty.harvest.cleared", i, mask);
    out[i] = mask;
    dirty += static_cast<uint64_t>(std::popcount(mask));
    batch.protect(*memslot, memslot->base_gfn + i * 64, mask);
  }
  if (dirty != 0) batch.flush(*memslot);
  return dirty;
}

Result<uint64_t> DirtyLog::clear_dirty_log(uint32_t slot, uint64_t first_page, uint32_t num_pages,
                                           std::span<const uint64_t> mask_bits) {
  unsigned as_id = 0;
  uint16_t id = 0;
  if (auto r = impl_->check_ids(slot, &as_id, &id); !r) return r.error();
  if (first_page % 64 != 0) {
    return make_error(EINVAL, "KVM_CLEAR_DIRTY_LOG: first_page ", first_page,
                      " is not a multiple of 64");
  }
  auto lock = impl_->memslots.read_lock();
  const Memslot* memslot = lock.set(as_id).id_to_memslot(id);
  if (memslot == nullptr || !memslot->logs_dirty()) {
    return make_error(ENOENT, "KVM_CLEAR_DIRTY_LOG: slot ", as_id, ":", id,
                      memslot ? " does not log dirty pages" : " does not exist");
  }
  SlotBitmap* bitmap = impl_->lookup(as_id, id);
  if (bitmap == nullptr || bitmap->npages != memslot->npages) {
    return make_error(ENOENT, "KVM_CLEAR_DIRTY_LOG: slot ", as_id, ":", id,
                      " has no dirty bitmap");
  }
  const uint64_t npages = memslot->npages;
  if (first_page > npages) {
    return make_error(EINVAL, "KVM_CLEAR_DIRTY_LOG: first_page ", first_page, " > npages ",
                      npages);
  }
  if (num_pages > npages - first_page) {
    return make_error(EINVAL, "KVM_CLEAR_DIRTY_LOG: num_pages ", num_pages,
                      " runs past the slot end (", npages - first_page, " pages left)");
  }
  if (num_pages < npages - first_page && num_pages % 64 != 0) {
    return make_error(EINVAL, "KVM_CLEAR_DIRTY_LOG: num_pages ", num_pages,
                      " is not a multiple of 64 and does not end at the slot end");
  }
  const uint64_t nwords = dirty_bitmap_words(num_pages);
  if (mask_bits.size() < nwords) {
    return make_error(EFAULT, "KVM_CLEAR_DIRTY_LOG: buffer of ", mask_bits.size(), " words < ",
                      nwords);
  }
  uint64_t cleared = 0;
  ProtectBatch batch(impl_->protector.load(std::memory_order_acquire));
  const uint64_t first_word = first_page / 64;
  for (uint64_t i = 0; i < nwords; ++i) {
    uint64_t mask = mask_bits[i];
    if (mask == 0) continue;
    // Bits beyond the slot are never set in the bitmap, so mask & old ignores them.
    mask &= bitmap->words[first_word + i].fetch_and(~mask, std::memory_order_acq_rel);
    if (mask == 0) continue;
    cleared += static_cast<uint64_t>(std::popcount(mask));
    batch.protect(*memslot, memslot->base_gfn + (first_word + i) * 64, mask);
  }
  if (cleared != 0) batch.flush(*memslot);
  return cleared;
}

Result<uint64_t> DirtyLog::reset_dirty_rings() {
  if (impl_->ring_size_bytes.load(std::memory_order_acquire) == 0) {
    return make_error(EINVAL, "KVM_RESET_DIRTY_RINGS: the dirty ring is not enabled");
  }
  std::lock_guard<std::mutex> reset_guard(impl_->reset_mu);
  std::vector<DirtyRing*> rings;
  {
    std::lock_guard<std::mutex> guard(impl_->vcpu_mu);
    for (auto& [vcpu_id, ring] : impl_->rings) {
      if (ring) rings.push_back(ring.get());
    }
  }
  auto lock = impl_->memslots.read_lock();
  ProtectBatch batch(impl_->protector.load(std::memory_order_acquire));
  std::vector<const Memslot*> touched;

  // kvm_reset_dirty_gfn: entries of absent slots or beyond the slot end are skipped.
  auto flush_window = [&](uint32_t slot, uint64_t offset, uint64_t mask) {
    if (mask == 0) return;
    const unsigned as_id = slot >> 16;
    const uint16_t id = static_cast<uint16_t>(slot & 0xffff);
    if (as_id >= impl_->nr_as || id >= impl_->nr_user_slots) return;
    const Memslot* memslot = lock.set(as_id).id_to_memslot(id);
    if (memslot == nullptr) return;
    const uint64_t last = offset + static_cast<uint64_t>(63 - std::countl_zero(mask));
    if (last < offset || last >= memslot->npages) return;
    batch.protect(*memslot, memslot->base_gfn + offset, mask);
    if (std::find(touched.begin(), touched.end(), memslot) == touched.end()) {
      touched.push_back(memslot);
    }
  };

  uint64_t total = 0;
  for (DirtyRing* ring : rings) {
    // The current window: gfn offsets [cur_offset, cur_offset + 64) of cur_slot.
    bool have = false;
    uint32_t cur_slot = 0;
    uint64_t cur_offset = 0;
    uint64_t mask = 0;
    uint32_t reset = ring->reset_index_.load(std::memory_order_relaxed);
    const uint32_t dirty = ring->dirty_index_.load(std::memory_order_acquire);
    while (reset != dirty) {
      DirtyGfn& entry = ring->entries_[reset & (ring->size_ - 1)];
      if ((entry.flags.load(std::memory_order_acquire) & kDirtyGfnReset) == 0) break;
      const uint32_t slot = entry.slot;
      const uint64_t offset = entry.offset;
      entry.flags.store(0, std::memory_order_relaxed);
      // Publishing reset_index hands the entry back to the vCPU (release orders the clear).
      ++reset;
      ring->reset_index_.store(reset, std::memory_order_release);
      ++total;
      if (have && slot == cur_slot) {
        if (offset >= cur_offset && offset - cur_offset < 64) {
          mask |= uint64_t{1} << (offset - cur_offset);
          continue;
        }
        // Below the window: slide it down if every bit still fits.
        if (offset < cur_offset && cur_offset - offset < 64) {
          const uint64_t shift = cur_offset - offset;
          if (std::countl_zero(mask) >= static_cast<int>(shift)) {
            mask = (mask << shift) | 1;
            cur_offset = offset;
            continue;
          }
        }
      }
      if (have) flush_window(cur_slot, cur_offset, mask);
      have = true;
      cur_slot = slot;
      cur_offset = offset;
      mask = 1;
    }
    if (have) flush_window(cur_slot, cur_offset, mask);
  }
  for (const Memslot* memslot : touched) batch.flush(*memslot);
  return total;
}

Result<void> DirtyLog::prepare_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                             MemslotChange change) {
  if (change == MemslotChange::kDelete || new_slot == nullptr) return {};
  if (new_slot->as_id >= impl_->nr_as) return {};
  std::lock_guard<std::mutex> guard(impl_->table_mu);
  SlotBitmap* current = impl_->current_locked(new_slot->as_id, new_slot->id);
  const bool was_logging = old_slot != nullptr && old_slot->logs_dirty() &&
                           old_slot->as_id == new_slot->as_id && old_slot->id == new_slot->id;
  if (!new_slot->logs_dirty() || !impl_->uses_bitmaps()) {
    // Dropped in commit when logging turns off. A bitmap left behind by a prepare that another
    // listener aborted (the old slot does not log) is dropped now.
    if (!was_logging && current != nullptr) impl_->publish_locked(new_slot->as_id, new_slot->id, nullptr);
    return {};
  }
  if (was_logging && current != nullptr) {
    // Reused (MOVE keeps npages: KVM forbids resizing). Readers of the published set may hold
    // it, so it is never replaced here.
    return {};
  }
  SlotBitmap* fresh = impl_->alloc_bitmap(new_slot->npages);
  if (fresh == nullptr) {
    return make_error(ENOMEM, "dirty log: cannot allocate a bitmap of ", new_slot->npages,
                      " pages");
  }
  impl_->publish_locked(new_slot->as_id, new_slot->id, fresh);
  return {};
}

void DirtyLog::commit_memory_region(const Memslot* old_slot, const Memslot* new_slot,
                                    MemslotChange /*change*/) {
  const Memslot* gone = nullptr;
  if (new_slot == nullptr || !new_slot->logs_dirty()) {
    gone = new_slot != nullptr ? new_slot : old_slot;
  }
  if (gone == nullptr || gone->as_id >= impl_->nr_as) return;
  std::lock_guard<std::mutex> guard(impl_->table_mu);
  impl_->publish_locked(gone->as_id, gone->id, nullptr);
}

uint64_t DirtyLog::bitmap_bytes() const {
  return impl_->bitmap_bytes.load(std::memory_order_relaxed);
}

}  // namespace gfnmap
