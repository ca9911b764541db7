// gfnmap interleaving checker: one schedule's world (SimHost, memslots, dirty log, MMU, vCPUs),
// the actor bodies, and the checks after every step and at the end of every schedule.
#include "mmu_sched/world.h"

#include <cinttypes>
#include <cstdio>
#include <map>
#include <optional>

namespace gfnmap::test::sched {

const char* to_string(ActorKind kind) {
  switch (kind) {
    case ActorKind::kVcpuWrite: return "write";
    case ActorKind::kVcpuRead: return "read";
    case ActorKind::kDiscard: return "discard";
    case ActorKind::kWriteProtect: return "wrprot";
    case ActorKind::kDelete: return "delete";
    case ActorKind::kMove: return "move";
    case ActorKind::kHarvest: return "harvest";
    case ActorKind::kAsyncComplete: return "apf-done";
  }
  return "?";
}

namespace {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

bool is_fault_actor(ActorKind k) {
  return k == ActorKind::kVcpuWrite || k == ActorKind::kVcpuRead ||
         k == ActorKind::kAsyncComplete;
}
bool is_host_actor(ActorKind k) {
  return k == ActorKind::kDiscard || k == ActorKind::kWriteProtect;
}

SimHostConfig host_config() {
  SimHostConfig c;
  c.zero_page = false;  // host B: a read fault maps a fresh page, so every leaf is a real frame
  return c;
}

class World final : public Scenario {
 public:
  explicit World(const WorldConfig& c) : cfg_(c), host_(host_config()), recs_(c.actors.size()),
                                         invs_(c.actors.size()) {
    const uint64_t bytes = cfg_.npages * kPageSize;
    hva_ = *host_.mmap(bytes, kProtRW, VmaKind::kAnonPrivate);
    (void)host_.populate(hva_, bytes, true);
    dirty_ = std::make_unique<DirtyLog>(slots_);
    bool apf = false;
    for (const ActorSpec& a : cfg_.actors) apf |= a.kind == ActorKind::kAsyncComplete;
    if (apf) pool_ = std::make_unique<AsyncPfWorkerPool>(host_, 1);
    MmuOptions o;
    o.dirty = dirty_.get();
    o.async_pf_pool = pool_.get();
    mmu_ = std::make_unique<Mmu>(slots_, host_, o);
    (void)set_slot(kBaseGfn, cfg_.npages);
    setup_vcpu_ = std::make_unique<Vcpu>(*mmu_, 63);
    for (uint64_t p : cfg_.prefault) (void)setup_vcpu_->write_u64(gpa(p) + 16, 1);
    if (cfg_.log_dirty) harvest_now();  // clean log, leaves write-protected
    vcpus_.resize(cfg_.actors.size());
    for (size_t i = 0; i < cfg_.actors.size(); ++i) {
      const ActorSpec& a = cfg_.actors[i];
      if (!is_fault_actor(a.kind)) continue;
      VcpuOptions vo;
      vo.max_retries = 2;  // a retrying vCPU gives up (kIntr) instead of spinning for ever
      vo.async_pf = a.kind == ActorKind::kAsyncComplete;
      vcpus_[i] = std::make_unique<Vcpu>(*mmu_, static_cast<uint32_t>(i), vo);
      if (vo.async_pf) {
        (void)host_.swap_out(hva_ + a.page * kPageSize);
        VcpuExit ex = vcpus_[i]->write_u64(gpa(a.page), 7);
        if (ex.reason != ExitReason::kAsyncPfNotPresent || !vcpus_[i]->wait_async_pf(10000)) {
          add_violation("setup: the async page fault did not go async and complete");
        }
      }
    }
    for (uint64_t g : watched()) {
      Mmu::Leaf l = mmu_->lookup(0, Gfn(g));
      leaves_[g] = l;
      if (l.spte != 0) installs_[g] = Install{mmu_->invalidate_seq(), -1};
    }
  }

