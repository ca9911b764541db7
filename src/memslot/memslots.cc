// gfnmap memslots: the writer (KVM_SET_USER_MEMORY_REGION checks in KVM's order, INVALID
// window, swaps with generations and the wait for invalidations) and the read lock.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <utility>

#include "memslot_set_impl.h"
#include "sched/sched_hooks.h"
#include "srcu.h"
#include "test_peer.h"

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// Listener defaults and names.

Result<void> MemslotListener::prepare_memory_region(const Memslot*, const Memslot*,
                                                    MemslotChange) {
  return {};
}
void MemslotListener::flush_shadow_memslot(const Memslot&) {}
void MemslotListener::commit_memory_region(const Memslot*, const Memslot*, MemslotChange) {}
void MemslotListener::memslots_updated(unsigned, uint64_t) {}

std::string_view to_string(MemslotChange change) {
  switch (change) {
    case MemslotChange::kCreate: return "CREATE";
    case MemslotChange::kDelete: return "DELETE";
    case MemslotChange::kMove: return "MOVE";
    case MemslotChange::kFlagsOnly: return "FLAGS_ONLY";
  }
  return "UNKNOWN";
}

// ---------------------------------------------------------------------------------------------
// State. Lock order: slots_lock, then mn_lock. Readers take neither.

namespace {

// kvm_gmem_bind's file lookup: 0 for a guest_memfd file, EBADF for a closed fd, EINVAL for any
// other file.
int guest_memfd_file_errno(uint32_t fd) {
  if (fd > static_cast<uint32_t>(INT32_MAX) || ::fcntl(static_cast<int>(fd), F_GETFD) < 0) {
    return EBADF;
  }
  char link[64];
  char target[64] = {};
  std::snprintf(link, sizeof link, "/proc/self/fd/%u", fd);
  ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n < 0) return EINVAL;
  return std::string_view(target, static_cast<size_t>(n)) == "anon_inode:[kvm-gmem]" ? 0 : EINVAL;
}

// The calling thread's read sections (any Memslots), for set_memory_region's EDEADLK: a writer
// inside one would wait for itself in synchronize(). Two counts that only grow and only their
// thread writes, not one depth: back-to-back sections then do not chain through one memory
// location (an ++ waiting on the previous --), which was 40% of an empty section.
struct ReaderThread {
  long entered = 0;     // sections this thread opened
  long left = 0;        // of those, the ones that ended on this thread
  uint64_t serial = 0;  // process-unique, never reused; 0 before the thread's first section
};
thread_local ReaderThread t_reader;

// A section may end on another thread (the lock is movable; SRCU allows it). Such an end is
// counted here under its opener's serial, never in the ending thread's counts, so the opener
// is not refused forever and the ender's own later sections are still seen. Entries exist
// for live threads only: a thread's exit erases its own, and an end after the opener exited
// has nothing left to correct.
struct HandOvers {
  std::mutex mu;
  std::unordered_map<uint64_t, long> ended_elsewhere;  // opener serial -> sections
  uint64_t next_serial = 1;
};
HandOvers& hand_overs() {
  static auto* h = new HandOvers;  // never destroyed: threads may exit after static teardown
  return *h;
}

struct ReaderExit {
  ~ReaderExit() {
    HandOvers& h = hand_overs();
    std::lock_guard g(h.mu);
    h.ended_elsewhere.erase(t_reader.serial);
  }
};

[[gnu::noinline, gnu::cold]] uint64_t assign_reader_serial() {
  HandOvers& h = hand_overs();
  {
    std::lock_guard g(h.mu);
    t_reader.serial = h.next_serial++;
    h.ended_elsewhere.emplace(t_reader.serial, 0);
  }
  static thread_local ReaderExit exit_hook;  // registered now, on the thread's first section
  (void)exit_hook;
  return t_reader.serial;
}

[[gnu::noinline, gnu::cold]] void section_ended_elsewhere(uint64_t opener) {
  HandOvers& h = hand_overs();
  std::lock_guard g(h.mu);
  auto it = h.ended_elsewhere.find(opener);
  if (it != h.ended_elsewhere.end()) ++it->second;
}

