// gfnmap fuzz target: MMU operation sequences on SimHost (fault, write, read, invalidate,
// protect, move, delete, logging on/off, harvest, age), with the invariants checked after each.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"

namespace gfnmap::fuzz {
namespace {

[[noreturn]] void broken(const std::string& what) {
  std::fprintf(stderr, "fuzz_mmu: INVARIANT BROKEN: %s\n", what.c_str());
  std::abort();
}

constexpr unsigned kSlots = 4;
// Slots 0..2 have 8 pages, slot 3 has 1024 (2M-aligned gpa and hva: huge leaves, splits).
constexpr uint64_t kPages[kSlots] = {8, 8, 8, 1024};

// The model: where each slot is, and per host page the last value each vCPU wrote to its word,
// whether the host PTE may be written, and the pages written since the last harvest.
struct Model {
  bool present[kSlots] = {};
  unsigned where[kSlots] = {};  // which of the slot's two gpa homes
  uint32_t flags[kSlots] = {};
  std::map<uint64_t, uint64_t> content;  // hva of a word -> value (absent: 0)
  std::set<uint64_t> readonly_pages;     // host pages mprotect'ed read-only
  std::set<uint64_t> dirty;              // gfns written while their slot logged, not harvested
};

uint64_t home(unsigned s, unsigned where) {
  return (uint64_t{1} << 32) + (uint64_t{s} * 2 + where) * (uint64_t{1} << 30);
}

class Harness {
 public:
  Harness(uint8_t cfg) {
    uint64_t total = 0;
    for (uint64_t p : kPages) total += p;
    total_pages_ = total + 512;  // room to 2M-align slot 3
    // A memfd (discard keeps the data), or THP anonymous memory (discard drops it).
    thp_ = cfg & 1;
    MmapOptions mo;
    if (thp_) {
      mo.backing = PageBacking::kThp;
    } else {
      auto memfd = host_.create_memfd(total_pages_ * kPageSize);
      if (!memfd.ok()) broken("create_memfd");
      mo.file = *memfd;
    }
    auto hva = host_.mmap(total_pages_ * kPageSize, kProtRW,
                          thp_ ? VmaKind::kAnonPrivate : VmaKind::kAnonShared, mo);
    if (!hva.ok()) broken("mmap: " + error_to_string(hva.error()));
    base_ = hva->value;
    uint64_t off = 0;
    for (unsigned s = 0; s < 3; ++s) {
      hva_[s] = base_ + off * kPageSize;
      off += kPages[s];
    }
    const uint64_t two_m = uint64_t{2} << 20;
    hva_[3] = (base_ + off * kPageSize + two_m - 1) & ~(two_m - 1);
    dirty_ = std::make_unique<DirtyLog>(slots_);
    if (cfg & 2) {
      if (!dirty_->enable_manual_dirty_log_protect(kDirtyLogManualProtectEnable).ok()) {
        broken("manual protect");
      }
      manual_ = true;
    }
    MmuOptions o;
    o.dirty = dirty_.get();
    o.pte_prefetch = cfg & 4;
    if (cfg & 8) o.max_level = PgLevel::k4K;
    mmu_ = std::make_unique<Mmu>(slots_, host_, o);
    checker_.h = this;
    host_.register_notifier(&checker_);
    for (unsigned v = 0; v < 2; ++v) vcpus_.push_back(std::make_unique<Vcpu>(*mmu_, v));
  }

  ~Harness() {
    vcpus_.clear();
    host_.unregister_notifier(&checker_);
    mmu_.reset();
    dirty_.reset();
    if (host_.outstanding_refs() != 0) broken("references leaked at the end");
  }