  ~World() override {
    vcpus_.clear();
    setup_vcpu_.reset();
    mmu_.reset();
    dirty_.reset();
    pool_.reset();
  }

  std::vector<std::string> actor_names() const override {
    std::vector<std::string> n;
    for (size_t i = 0; i < cfg_.actors.size(); ++i) {
      n.push_back(std::string(to_string(cfg_.actors[i].kind)) + std::to_string(i));
    }
    return n;
  }

  void run_actor(int i) override {
    const ActorSpec& a = cfg_.actors[static_cast<size_t>(i)];
    Rec& r = recs_[static_cast<size_t>(i)];
    switch (a.kind) {
      case ActorKind::kVcpuWrite: {
        VcpuExit ex = vcpus_[static_cast<size_t>(i)]->write_u64(gpa(a.page) + 8, 0x1000u + i);
        r.ok = ex.ok();
        if (r.ok) check_translation(i, kBaseGfn + a.page);
        break;
      }
      case ActorKind::kVcpuRead: {
        uint64_t v = 0;
        VcpuExit ex = vcpus_[static_cast<size_t>(i)]->read_u64(gpa(a.page) + 16, &v);
        r.ok = ex.ok();
        if (r.ok) check_translation(i, kBaseGfn + a.page);
        break;
      }
      case ActorKind::kDiscard:
        r.ok = host_.discard(hva_ + a.page * kPageSize, a.pages * kPageSize).ok();
        break;
      case ActorKind::kWriteProtect:
        r.ok = host_.write_protect(hva_ + a.page * kPageSize, a.pages * kPageSize).ok();
        break;
      case ActorKind::kDelete:
        r.ok = set_slot(kBaseGfn, 0);
        break;
      case ActorKind::kMove:
        r.ok = set_slot(kMoveBaseGfn, cfg_.npages);
        break;
      case ActorKind::kHarvest: {
        std::vector<uint64_t> bm(1);
        auto res = dirty_->get_dirty_log(0, bm);
        r.ok = res.ok();
        r.bits = bm[0];
        break;
      }
      case ActorKind::kAsyncComplete:
        r.ok = !vcpus_[static_cast<size_t>(i)]->check_async_pf_completion().empty();
        break;
    }
    if (!r.ok && !is_fault_actor(a.kind)) {
      add_violation(std::string(to_string(a.kind)) + std::to_string(i) + " failed");
    }
  }

  void after_step(const Step& s, size_t index) override {
    const size_t ai = static_cast<size_t>(s.actor);
    const ActorKind kind = cfg_.actors[ai].kind;
    const std::string who = std::string(to_string(kind)) + std::to_string(ai);
    const std::string at = "step " + std::to_string(index + 1) + ": ";
    Rec& r = recs_[ai];
    if (s.to == "pf.snapshot") {
      r.snap = s.a;
      r.has_snap = true;
    }
    const uint64_t seq = mmu_->invalidate_seq();
    const long inprog = mmu_->invalidate_in_progress();
    const auto range = mmu_->invalidate_range();
    for (uint64_t g : watched()) {
      Mmu::Leaf now = mmu_->lookup(0, Gfn(g));
      Mmu::Leaf& prev = leaves_[g];
      const bool installed =
          now.spte != 0 && (prev.spte == 0 || prev.pfn != now.pfn || prev.host_ptr != now.host_ptr);
      if (installed) {
        if (!is_fault_actor(kind)) {
          add_violation(at + who + " made a leaf for gfn " + hex(g) + " appear");
        } else {
          installs_[g] = Install{r.snap, static_cast<long>(index)};
          const bool covered = inprog > 0 && g >= range.first && g < range.second;
          if (!r.has_snap || r.snap != seq || covered) {
            add_violation(at + who + " installed gfn " + hex(g) + " from a stale sequence: "
                          "snapshot " + std::to_string(r.snap) + ", mmu_invalidate_seq " +
                          std::to_string(seq) + ", in progress " + std::to_string(inprog));
          }
        }
      }
      if (now.spte == 0) installs_.erase(g);
      prev = now;
    }
    if (is_host_actor(kind) && s.to == "host.inv.started") {
      Inv& inv = invs_[ai];
      inv.started = true;
      MemslotsReadLock rl = slots_.read_lock();
      if (const Memslot* slot = rl.set(0).id_to_memslot(0)) {
        inv.g0 = slot->base_gfn.value + cfg_.actors[ai].page;
        inv.g1 = inv.g0 + cfg_.actors[ai].pages;
      }
      for (uint64_t g = inv.g0; g < inv.g1; ++g) {
        if (leaves_[g].spte != 0) {
          add_violation(at + "a leaf for gfn " + hex(g) + " survived " + who +
                        "'s invalidate_range_start");
        }
      }
    }
    if (is_host_actor(kind) && s.to == "mn.end.seq_bumped") {
      invs_[ai].ended = true;
      invs_[ai].end_seq = seq;
    }
    next_step_ = index + 1;
    if (s.done) {
      r.done_step = static_cast<long>(index);
      done_order_.push_back(ai);
    }
  }