// Sections the calling thread opened that have not ended (on any thread).
long open_read_sections() {
  long open = t_reader.entered - t_reader.left;
  if (open <= 0) return open;
  HandOvers& h = hand_overs();
  std::lock_guard g(h.mu);
  auto it = h.ended_elsewhere.find(t_reader.serial);
  return it == h.ended_elsewhere.end() ? open : open - it->second;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

MemslotsConfig clamp(MemslotsConfig c) {
  c.nr_address_spaces = std::clamp(c.nr_address_spaces, 1u, 2u);
  c.nr_user_slots = std::clamp<uint32_t>(c.nr_user_slots, 1, kMemSlotsNum);
  return c;
}

}  // namespace

struct Memslots::Impl {
  explicit Impl(const MemslotsConfig& c)
      : config(c),
        srcu(c.membarrier ? detail::Srcu::Mode::kAuto : detail::Srcu::Mode::kSeqCst) {
    for (unsigned as = 0; as < config.nr_address_spaces; ++as) {
      // Spec 7.3: address space i starts at generation i.
      active[as].store(MemslotSet::Impl::empty(as, config.nr_user_slots, as).release());
    }
  }
  ~Impl() {
    for (auto& a : active) delete a.load();
  }

  using SetPtr = std::unique_ptr<MemslotSet>;
  using Outcome = Result<std::optional<MemslotChange>>;

  Outcome set_memory_region_locked(const UserspaceMemoryRegion& mem, RegionIoctl ioctl);
  Outcome set_memslot(const std::optional<Memslot>& old, const std::optional<Memslot>& next,
                      MemslotChange change);
  SetPtr swap_active(unsigned as_id, SetPtr next);
  // Sets no reader can reach, kept to be refilled by the next derive (at most kMaxSpares).
  SetPtr take_spare();
  void give_spare(SetPtr set);
  static constexpr size_t kMaxSpares = 2;

  MemslotsConfig config;
  detail::Srcu srcu;
  std::array<std::atomic<MemslotSet*>, 2> active{};

  std::mutex slots_lock;                    // serialises writers and listener changes
  std::atomic<std::thread::id> writer{};    // the thread holding slots_lock, if any
  std::vector<MemslotListener*> listeners;  // guarded by slots_lock
  std::vector<SetPtr> spares;               // guarded by slots_lock
  std::atomic<uint64_t> nr_memslot_pages{0};

  std::mutex mn_lock;  // mn_invalidate_lock
  std::condition_variable mn_cv;
  std::atomic<long> mn_count{0};  // mn_active_invalidate_count, written under mn_lock
};

namespace detail {

void MemslotsTestPeer::set_nr_memslot_pages(Memslots& slots, uint64_t pages) {
  slots.impl_->nr_memslot_pages.store(pages);
}

void MemslotsTestPeer::bulk_insert(Memslots& slots, unsigned as_id, std::span<const Memslot> add) {
  if (as_id >= slots.config_.nr_address_spaces) return;
  std::lock_guard lk(slots.impl_->slots_lock);
  const MemslotSet& cur = *slots.impl_->active[as_id].load();
  std::vector<Memslot> all(cur.slots().begin(), cur.slots().end());
  uint64_t pages = 0;
  for (Memslot m : add) {
    m.as_id = static_cast<uint16_t>(as_id);
    all.push_back(m);
    pages += m.npages;
  }
  (void)slots.impl_->swap_active(
      as_id, MemslotSet::Impl::build(as_id, slots.config_.nr_user_slots, std::move(all)));
  slots.impl_->nr_memslot_pages.fetch_add(pages);
}

void MemslotsTestPeer::fail_set_allocations(unsigned count) {
  MemslotSet::Impl::fail_next_builds(count);
}

bool MemslotsTestPeer::uses_membarrier(const Memslots& slots) {
  return slots.impl_->srcu.uses_membarrier();
}

}  // namespace detail

Memslots::Memslots(MemslotsConfig config)
    : config_(clamp(config)), impl_(std::make_unique<Impl>(config_)) {}

Memslots::~Memslots() = default;

uint64_t Memslots::generation(unsigned as_id) const {
  if (as_id >= config_.nr_address_spaces) return kMemslotGenUpdateInProgress;
  // The active set cannot be freed under us only inside a read section.
  MemslotsReadLock lock = read_lock();
  return lock.set(as_id).generation();
}