  void step(FuzzInput& in, unsigned n) {
    const uint8_t op = in.u8();
    const unsigned s = in.u8() % kSlots;
    const uint64_t page = in.u16() % kPages[s];
    const unsigned v = in.u8() % 2;
    what_ = "op " + std::to_string(n) + " kind " + std::to_string(op % 16) + " slot " +
            std::to_string(s) + " page " + std::to_string(page);
    // An address at the slot's current home, or its other one (then often in no slot).
    const unsigned where = (in.u8() % 4 == 0) ? model_.where[s] ^ 1 : model_.where[s];
    const uint64_t gpa = home(s, where) + page * kPageSize + v * 8;
    const uint64_t hva_page = hva_[s] + page * kPageSize;
    switch (op % 16) {
      case 0:
      case 1:
      case 2: write(v, s, where, page, gpa, in.u64() | 1); break;
      case 3:
      case 4: read(v, s, where, gpa, in.flag()); break;
      case 5: {  // a fault without the access (vCPU page_fault), read, write or exec
        const Access acc[] = {Access::kRead, Access::kWrite, Access::kExec};
        VcpuExit ex;
        (void)vcpus_[v]->fault(Gpa(gpa), acc[in.u8() % 3], &ex);
        break;
      }
      case 6: {  // host invalidation: discard (memfd-backed: data stays) or write-protect
        const uint64_t len = (1 + in.u8() % 16) * kPageSize;
        const bool wp = in.flag();
        auto r = wp ? host_.write_protect(Hva(hva_page), len) : host_.discard(Hva(hva_page), len);
        if (!r.ok()) broken(what_ + ": invalidation failed: " + error_to_string(r.error()));
        if (thp_ && !wp) {  // anonymous pages discarded read as zero again
          model_.content.erase(model_.content.lower_bound(hva_page),
                               model_.content.lower_bound(hva_page + len));
        }
        break;
      }
      case 7: {  // mprotect a page read-only, or back to read-write
        const bool ro = !model_.readonly_pages.count(hva_page);
        if (!host_.mprotect(Hva(hva_page), kPageSize, ro ? Prot::kRead : kProtRW).ok()) {
          broken(what_ + ": mprotect");
        }
        ro ? (void)model_.readonly_pages.insert(hva_page) : (void)model_.readonly_pages.erase(hva_page);
        break;
      }
      case 8:  // move to the other home
        if (model_.present[s]) set(s, model_.where[s] ^ 1, model_.flags[s]);
        break;
      case 9:  // delete, or create at the current home (READONLY 1 time in 4)
        if (model_.present[s]) {
          del(s);
        } else {
          set(s, model_.where[s], in.u8() % 4 == 0 ? kMemReadonly : 0);
        }
        break;
      case 10:  // logging on or off (FLAGS_ONLY)
        if (model_.present[s]) {
          set(s, model_.where[s], model_.flags[s] ^ kMemLogDirtyPages);
          if (model_.flags[s] & kMemLogDirtyPages) protected_slot_ = static_cast<int>(s);
        }
        break;
      case 11:
      case 12: harvest(s, in.flag()); break;
      case 13: {  // aging
        const uint64_t len = (1 + in.u8() % 32) * kPageSize;
        const uint8_t k = in.u8() % 3;
        if (k == 2) {
          (void)host_.test_young(Hva(hva_page), Hva(hva_page + len));
        } else {
          (void)host_.age_range(Hva(hva_page), Hva(hva_page + len), k == 1);
        }
        break;
      }
      case 14: {  // the VMM's own write (kvm_write_guest): logged in the bitmap too
        const uint64_t value = in.u64() | 1;
        const uint64_t addr = home(s, where) + page * kPageSize + 16;
        VcpuExit ex = mmu_->write_guest(Gpa(addr), {reinterpret_cast<const std::byte*>(&value), 8});
        account_write(s, where, page, hva_page + 16, value, ex);
        break;
      }
      case 15: mmu_->zap_all(); break;
    }
    check();
    protected_slot_ = -1;
  }

 private:
  struct Checker : MmuNotifier {
    Harness* h = nullptr;
    // Registered after the Mmu: runs after the Mmu's invalidate_range_start returned, when no
    // leaf of the range may exist (invariant 16).
    void invalidate_range_start(Hva start, Hva end) override {
      MemslotsReadLock rl = h->slots_.read_lock();
      rl.set(0).for_each_hva_overlap(start, end, [&](const Memslot& s) {
        uint64_t lo = std::max(start.value, s.userspace_addr.value);
        uint64_t hi = std::min(end.value, s.hva_end().value);
        if (lo >= hi) return;
        Gfn g0 = s.base_gfn + ((lo - s.userspace_addr.value) >> kPageShift);
        Gfn g1 = s.base_gfn + ((hi - s.userspace_addr.value + kPageSize - 1) >> kPageShift);
        if (h->mmu_->count_mapped(0, g0, g1) != 0) {
          broken(h->what_ + ": a leaf survived invalidate_range_start");
        }
      });
    }
    void invalidate_range_end(Hva, Hva) override {}
  };

  bool writable_host(uint64_t hva_page) const { return !model_.readonly_pages.count(hva_page); }

