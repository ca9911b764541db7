// gfnmap fuzz target: KVM_CLEAR_DIRTY_LOG / KVM_GET_DIRTY_LOG requests (first page, page count,
// bitmap) and marks on DirtyLog against a naive model: one bool per page and a linear scan.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"

namespace gfnmap::fuzz {
namespace {

[[noreturn]] void disagree(const std::string& what) {
  std::fprintf(stderr, "fuzz_dirty_clear: DISAGREEMENT: %s\n", what.c_str());
  std::abort();
}

constexpr unsigned kSlots = 4;
constexpr uint64_t kNpages[] = {1, 63, 64, 65, 127, 128, 200, 4097};

uint64_t base_gfn(unsigned id) { return uint64_t{id} << 20; }

// The MMU's side, recorded: the pages write-protected again, checked against the contract of
// DirtyWriteProtector (inside a batch, base 64-aligned in the slot, mask != 0, pages in it).
struct Protector : DirtyWriteProtector {
  std::set<uint64_t> pages;
  std::map<uint16_t, int> flushes;
  bool in_batch = false;
  void write_protect(const Memslot& slot, Gfn base, uint64_t mask) override {
    if (!in_batch) disagree("write_protect outside a batch");
    if (mask == 0) disagree("write_protect with an empty mask");
    if ((base.value - slot.base_gfn.value) % 64 != 0) disagree("write_protect base not aligned");
    for (unsigned b = 0; b < 64; ++b) {
      if (!(mask >> b & 1)) continue;
      const uint64_t gfn = base.value + b;
      if (!slot.contains(Gfn(gfn))) disagree("write_protect beyond the slot");
      if (!pages.insert(gfn).second) disagree("page write-protected twice in one request");
    }
  }
  void flush_remote_tlbs(const Memslot& slot) override {
    if (!in_batch) disagree("flush outside a batch");
    ++flushes[slot.id];
  }
  void begin_batch() override {
    if (in_batch) disagree("nested batch");
    in_batch = true;
  }
  void end_batch() override {
    if (!in_batch) disagree("end_batch without begin_batch");
    in_batch = false;
  }
};

struct ModelSlot {
  bool exists = false;
  uint64_t npages = 0;
  bool logging = false;
  std::vector<bool> dirty;  // empty unless logging
};

}  // namespace
}  // namespace gfnmap::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gfnmap;
  using namespace gfnmap::fuzz;
  FuzzInput in(data, size);
  const uint8_t cfg = in.u8();
  Memslots slots;
  DirtyLog log(slots);
  Protector prot;
  log.set_write_protector(&prot);
  const bool ring_only = (cfg & 3) == 3;
  if (ring_only && !log.enable_dirty_ring(4096 * 4).ok()) disagree("enable_dirty_ring");
  uint64_t manual = (cfg >> 2) & 3;
  if (manual == 2) manual = 0;  // INITIALLY_SET alone is EINVAL
  if (!log.enable_manual_dirty_log_protect(manual).ok()) disagree("manual protect");

  ModelSlot model[kSlots];
  auto set_slot = [&](unsigned id, uint64_t npages, bool logging) {
    UserspaceMemoryRegion r;
    r.slot = id;
    r.flags = logging ? kMemLogDirtyPages : 0;
    r.guest_phys_addr = base_gfn(id) * kPageSize;
    r.memory_size = npages * kPageSize;
    r.userspace_addr = 0x7f0000000000 + (uint64_t{id} << 32);
    auto res = slots.set_memory_region(r);
    if (!res.ok()) disagree("set_memory_region: " + error_to_string(res.error()));
    ModelSlot& m = model[id];
    const bool was_logging = m.exists && m.logging;
    m.exists = npages != 0;
    m.npages = npages;
    m.logging = logging && m.exists;
    if (!m.logging) {
      m.dirty.clear();
    } else if (!was_logging) {  // a fresh bitmap (spec 7.4 prepare)
      m.dirty.assign(npages, (manual & kDirtyLogInitiallySet) != 0);
    }
  };

  for (unsigned n = 0; n < 256 && !in.empty(); ++n) {
    const uint8_t op = in.u8();
    const std::string where = "op " + std::to_string(n);
    switch (op % 8) {
      case 0: {  // create, delete or toggle logging (FLAGS_ONLY keeps the size)
        const unsigned id = in.u8() % kSlots;
        const uint8_t b = in.u8();
        if (model[id].exists && (b & 1)) {
          set_slot(id, model[id].npages, !model[id].logging);
        } else if (model[id].exists) {
          set_slot(id, 0, false);
        } else {
          set_slot(id, kNpages[(b >> 1) % 8], b & 0x80);
        }
        break;
      }
      case 1: {  // change the manual-protect capability
        const uint64_t f = in.u8() % 4;
        auto r = log.enable_manual_dirty_log_protect(f);
        if (r.ok() != (f != 2)) disagree(where + ": enable_manual_dirty_log_protect");
        if (r.ok()) manual = f;
        break;
      }
      case 2:
      case 3: {  // guest writes
        const unsigned id = in.u8() % kSlots;
        const uint64_t page = in.u16() % 4200;
        auto lock = slots.read_lock();
        const Memslot* s = lock.set(0).id_to_memslot(static_cast<uint16_t>(id));
        if (!s) break;
        log.mark_page_dirty_in_slot(*s, s->base_gfn + page);
        ModelSlot& m = model[id];
        if (m.logging && page < m.npages && !ring_only) m.dirty[page] = true;
        break;
      }
      case 4:
      case 5:
      case 6: {  // KVM_CLEAR_DIRTY_LOG
        const uint8_t sb = in.u8();
        uint32_t slot = sb % kSlots;
        if (sb >= 240) slot = sb % 2 ? (1u << 16) : 40000;  // bad as_id / id
        const ModelSlot* m = slot < kSlots ? &model[slot] : nullptr;
        const uint64_t np = m ? m->npages : 0;
        const uint64_t fps[] = {0, 64, 128, np, np & ~uint64_t{63}, 1, 4096, in.u64()};
        const uint64_t first = fps[in.u8() % 8];
        const uint32_t nps[] = {0, 64, 128, static_cast<uint32_t>(np - (first < np ? first : np)),
                                1, 63, 65, in.u32()};
        const uint32_t num = nps[in.u8() % 8];
        const uint64_t need = dirty_bitmap_words(num);
        const uint8_t wb = in.u8();
        uint64_t words = wb % 4 == 0 && need ? need - 1 : need + wb % 4 / 2;
        words = std::min<uint64_t>(words, 200);
        std::vector<uint64_t> bm(words);
        for (auto& w : bm) {
          const uint8_t k = in.u8();
          w = k < 64 ? ~uint64_t{0} : (k < 128 ? 0 : in.u64());
        }
        int want_err = 0;
        if (ring_only) want_err = ENXIO;
        else if (!m) want_err = EINVAL;
        else if (first % 64) want_err = EINVAL;
        else if (!m->exists || !m->logging) want_err = ENOENT;
        else if (first > np || num > np - first) want_err = EINVAL;
        else if (num % 64 && first + num != np) want_err = EINVAL;
        else if (bm.size() < need) want_err = EFAULT;
        std::set<uint64_t> want_wp;
        uint64_t want_cleared = 0;
        ModelSlot after = m ? *m : ModelSlot{};
        if (!want_err) {
          for (uint64_t i = 0; i < num; ++i) {
            const uint64_t page = first + i;
            if (page < np && (bm[i / 64] >> (i % 64) & 1) && after.dirty[page]) {
              after.dirty[page] = false;
              ++want_cleared;
              want_wp.insert(base_gfn(slot) + page);
            }
          }
        }
        prot.pages.clear();
        prot.flushes.clear();
        auto r = log.clear_dirty_log(slot, first, num, bm);
        const std::string req = where + ": clear slot " + std::to_string(slot) + " first " +
                                std::to_string(first) + " num " + std::to_string(num) +
                                " words " + std::to_string(bm.size()) + " (npages " +
                                std::to_string(np) + ")";
        if (r.code() != want_err) {
          disagree(req + ": errno " + std::to_string(r.code()) + ", model " +
                   std::to_string(want_err));
        }
        if (r.ok() && r.value() != want_cleared) {
          disagree(req + ": cleared " + std::to_string(r.value()) + ", model " +
                   std::to_string(want_cleared));
        }
        if (prot.pages != want_wp) disagree(req + ": write-protected pages differ");
        if (prot.flushes.size() != (want_cleared ? 1u : 0u)) disagree(req + ": flushes");
        if (m && !want_err) model[slot] = after;
        break;
      }
      case 7: {  // KVM_GET_DIRTY_LOG: the whole bitmap, compared bit for bit
        const unsigned id = in.u8() % kSlots;
        const ModelSlot& m = model[id];
        const uint64_t need = dirty_bitmap_words(m.npages);
        const bool short_span = need && (in.u8() % 8 == 0);
        std::vector<uint64_t> bm(short_span ? need - 1 : need + 1, 0x5a5a5a5a5a5a5a5aull);
        int want_err = 0;
        if (ring_only) want_err = ENXIO;
        else if (!m.exists || !m.logging) want_err = ENOENT;
        else if (short_span) want_err = EFAULT;
        prot.pages.clear();
        prot.flushes.clear();
        auto r = log.get_dirty_log(id, bm);
        if (r.code() != want_err) {
          disagree(where + ": get slot " + std::to_string(id) + ": errno " +
                   std::to_string(r.code()) + ", model " + std::to_string(want_err));
        }
        if (!r.ok()) break;
        uint64_t count = 0;
        std::set<uint64_t> want_wp;
        for (uint64_t p = 0; p < m.npages; ++p) {
          const bool got = bm[p / 64] >> (p % 64) & 1;
          if (got != m.dirty[p]) disagree(where + ": get bit " + std::to_string(p));
          if (got) {
            ++count;
            want_wp.insert(base_gfn(id) + p);
          }
        }
        if (bm[need] != 0x5a5a5a5a5a5a5a5aull) disagree(where + ": get wrote past the bitmap");
        if (r.value() != count) disagree(where + ": get count");
        if (!manual) {
          if (prot.pages != want_wp) disagree(where + ": get write-protected pages differ");
          model[id].dirty.assign(m.npages, false);
        } else if (!prot.pages.empty()) {
          disagree(where + ": get with manual protect write-protected pages");
        }
        break;
      }
    }
  }
  return 0;
}