  void finish() override {
    // Invariant 16: every leaf left was installed from a snapshot taken after the end of every
    // invalidation of its gfn; and it maps what the slot's hva maps now.
    MemslotsReadLock rl = slots_.read_lock();
    const MemslotSet& set = rl.set(0);
    for (uint64_t g : watched()) {
      Mmu::Leaf l = mmu_->lookup(0, Gfn(g));
      if (l.spte == 0) continue;
      const Install in = installs_.count(g) ? installs_[g] : Install{};
      for (size_t i = 0; i < invs_.size(); ++i) {
        const Inv& inv = invs_[i];
        if (inv.started && g >= inv.g0 && g < inv.g1 && (!inv.ended || in.snap < inv.end_seq)) {
          add_violation("end: the leaf of gfn " + hex(g) + " survived the invalidation of " +
                        to_string(cfg_.actors[i].kind) + std::to_string(i) +
                        " (installed from snapshot " + std::to_string(in.snap) +
                        ", the invalidation ended at sequence " + std::to_string(inv.end_seq) +
                        ")");
        }
      }
      const Memslot* s = set.search_memslots(Gfn(g));
      if (s == nullptr || s->invalid()) {
        add_violation("end: stale translation, gfn " + hex(g) + " has a leaf but no slot");
        continue;
      }
      const Hva h = s->userspace_addr + (g - s->base_gfn.value) * kPageSize;
      const PteInfo p = host_.pte(h);
      if (p.state != PteInfo::State::kPresent || p.pfn != l.pfn) {
        add_violation("end: stale leaf, gfn " + hex(g) + " maps pfn " + hex(l.pfn.value) +
                      " but its hva maps " +
                      (p.state == PteInfo::State::kPresent ? hex(p.pfn.value) : "nothing"));
      }
    }
    // Invariant 23: every completed write is in a log harvested after it, or in the next one.
    if (cfg_.log_dirty && set.id_to_memslot(0) != nullptr) {
      const uint64_t final_bits = harvest_now();
      for (size_t i = 0; i < cfg_.actors.size(); ++i) {
        if (cfg_.actors[i].kind != ActorKind::kVcpuWrite || !recs_[i].ok) continue;
        const uint64_t bit = uint64_t{1} << cfg_.actors[i].page;
        bool seen = (final_bits & bit) != 0;
        for (size_t h = 0; h < cfg_.actors.size(); ++h) {
          if (cfg_.actors[h].kind == ActorKind::kHarvest && recs_[h].ok &&
              recs_[h].done_step > recs_[i].done_step && (recs_[h].bits & bit)) {
            seen = true;
          }
        }
        if (!seen) {
          add_violation("end: lost dirty bit, write" + std::to_string(i) + " of page " +
                        std::to_string(cfg_.actors[i].page) + " is in no harvested log");
        }
      }
    }
    // Invariants 17, 2/18: counters balanced, every reference released.
    if (mmu_->invalidate_in_progress() != 0 || slots_.mn_active_invalidate_count() != 0) {
      add_violation("end: an invalidation is still counted in progress");
    }
    const MmuStats st = mmu_->stats();
    if (st.faults != st.installs + st.retries + st.exits + st.async_queued + st.async_halts) {
      add_violation("end: the MMU's fault counters do not balance");
    }
    if (host_.outstanding_refs() != 0) {
      add_violation("end: " + std::to_string(host_.outstanding_refs()) +
                    " page references not released");
    }
    if (host_.violations() != 0) {
      add_violation("end: host protocol violation: " + host_.violation_log()[0].what);
    }
  }