  void account_write(unsigned s, unsigned where, uint64_t page, uint64_t hva_word,
                     uint64_t value, const VcpuExit& ex) {
    const uint64_t hva_page = hva_word & ~(kPageSize - 1);
    const bool mapped = model_.present[s] && model_.where[s] == where;
    const bool can = mapped && !(model_.flags[s] & kMemReadonly) && writable_host(hva_page);
    if (ex.ok()) {
      if (!can) broken(what_ + ": a write succeeded where the model forbids it");
      model_.content[hva_word] = value;
      if (model_.flags[s] & kMemLogDirtyPages) model_.dirty.insert(home(s, where) / kPageSize + page);
    } else if (can) {
      broken(what_ + ": a write exited (" + std::string(to_string(ex.reason)) + ")");
    } else if (!mapped || (model_.flags[s] & kMemReadonly)) {
      if (ex.reason != ExitReason::kMmio) broken(what_ + ": expected an MMIO exit");
    } else if (ex.reason != ExitReason::kMemoryFault) {
      broken(what_ + ": a write to a read-only host page did not exit with a memory fault");
    }
  }

  void write(unsigned v, unsigned s, unsigned where, uint64_t page, uint64_t gpa, uint64_t value) {
    VcpuExit ex = vcpus_[v]->write_u64(Gpa(gpa), value);
    account_write(s, where, page, hva_[s] + page * kPageSize + v * 8, value, ex);
  }

  void read(unsigned v, unsigned s, unsigned where, uint64_t gpa, bool vmm) {
    uint64_t got = 0;
    VcpuExit ex = vmm ? mmu_->read_guest(Gpa(gpa), {reinterpret_cast<std::byte*>(&got), 8})
                      : vcpus_[v]->read_u64(Gpa(gpa), &got);
    const bool mapped = model_.present[s] && model_.where[s] == where;
    if (!mapped) {
      if (ex.ok()) broken(what_ + ": a read outside every slot succeeded");
      return;
    }
    if (!ex.ok()) broken(what_ + ": a read exited (" + std::string(to_string(ex.reason)) + ")");
    const uint64_t hva_word = hva_[s] + (gpa - home(s, where));
    auto it = model_.content.find(hva_word);
    const uint64_t want = it == model_.content.end() ? 0 : it->second;
    if (got != want) broken(what_ + ": read " + std::to_string(got) + ", want " + std::to_string(want));
  }

  void set(unsigned s, unsigned where, uint32_t flags) {
    UserspaceMemoryRegion r;
    r.slot = s;
    r.flags = flags;
    r.guest_phys_addr = home(s, where);
    r.memory_size = kPages[s] * kPageSize;
    r.userspace_addr = hva_[s];
    auto res = slots_.set_memory_region(r);
    if (!res.ok()) broken(what_ + ": set_memory_region: " + error_to_string(res.error()));
    if (!(flags & kMemLogDirtyPages) || (model_.flags[s] & kMemLogDirtyPages) == 0 ||
        model_.where[s] != where) {
      drop_dirty(s);  // a fresh bitmap (or none); the model's pending writes go with the old one
    }
    model_.present[s] = true;
    model_.where[s] = where;
    model_.flags[s] = flags;
  }

  void del(unsigned s) {
    UserspaceMemoryRegion r;
    r.slot = s;
    auto res = slots_.set_memory_region(r);
    if (!res.ok()) broken(what_ + ": delete: " + error_to_string(res.error()));
    drop_dirty(s);
    model_.present[s] = false;
    model_.flags[s] = 0;
  }

  void drop_dirty(unsigned s) {
    for (unsigned w = 0; w < 2; ++w) {
      const uint64_t g = home(s, w) / kPageSize;
      model_.dirty.erase(model_.dirty.lower_bound(g), model_.dirty.lower_bound(g + kPages[s]));
    }
  }