uint64_t Memslots::nr_memslot_pages() const { return impl_->nr_memslot_pages.load(); }

void Memslots::add_listener(MemslotListener* listener) {
  if (!listener || impl_->writer.load() == std::this_thread::get_id()) return;
  std::lock_guard lk(impl_->slots_lock);
  impl_->listeners.push_back(listener);
}

void Memslots::remove_listener(MemslotListener* listener) {
  if (impl_->writer.load() == std::this_thread::get_id()) return;
  std::lock_guard lk(impl_->slots_lock);
  std::erase(impl_->listeners, listener);
}

void Memslots::mn_invalidate_begin() {
  std::lock_guard lk(impl_->mn_lock);
  impl_->mn_count.store(impl_->mn_count.load() + 1);
}

void Memslots::mn_invalidate_end() {
  bool wake = false;
  {
    std::lock_guard lk(impl_->mn_lock);
    const long n = impl_->mn_count.load();
    if (n == 0) return;  // unbalanced: ignored
    impl_->mn_count.store(n - 1);
    wake = n == 1;
  }
  if (wake) impl_->mn_cv.notify_all();
}

long Memslots::mn_active_invalidate_count() const { return impl_->mn_count.load(); }

// ---------------------------------------------------------------------------------------------
// Read side.

MemslotsReadLock Memslots::read_lock() const {
  const unsigned token = impl_->srcu.read_lock();
  uint64_t serial = t_reader.serial;
  if (serial == 0) [[unlikely]] serial = assign_reader_serial();
  ++t_reader.entered;
  return MemslotsReadLock(this, token, serial);
}

MemslotsReadLock::MemslotsReadLock(MemslotsReadLock&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)), idx_(other.idx_), opener_(other.opener_) {}

MemslotsReadLock::~MemslotsReadLock() {
  if (!owner_) return;
  owner_->impl_->srcu.read_unlock(idx_);
  if (opener_ == t_reader.serial) [[likely]] {
    ++t_reader.left;
  } else {
    section_ended_elsewhere(opener_);
  }
}

const MemslotSet& MemslotsReadLock::set(unsigned as_id) const {
  static const MemslotSet& kNone =
      *MemslotSet::Impl::empty(0, kUserMemSlots, kMemslotGenUpdateInProgress).release();
  if (!owner_ || as_id >= owner_->config_.nr_address_spaces) return kNone;
  // seq_cst: L of the argument in srcu.cc (also an acquire: the set was built before W).
  return *owner_->impl_->active[as_id].load(std::memory_order_seq_cst);
}

// ---------------------------------------------------------------------------------------------
// Write side.

// kvm_swap_active_memslots: publish `next` with the in-progress generation once no
// invalidation is active (so an invalidation's start and end see the same slots, spec 8.2),
// wait for every reader of the old set, run memslots_updated with the new generation, make it
// final. Returns the old set, which no reader can reach any more.
Memslots::Impl::SetPtr Memslots::Impl::swap_active(unsigned as_id, SetPtr next) {
  MemslotSet* cur = active[as_id].load(std::memory_order_relaxed);  // only writers store it
  const uint64_t gen = cur->generation();
  MemslotSet::Impl::set_generation(*next, gen | kMemslotGenUpdateInProgress);
  GFNMAP_BLOCK_UNTIL("swap.wait_invalidations", [this] { return mn_count.load() == 0; });
  {
    std::unique_lock lk(mn_lock);
    mn_cv.wait(lk, [this] { return mn_count.load() == 0; });
    active[as_id].store(next.release(), std::memory_order_seq_cst);  // W of srcu.cc
  }
  GFNMAP_YIELD2("swap.published", as_id, gen);
  srcu.synchronize();
  const uint64_t new_gen = gen + config.nr_address_spaces;
  for (MemslotListener* l : listeners) l->memslots_updated(as_id, new_gen);
  MemslotSet::Impl::set_generation(*active[as_id].load(std::memory_order_relaxed), new_gen);
  return SetPtr(cur);
}

Memslots::Impl::SetPtr Memslots::Impl::take_spare() {
  if (spares.empty()) return nullptr;
  SetPtr set = std::move(spares.back());
  spares.pop_back();
  return set;
}