  std::string state_key() override {
    std::string k;
    auto add = [&k](uint64_t v) {
      k += std::to_string(v);
      k += ',';
    };
    add(mmu_->invalidate_seq());
    add(static_cast<uint64_t>(mmu_->invalidate_in_progress()));
    const auto range = mmu_->invalidate_range();
    add(range.first);
    add(range.second);
    add(static_cast<uint64_t>(slots_.mn_active_invalidate_count()));
    {
      MemslotsReadLock rl = slots_.read_lock();
      add(rl.set(0).generation());
      const Memslot* slot = rl.set(0).id_to_memslot(0);
      add(slot ? slot->base_gfn.value : ~uint64_t{0});
      add(slot ? slot->flags : 0);
    }
    for (const auto& [g, l] : leaves_) {
      add(l.spte == 0 ? 0 : (l.spte & spte::kFlagsMask) | 0x10000);
      add(l.pfn.value);
    }
    for (uint64_t p = 0; p < cfg_.npages; ++p) {
      const PteInfo pte = host_.pte(hva_ + p * kPageSize);
      add(static_cast<uint64_t>(pte.state));
      add(pte.pfn.value);
      add(pte.writable);
    }
    add(host_.outstanding_refs());
    add(host_.violations());
    k += '|';
    for (size_t i = 0; i < recs_.size(); ++i) {
      const Rec& r = recs_[i];
      add(r.snap);
      add(r.has_snap);
      add(r.ok);
      add(r.bits);
      if (vcpus_[i]) {
        const Vcpu::Stats& st = vcpus_[i]->stats();
        add(st.accesses);
        add(st.faults);
        add(st.fast_faults);
        add(st.retries);
        add(st.async);
        if (AsyncPfQueue* q = vcpus_[i]->async_pf_queue()) {
          add(q->queued());
          add(q->has_completions());
        }
      }
      const Inv& inv = invs_[i];
      add(inv.started);
      add(inv.ended);
      add(inv.end_seq);
      add(inv.g0);
      add(inv.g1);
    }
    k += '|';
    for (size_t i : done_order_) add(i);
    k += '|';
    for (const auto& [g, in] : installs_) {
      add(g);
      add(in.snap);
    }
    add(violations().size());
    return k;
  }

  std::string state_line() override {
    std::string s = "seq " + std::to_string(mmu_->invalidate_seq()) + " inprog " +
                    std::to_string(mmu_->invalidate_in_progress()) + " mn " +
                    std::to_string(slots_.mn_active_invalidate_count());
    {
      MemslotsReadLock rl = slots_.read_lock();
      const Memslot* slot = rl.set(0).id_to_memslot(0);
      s += " slot0 ";
      s += slot == nullptr ? std::string("-")
                           : hex(slot->base_gfn.value) + (slot->invalid() ? " INVALID" : "");
    }
    s += " leaves";
    bool any = false;
    for (uint64_t g : watched()) {
      Mmu::Leaf l = mmu_->lookup(0, Gfn(g));
      if (l.spte == 0) continue;
      any = true;
      s += " " + hex(g) + "->pfn " + hex(l.pfn.value) +
           ((l.spte & spte::kWritable) ? " W" : "");
    }
    if (!any) s += " none";
    return s;
  }