  // KVM_GET_DIRTY_LOG (and with manual protect KVM_CLEAR_DIRTY_LOG of everything reported):
  // every page written since the last harvest must be reported (no lost dirty bit).
  void harvest(unsigned s, bool) {
    std::vector<uint64_t> bm(dirty_bitmap_words(kPages[s]));
    auto r = dirty_->get_dirty_log(s, bm);
    const bool logs = model_.present[s] && (model_.flags[s] & kMemLogDirtyPages);
    if (!logs) {
      if (r.ok()) broken(what_ + ": GET_DIRTY_LOG of a slot that does not log succeeded");
      return;
    }
    if (!r.ok()) broken(what_ + ": GET_DIRTY_LOG: " + error_to_string(r.error()));
    const uint64_t g = home(s, model_.where[s]) / kPageSize;
    for (uint64_t p = 0; p < kPages[s]; ++p) {
      const bool got = bm[p / 64] >> (p % 64) & 1;
      if (model_.dirty.count(g + p) && !got) {
        broken(what_ + ": lost dirty bit: slot " + std::to_string(s) + " page " + std::to_string(p));
      }
    }
    if (manual_) {
      auto c = dirty_->clear_dirty_log(s, 0, static_cast<uint32_t>(kPages[s]), bm);
      if (!c.ok()) broken(what_ + ": CLEAR_DIRTY_LOG: " + error_to_string(c.error()));
    }
    drop_dirty(s);
    protected_slot_ = static_cast<int>(s);
  }

  void check() {
    if (mmu_->invalidate_in_progress() != 0) broken(what_ + ": invalidation left in progress");
    if (slots_.mn_active_invalidate_count() != 0) broken(what_ + ": mn_active_invalidate_count");
    const MmuStats st = mmu_->stats();
    if (st.faults != st.installs + st.retries + st.exits + st.async_queued + st.async_halts) {
      broken(what_ + ": fault counters do not balance");
    }
    if (host_.outstanding_refs() != 0) broken(what_ + ": a page reference is held after the op");
    if (host_.violations() != 0) broken(what_ + ": host violation: " + host_.violation_log()[0].what);
    // Every leaf maps the page its current slot gives, and is writable only where that is
    // allowed and (for a logging slot) only while the page's dirty bit is pending.
    for (unsigned s = 0; s < kSlots; ++s) {
      for (unsigned w = 0; w < 2; ++w) {
        const uint64_t g0 = home(s, w) / kPageSize;
        const bool live = model_.present[s] && model_.where[s] == w;
        if (!live) {
          if (mmu_->count_mapped(0, Gfn(g0), Gfn(g0 + kPages[s])) != 0) {
            broken(what_ + ": a stale leaf maps slot " + std::to_string(s) + "'s old gfns");
          }
          continue;
        }
        const uint64_t n = s == 3 ? 16 : kPages[s];  // slot 3: its first pages and last ones
        for (uint64_t i = 0; i < n; ++i) {
          const uint64_t p = s == 3 && i >= 8 ? kPages[s] - 16 + i : i;
          const Mmu::Leaf leaf = mmu_->lookup(0, Gfn(g0 + p));
          if (!spte::is_leaf(leaf.spte)) continue;
          const uint64_t hva_page = hva_[s] + p * kPageSize;
          const PteInfo pte = host_.pte(Hva(hva_page));
          if (pte.state != PteInfo::State::kPresent || pte.pfn != leaf.pfn) {
            broken(what_ + ": leaf of slot " + std::to_string(s) + " page " + std::to_string(p) +
                   " maps a frame the host does not map there");
          }
          if (spte::is_writable(leaf.spte)) {
            if (!pte.writable || (model_.flags[s] & kMemReadonly)) {
              broken(what_ + ": writable leaf (level " +
                     std::to_string(static_cast<int>(leaf.level)) + ") over a read-only " +
                     (pte.writable ? "slot" : "host PTE") + " (slot " + std::to_string(s) +
                     " page " + std::to_string(p) + "; host PTE level " +
                     std::to_string(static_cast<int>(pte.level)) + " dirty " +
                     std::to_string(pte.dirty) + ")");
            }
            // Logging turned on, or a harvest: every leaf of the slot was write-protected, so
            // the next write marks the page again (a writable leaf would lose that bit).
            if (protected_slot_ == static_cast<int>(s)) {
              broken(what_ + ": writable leaf in a logging slot right after it was "
                     "write-protected (slot " + std::to_string(s) + " page " +
                     std::to_string(p) + ")");
            }
          }
        }
      }
    }
  }

  SimHost host_;
  Memslots slots_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  Checker checker_;
  Model model_;
  uint64_t base_ = 0;
  uint64_t total_pages_ = 0;
  uint64_t hva_[kSlots] = {};
  bool manual_ = false;
  bool thp_ = false;
  int protected_slot_ = -1;  // the slot the current op write-protected for dirty logging
  std::string what_;
};

}  // namespace
}  // namespace gfnmap::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gfnmap::fuzz::FuzzInput in(data, size);
  gfnmap::fuzz::Harness h(in.u8());
  for (unsigned n = 0; n < 200 && !in.empty(); ++n) h.step(in, n);
  return 0;
}