void Memslots::Impl::give_spare(SetPtr set) {
  if (set && spares.size() < kMaxSpares) spares.push_back(std::move(set));
}

Memslots::Impl::Outcome Memslots::Impl::set_memslot(const std::optional<Memslot>& old,
                                                    const std::optional<Memslot>& next,
                                                    MemslotChange change) {
  const unsigned as_id = old ? old->as_id : next->as_id;
  const bool invalidate = change == MemslotChange::kDelete || change == MemslotChange::kMove;
  const MemslotSet& cur = *active[as_id].load(std::memory_order_relaxed);

  // Every allocation happens before the first publish, so ENOMEM leaves nothing to undo.
  SetPtr invalid_set;
  SetPtr final_set;
  try {
    if (invalidate) {
      Memslot invalid = *old;
      invalid.flags |= kMemslotInvalid;
      invalid_set = MemslotSet::Impl::derive(cur, old->id, &invalid, take_spare());
    }
    final_set = MemslotSet::Impl::derive(cur, old ? std::optional<uint16_t>(old->id)
                                                  : std::nullopt,
                                         next ? &*next : nullptr, take_spare());
  } catch (const std::bad_alloc&) {
    return make_error(ENOMEM, "out of memory building the new slot set of address space ",
                      as_id);
  }

  // kvm_invalidate_memslot: from here on lookups of the old gfns find the INVALID copy (the
  // resolver reports NOSLOT), and listeners zap every mapping of the slot. The pre-change set
  // is kept: on a prepare failure it is published again.
  SetPtr saved;
  // Seeded bug (checker builds only): the final set is published before the zap.
  const bool swap_first = GFNMAP_SEEDED_BUG(kSwapBeforeZap);
  if (invalidate && !swap_first) {
    saved = swap_active(as_id, std::move(invalid_set));
    const MemslotSet& published = *active[as_id].load(std::memory_order_relaxed);
    const Memslot* invalid = published.id_to_memslot(old->id);
    for (MemslotListener* l : listeners) l->flush_shadow_memslot(*invalid);
    GFNMAP_YIELD2("memslot.zapped", old->id, 0);
  }

  const Memslot* old_ptr = old ? &*old : nullptr;
  const Memslot* next_ptr = next ? &*next : nullptr;
  for (MemslotListener* l : listeners) {
    Result<void> r = l->prepare_memory_region(old_ptr, next_ptr, change);
    if (!r.ok()) {
      if (saved) give_spare(swap_active(as_id, std::move(saved)));  // drops the INVALID copy
      give_spare(std::move(final_set));
      Error e = r.error();
      if (e.code <= 0) e.code = EINVAL;
      if (e.message.empty()) e.message = "prepare_memory_region rejected the change";
      return e;
    }
  }

  // The sets swapped out (the old one, or the INVALID copy and the old one) have no readers.
  give_spare(swap_active(as_id, std::move(final_set)));
  give_spare(std::move(saved));
  if (invalidate && swap_first) {
    for (MemslotListener* l : listeners) l->flush_shadow_memslot(*old);
    GFNMAP_YIELD2("memslot.zapped", old->id, 0);
  }
  give_spare(std::move(invalid_set));

  // kvm_commit_memory_region: page total first, then the arch hook.
  if (change == MemslotChange::kDelete) nr_memslot_pages.fetch_sub(old->npages);
  if (change == MemslotChange::kCreate) nr_memslot_pages.fetch_add(next->npages);
  for (MemslotListener* l : listeners) l->commit_memory_region(old_ptr, next_ptr, change);
  return std::optional<MemslotChange>(change);
}

