// gfnmap fuzz target: KVM_SET_USER_MEMORY_REGION(2) sequences on Memslots, differential against
// MemslotModel (spec 7.4): every result, errno, change kind, slot table and lookup must agree.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "gfnmap/memslot.h"
#include "memslot_model.h"

namespace gfnmap::fuzz {
namespace {

constexpr uint64_t kM = uint64_t{1} << 20;
constexpr uint64_t kG = uint64_t{1} << 30;
constexpr uint64_t kT = uint64_t{1} << 40;
constexpr uint64_t kHva = 0x7f0000000000;

[[noreturn]] void disagree(const std::string& what) {
  std::fprintf(stderr, "fuzz_memslot: DISAGREEMENT: %s\n", what.c_str());
  std::abort();
}

// Values that make the checks' edges (alignment, wrap, limits, overlap) likely.
uint64_t pick(FuzzInput& in, const std::vector<uint64_t>& table) {
  uint8_t b = in.u8();
  if (b % 16 == 15) return in.u64();
  uint64_t v = table[b % 15 % table.size()];
  return (b & 0x80) ? v + (static_cast<uint64_t>(in.u8() % 8) << 21) : v;  // + 0..7 x 2M
}

const std::vector<uint64_t> kGpas = {0,       2 * kM,  4 * kM,           6 * kM,
                                     kG,      4 * kG,  (1ull << 40) - 2 * kM, 0x800,
                                     0xfffffffffff00000ull, 1 * kT, 8 * kM};
const std::vector<uint64_t> kSizes = {0, 4096, 2 * kM, 4 * kM, kG, 8 * kT, 0x1001, 2 * kM + 4096,
                                      (kMemMaxNrPages + 1) * 4096, kMemMaxNrPages * 4096};
const std::vector<uint64_t> kHvas = {kHva,         kHva + 2 * kM,  kHva + 8 * kM,
                                     kHva + 0x10,  kTaskSizeMax - 2 * kM, kTaskSizeMax,
                                     0x100000000000, 0, ~uint64_t{0} - 4095};

std::string region_str(const UserspaceMemoryRegion& r, RegionIoctl io) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "slot=%#x flags=%#x gpa=%#llx size=%#llx hva=%#llx gmem_off=%#llx ioctl=v%d",
                r.slot, r.flags, static_cast<unsigned long long>(r.guest_phys_addr),
                static_cast<unsigned long long>(r.memory_size),
                static_cast<unsigned long long>(r.userspace_addr),
                static_cast<unsigned long long>(r.guest_memfd_offset),
                io == RegionIoctl::kV1 ? 1 : 2);
  return buf;
}

void check_state(const Memslots& slots, const MemslotModel& model, const MemslotsConfig& c,
                 const std::string& op) {
  auto lock = slots.read_lock();
  for (unsigned as = 0; as < c.nr_address_spaces; ++as) {
    const MemslotSet& set = lock.set(as);
    std::vector<Memslot> want;
    for (const auto& [k, s] : model.slots()) {
      if (k.first != as) continue;
      Memslot m;
      m.id = static_cast<uint16_t>(k.second);
      m.as_id = static_cast<uint16_t>(as);
      m.base_gfn = Gfn(s.base_gfn);
      m.npages = s.npages;
      m.userspace_addr = Hva(s.hva);
      m.flags = s.flags;
      want.push_back(m);
    }
    std::sort(want.begin(), want.end(),
              [](const Memslot& a, const Memslot& b) { return a.base_gfn < b.base_gfn; });
    std::vector<Memslot> got(set.slots().begin(), set.slots().end());
    if (got != want) {
      disagree(op + ": slot table of as " + std::to_string(as) + " has " +
               std::to_string(got.size()) + " slots, the model " + std::to_string(want.size()));
    }
    for (const Memslot& m : want) {
      const Memslot* s = set.id_to_memslot(m.id);
      if (!s || !(*s == m)) disagree(op + ": id_to_memslot(" + std::to_string(m.id) + ")");
    }
    const uint64_t gen = set.generation();
    if ((gen & kMemslotGenUpdateInProgress) || gen % c.nr_address_spaces != as) {
      disagree(op + ": generation " + std::to_string(gen) + " of as " + std::to_string(as));
    }
  }
  if (slots.nr_memslot_pages() != model.total_pages()) {
    disagree(op + ": nr_memslot_pages " + std::to_string(slots.nr_memslot_pages()) +
             " != " + std::to_string(model.total_pages()));
  }
}