 private:
  struct Rec {
    uint64_t snap = 0;
    bool has_snap = false;
    bool ok = false;
    long done_step = -1;
    uint64_t bits = 0;
  };
  struct Inv {
    bool started = false, ended = false;
    uint64_t end_seq = 0;
    uint64_t g0 = 0, g1 = 0;
  };
  struct Install {
    uint64_t snap = 0;
    long step = -1;
  };

  Gpa gpa(uint64_t page) const { return Gpa((kBaseGfn + page) << kPageShift); }

  std::vector<uint64_t> watched() const {
    std::vector<uint64_t> g;
    for (uint64_t p = 0; p < cfg_.npages; ++p) g.push_back(kBaseGfn + p);
    for (const ActorSpec& a : cfg_.actors) {
      if (a.kind == ActorKind::kMove) {
        for (uint64_t p = 0; p < cfg_.npages; ++p) g.push_back(kMoveBaseGfn + p);
        break;
      }
    }
    return g;
  }

  bool set_slot(uint64_t base_gfn, uint64_t npages) {
    UserspaceMemoryRegion r;
    r.slot = 0;
    r.flags = cfg_.log_dirty ? kMemLogDirtyPages : 0;
    r.guest_phys_addr = base_gfn << kPageShift;
    r.memory_size = npages * kPageSize;
    r.userspace_addr = hva_.value;
    return slots_.set_memory_region(r).ok();
  }

  uint64_t harvest_now() {
    std::vector<uint64_t> bm(1);
    return dirty_->get_dirty_log(0, bm).ok() ? bm[0] : 0;
  }

  // No stale translation: the access that just succeeded (nothing else ran since) went through
  // a leaf that maps what the published slot's hva maps now.
  void check_translation(int i, uint64_t g) {
    const std::string who = "step " + std::to_string(next_step_ + 1) + ": " +
                            to_string(cfg_.actors[static_cast<size_t>(i)].kind) +
                            std::to_string(i);
    MemslotsReadLock rl = slots_.read_lock();
    const Memslot* s = rl.set(0).search_memslots(Gfn(g));
    if (s == nullptr) {
      add_violation(who + ": stale translation, the access to gfn " + hex(g) +
                    " succeeded, but no published slot maps that gfn (generation " +
                    hex(rl.set(0).generation()) + ")");
      return;
    }
    const Hva h = s->userspace_addr + (g - s->base_gfn.value) * kPageSize;
    const Mmu::Leaf l = mmu_->lookup(0, Gfn(g));
    const PteInfo p = host_.pte(h);
    if (l.spte != 0 && (p.state != PteInfo::State::kPresent || p.pfn != l.pfn)) {
      add_violation(who + ": stale translation, the access to gfn " + hex(g) + " went through pfn " +
                    hex(l.pfn.value) + ", but its hva maps " +
                    (p.state == PteInfo::State::kPresent ? hex(p.pfn.value) : "nothing"));
    }
  }

  WorldConfig cfg_;
  SimHost host_;
  Memslots slots_;
  std::unique_ptr<AsyncPfWorkerPool> pool_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  std::unique_ptr<Vcpu> setup_vcpu_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  Hva hva_;
  std::vector<Rec> recs_;
  std::vector<Inv> invs_;
  std::map<uint64_t, Mmu::Leaf> leaves_;
  std::map<uint64_t, Install> installs_;
  std::vector<size_t> done_order_;
  size_t next_step_ = 0;  // index of the step running now
};

}  // namespace

std::unique_ptr<Scenario> make_world(const WorldConfig& config) {
  return std::make_unique<World>(config);
}

}  // namespace gfnmap::test::sched