// kvm_vm_ioctl (REGION v1 flag filter, user slot id) then kvm_set_memory_region: each check in
// the kernel's order with its errno (spec 7.4). The EIO (VM dead) and EFAULT (copy_from_user)
// rows have no counterpart here.
Memslots::Impl::Outcome Memslots::Impl::set_memory_region_locked(const UserspaceMemoryRegion& mem,
                                                                 RegionIoctl ioctl) {
  const uint32_t id = mem.slot & 0xffff;
  const uint32_t as_id = mem.slot >> 16;
  const uint64_t size = mem.memory_size;
  const uint64_t gpa = mem.guest_phys_addr;
  const uint64_t hva = mem.userspace_addr;
  const uint32_t flags = mem.flags;

  if (ioctl != RegionIoctl::kV1 && ioctl != RegionIoctl::kV2) {
    return make_error(EINVAL, "unknown region ioctl ", static_cast<int>(ioctl));
  }
  if (ioctl == RegionIoctl::kV1 && (flags & ~(kMemLogDirtyPages | kMemReadonly))) {
    return make_error(EINVAL, "flags ", hex(flags),
                      " not accepted by KVM_SET_USER_MEMORY_REGION (v1 takes only "
                      "LOG_DIRTY_PAGES|READONLY; use REGION2)");
  }
  if (id >= config.nr_user_slots) {
    return make_error(EINVAL, "slot id ", id, " >= ", config.nr_user_slots, " user slots");
  }

  // check_memory_region_flags.
  uint32_t valid = kMemLogDirtyPages;
  if (config.private_mem) valid |= kMemGuestMemfd;
  if (flags & kMemGuestMemfd) valid &= ~kMemLogDirtyPages;
  if (config.readonly_mem && !(flags & kMemGuestMemfd)) valid |= kMemReadonly;
  if (const uint32_t bad = flags & ~valid) {
    std::string why;
    if (bad & ~(kMemLogDirtyPages | kMemReadonly | kMemGuestMemfd)) why = "unknown flag bits";
    else if ((bad & kMemGuestMemfd)) why = "GUEST_MEMFD needs a VM with private memory";
    else if ((bad & kMemReadonly) && (flags & kMemGuestMemfd)) why = "READONLY with GUEST_MEMFD";
    else if (bad & kMemReadonly) why = "READONLY needs read-only memory support";
    else why = "LOG_DIRTY_PAGES with GUEST_MEMFD";
    return make_error(EINVAL, "flags ", hex(flags), " not allowed (", hex(bad), ": ", why, ")");
  }

  // General sanity checks. (memory_size always fits an unsigned long on LP64.)
  if (size & (kPageSize - 1)) {
    return make_error(EINVAL, "memory_size ", hex(size), " is not a multiple of the page size");
  }
  if (gpa & (kPageSize - 1)) {
    return make_error(EINVAL, "guest_phys_addr ", hex(gpa), " is not page aligned");
  }
  if (hva & (kPageSize - 1)) {
    return make_error(EINVAL, "userspace_addr ", hex(hva), " is not page aligned");
  }
  if (size > config.task_size || hva > config.task_size - size) {  // access_ok
    return make_error(EINVAL, "userspace_addr ", hex(hva), " + memory_size ", hex(size),
                      " is not user memory (task size ", hex(config.task_size), ")");
  }
  if ((flags & kMemGuestMemfd) && ((mem.guest_memfd_offset & (kPageSize - 1)) ||
                                   mem.guest_memfd_offset + size < mem.guest_memfd_offset)) {
    return make_error(EINVAL, "guest_memfd_offset ", hex(mem.guest_memfd_offset),
                      " is unaligned or overflows with memory_size ", hex(size));
  }
  if (as_id >= config.nr_address_spaces) {
    return make_error(EINVAL, "address space ", as_id, " >= ", config.nr_address_spaces,
                      " address spaces");
  }
  if (id >= kMemSlotsNum) {
    return make_error(EINVAL, "slot id ", id, " >= KVM_MEM_SLOTS_NUM (", kMemSlotsNum, ")");
  }
  if (gpa + size < gpa) {
    return make_error(EINVAL, "guest_phys_addr ", hex(gpa), " + memory_size ", hex(size),
                      " wraps");
  }
  const uint64_t npages = size >> kPageShift;
  if (id < config.nr_user_slots && npages > kMemMaxNrPages) {
    return make_error(EINVAL, npages, " pages > KVM_MEM_MAX_NR_PAGES (", kMemMaxNrPages, ")");
  }

  const MemslotSet& set = *active[as_id].load(std::memory_order_relaxed);
  std::optional<Memslot> old;
  if (const Memslot* o = set.id_to_memslot(static_cast<uint16_t>(id))) old = *o;

  if (size == 0) {
    if (!old) {
      return make_error(EINVAL, "DELETE of slot ", id, " in address space ", as_id,
                        ", which does not exist");
    }
    return set_memslot(old, std::nullopt, MemslotChange::kDelete);
  }

  const Gfn base_gfn(gpa >> kPageShift);
  MemslotChange change;
  if (!old) {
    change = MemslotChange::kCreate;
    const uint64_t total = nr_memslot_pages.load();
    if (total + npages < total) {
      return make_error(EINVAL, "VM-wide page total ", total, " + ", npages, " overflows");
    }
  } else {
    // Row 15 covers the old slot too: a GUEST_MEMFD slot may not shed the flag by a MOVE or
    // FLAGS_ONLY (spec 7.4: they are immutable).
    if ((flags | old->flags) & kMemGuestMemfd) {
      return make_error(EINVAL, "slot ", id, " exists: GUEST_MEMFD slots cannot be modified, "
                        "only deleted");
    }
    if (hva != old->userspace_addr.value) {
      return make_error(EINVAL, "slot ", id, " exists with userspace_addr ",
                        hex(old->userspace_addr.value), ", not ", hex(hva),
                        " (delete and re-create to change it)");
    }
    if (npages != old->npages) {
      return make_error(EINVAL, "slot ", id, " exists with ", old->npages, " pages, not ",
                        npages, " (slots cannot be resized)");
    }
    if ((flags ^ old->flags) & kMemReadonly) {
      return make_error(EINVAL, "slot ", id, ": READONLY cannot be toggled on an existing slot");
    }
    if (base_gfn != old->base_gfn) {
      change = MemslotChange::kMove;
    } else if (flags != old->flags) {
      change = MemslotChange::kFlagsOnly;
    } else {
      return std::optional<MemslotChange>();  // nothing to change: KVM returns 0
    }
  }

  if (change == MemslotChange::kCreate || change == MemslotChange::kMove) {
    if (const Memslot* other = MemslotSet::Impl::find_overlap(
            set, static_cast<uint16_t>(id), base_gfn, base_gfn + npages)) {
      return make_error(EEXIST, "gfns [", hex(base_gfn.value), ", ",
                        hex(base_gfn.value + npages), ") of slot ", id,
                        " overlap slot ", other->id, " [", hex(other->base_gfn.value), ", ",
                        hex(other->end_gfn().value), ") in address space ", as_id);
    }
    if (change == MemslotChange::kCreate && (flags & kMemGuestMemfd) &&
        config.check_guest_memfd_file) {  // kvm_gmem_bind
      if (int err = guest_memfd_file_errno(mem.guest_memfd)) {
        return make_error(err, "guest_memfd ", mem.guest_memfd,
                          err == EBADF ? " is not an open file descriptor"
                                       : " is not a guest_memfd file");
      }
    }
    if (base_gfn.value + npages - 1 > config.max_gfn) {  // kvm_arch_prepare_memory_region
      return make_error(EINVAL, "gfns [", hex(base_gfn.value), ", ",
                        hex(base_gfn.value + npages), ") of slot ", id,
                        " go past the arch's last gfn ", hex(config.max_gfn));
    }
  }

  Memslot next;
  next.id = static_cast<uint16_t>(id);
  next.as_id = static_cast<uint16_t>(as_id);
  next.base_gfn = base_gfn;
  next.npages = npages;
  next.userspace_addr = Hva(hva);
  next.flags = flags;
  return set_memslot(old, next, change);
}

Result<std::optional<MemslotChange>> Memslots::set_memory_region(
    const UserspaceMemoryRegion& region, RegionIoctl ioctl) {
  if (impl_->writer.load() == std::this_thread::get_id()) {
    return make_error(EDEADLK, "set_memory_region called from a MemslotListener callback");
  }
  if (open_read_sections() > 0) {
    return make_error(EDEADLK, "set_memory_region called inside a memslots read section "
                      "(its swap would wait for this thread)");
  }
  GFNMAP_BLOCK_UNTIL("slots_lock", [this] { return impl_->writer.load() == std::thread::id{}; });
  std::lock_guard lk(impl_->slots_lock);
  impl_->writer.store(std::this_thread::get_id());
  struct ClearWriter {
    Impl& impl;
    ~ClearWriter() { impl.writer.store(std::thread::id()); }
  } clear{*impl_};
  return impl_->set_memory_region_locked(region, ioctl);
}

}  // namespace gfnmap