// Lookups of gfns at and around slot edges (and any gfn) against the model's linear scan;
// the caches (VM-wide, per vCPU) must never change an answer (invariant 20).
void check_lookups(FuzzInput& in, const Memslots& slots, const MemslotModel& model,
                   const MemslotsConfig& c, VcpuMemslotCache& cache, const std::string& op) {
  auto lock = slots.read_lock();
  const unsigned n = 1 + in.u8() % 4;
  for (unsigned i = 0; i < n; ++i) {
    const unsigned as = in.u8() % c.nr_address_spaces;
    const MemslotSet& set = lock.set(as);
    uint64_t gfn = in.u64() >> (in.u8() % 64);
    if (!model.slots().empty() && in.flag()) {
      auto it = model.slots().begin();
      std::advance(it, in.u8() % model.slots().size());
      const int64_t delta[] = {-1, 0, 1, static_cast<int64_t>(it->second.npages) - 1,
                               static_cast<int64_t>(it->second.npages)};
      gfn = it->second.base_gfn + static_cast<uint64_t>(delta[in.u8() % 5]);
    }
    uint32_t id = 0;
    const ModelSlot* want = model.find(as, gfn, &id);
    const Memslot* s1 = set.search_memslots(Gfn(gfn));
    const Memslot* s2 = set.gfn_to_memslot(Gfn(gfn));
    const Memslot* s3 = set.vcpu_gfn_to_memslot(cache, Gfn(gfn));
    const Memslot* s4 = set.search_memslots(Gfn(gfn), /*approx=*/true);
    for (const Memslot* s : {s1, s2, s3}) {
      if ((s == nullptr) != (want == nullptr) || (s && (s->id != id || s->as_id != as))) {
        disagree(op + ": lookup of gfn " + std::to_string(gfn) + " in as " + std::to_string(as));
      }
    }
    if (want && s4 != s1) disagree(op + ": approx lookup differs on a hit");
    if (!s4 != set.slots().empty()) disagree(op + ": approx lookup null on a non-empty set");
    const bool visible = want && id < c.nr_user_slots;
    if (set.is_visible_gfn(Gfn(gfn)) != visible) disagree(op + ": is_visible_gfn");
    if (want) {
      Hva h = gfn_to_hva_memslot_prot(s1, Gfn(gfn), nullptr);
      if (h.value != want->hva + (gfn - want->base_gfn) * kPageSize) {
        disagree(op + ": gfn_to_hva of gfn " + std::to_string(gfn));
      }
    }
    // for_each_hva_overlap against a scan of every slot.
    uint64_t start = pick(in, kHvas) & ~uint64_t{4095};
    uint64_t len = pick(in, kSizes) | 1;  // an empty range is no request
    uint64_t end = start + len < start ? ~uint64_t{0} : start + len;
    std::vector<uint32_t> got;
    set.for_each_hva_overlap(Hva(start), Hva(end), [&](const Memslot& m) { got.push_back(m.id); });
    std::vector<uint32_t> exp;
    for (const auto& [k, ms] : model.slots()) {
      if (k.first == as && ms.hva < end && start < ms.hva + ms.npages * kPageSize) {
        exp.push_back(k.second);
      }
    }
    std::sort(got.begin(), got.end());
    if (got != exp) {
      disagree(op + ": for_each_hva_overlap [" + std::to_string(start) + ", " +
               std::to_string(end) + ") gave " + std::to_string(got.size()) + " slots, want " +
               std::to_string(exp.size()));
    }
  }
}

}  // namespace
}  // namespace gfnmap::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gfnmap;
  using namespace gfnmap::fuzz;
  FuzzInput in(data, size);
  MemslotsConfig c;
  const uint8_t cfg = in.u8();
  c.nr_address_spaces = 1 + (cfg & 1);
  const uint32_t user_slots[] = {kUserMemSlots, 4, 1, kMemSlotsNum};
  c.nr_user_slots = user_slots[(cfg >> 1) & 3];
  c.readonly_mem = !(cfg & 8);
  c.private_mem = cfg & 16;
  if (cfg & 32) c.max_gfn = (uint64_t{1} << 28) - 1;
  Memslots slots(c);
  MemslotModel model(slots.config());
  VcpuMemslotCache cache;
  for (unsigned n = 0; n < 64 && !in.empty(); ++n) {
    UserspaceMemoryRegion r;
    const uint8_t kind = in.u8();
    const RegionIoctl io = (kind & 1) ? RegionIoctl::kV2 : RegionIoctl::kV1;
    const uint8_t idb = in.u8();
    const uint32_t odd_ids[] = {3, 4, 32763, 32764, 32766, 32767, 65535, 0};
    uint32_t id = idb < 224 ? idb % 6 : odd_ids[idb % 8];
    uint32_t as = (kind >> 1) % 4 == 3 ? 2 + (kind >> 7) * 0x7ffd : ((kind >> 1) % 4) % 2;
    r.slot = (as << 16) | id;
    const uint8_t fb = in.u8();
    r.flags = fb < 240 ? (fb & 7) : in.u32();
    r.guest_phys_addr = pick(in, kGpas);
    r.memory_size = pick(in, kSizes);
    r.userspace_addr = pick(in, kHvas);
    if (r.flags & kMemGuestMemfd) {
      const uint8_t ob = in.u8();
      r.guest_memfd_offset = ob < 200 ? (ob % 4) * 2 * kM : (ob < 228 ? 0x800 : ~uint64_t{0} - 4095);
      r.guest_memfd = 3;
    }
    const std::string op = "op " + std::to_string(n) + " " + region_str(r, io);
    std::vector<uint64_t> gen_before;
    for (unsigned a = 0; a < c.nr_address_spaces; ++a) gen_before.push_back(slots.generation(a));

    const ModelResult want = model.apply(r, io);
    auto got = slots.set_memory_region(r, io);
    const int got_err = got.ok() ? 0 : got.error().code;
    if (got_err != want.err) {
      disagree(op + ": gfnmap errno " + std::to_string(got_err) + " (" +
               (got.ok() ? std::string("ok") : error_to_string(got.error())) +
               "), model errno " + std::to_string(want.err) + " (row " +
               std::to_string(want.row) + ")");
    }
    if (got.ok() && got.value() != want.change) {
      disagree(op + ": change kind " +
               (got.value() ? std::string(to_string(*got.value())) : "NOOP") + ", model " +
               (want.change ? std::string(to_string(*want.change)) : "NOOP"));
    }
    for (unsigned a = 0; a < c.nr_address_spaces; ++a) {
      const uint64_t g = slots.generation(a);
      const bool touched = want.change && a == (r.slot >> 16);
      if (touched ? g <= gen_before[a] : (want.row != 20 && g != gen_before[a])) {
        disagree(op + ": generation of as " + std::to_string(a) + " went " +
                 std::to_string(gen_before[a]) + " -> " + std::to_string(g));
      }
    }
    check_state(slots, model, c, op);
    check_lookups(in, slots, model, c, cache, op);
  }
  return 0;
}
