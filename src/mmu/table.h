// gfnmap MMU, internal: the radix second-level table (512-entry nodes, 4 levels, 4K/2M/1G
// leaves) with its lock-free walk, and the vCPU access window that the "TLB flush" waits on.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "gfnmap/mmu.h"

namespace gfnmap::detail {

inline constexpr unsigned kSptEntries = 512;
inline constexpr unsigned kSptShift = 9;

constexpr unsigned spt_shift(int level) { return kSptShift * static_cast<unsigned>(level - 1); }
constexpr uint64_t spt_pages(int level) { return uint64_t{1} << spt_shift(level); }
constexpr unsigned spt_index(uint64_t gfn, int level) {
  return static_cast<unsigned>((gfn >> spt_shift(level)) & (kSptEntries - 1));
}

// One table node. Entries are the only thing walkers read without the lock, plus pfn_off and
// pfn_base (published before the entry that uses them, with release/acquire on the entry).
// The pfn of a leaf is pfn_base + pfn_off[i] when that fits 32 bits, else it lives in the
// Mmu's overflow map and the leaf carries spte::kPfnOverflow.
struct alignas(64) SptNode {
  std::atomic<uint64_t> e[kSptEntries]{};
  std::atomic<uint64_t> pfn_base{0};
  bool pfn_base_set = false;  // under the MMU lock
  std::atomic<uint32_t> pfn_off[kSptEntries]{};
};

// The 512 host page pointers of a 2M leaf whose host pages are not contiguous (spte::kScattered).
struct alignas(4096) SptScatter {
  std::byte* ptr[kSptEntries] = {};
};
static_assert(sizeof(SptScatter) == 4096);

// Leaf address bits <-> host pointer (16-byte aligned).
inline uint64_t spt_encode_addr(const void* p) {
  return (reinterpret_cast<uint64_t>(p) << spte::kAddrShift) & spte::kAddrMask;
}
inline std::byte* spt_decode_addr(uint64_t e) {
  // SAFETY: leaf address bits are written only by spt_encode_addr from host pointers.
  return reinterpret_cast<std::byte*>((e & spte::kAddrMask) >> spte::kAddrShift);
}
constexpr bool spt_addr_encodable(uint64_t p) {
  return (p & 15) == 0 && p < (uint64_t{1} << 48);
}

inline SptNode* spt_child(uint64_t e) {
  // SAFETY: table entries are written only by the MMU from SptNode pointers | kTable.
  return reinterpret_cast<SptNode*>(e & ~spte::kTable);
}

struct SptWalk {
  uint64_t e = 0;  // the entry where the walk stopped (a leaf, or 0)
  int level = 1;
  SptNode* node = nullptr;
  unsigned idx = 0;
};

// Lock-free walk from root. Callers that use the result for an access must be inside their
// access window (AccessWindow) so a flush can wait for them.
inline SptWalk spt_walk(SptNode* root, uint64_t gfn) {
  SptNode* n = root;
  for (int level = static_cast<int>(kMmuLevels);; --level) {
    unsigned idx = spt_index(gfn, level);
    uint64_t e = n->e[idx].load(std::memory_order_acquire);
    if (e & spte::kTable) {
      n = spt_child(e);
      continue;
    }
    return {e, level, n, idx};
  }
}

// The host pointer of gfn's 4K page inside leaf e at `level`.
inline std::byte* spt_leaf_ptr(uint64_t e, int level, uint64_t gfn) {
  uint64_t off = gfn & (spt_pages(level) - 1);
  if (e & spte::kScattered) {
    // SAFETY: a scattered leaf's address bits point at its SptScatter (kept until a flush
    // after the leaf is gone).
    return reinterpret_cast<SptScatter*>(spt_decode_addr(e))->ptr[off];
  }
  return spt_decode_addr(e) + (off << kPageShift);
}

// True when the process could register for MEMBARRIER_CMD_PRIVATE_EXPEDITED: flushes then
// use membarrier as their "IPI" and vCPU accesses need only a compiler barrier; otherwise
// vCPUs pay a full fence when entering an access window.
bool membarrier_available();
extern bool g_vcpu_needs_fence;

// A full memory barrier. ThreadSanitizer does not support standalone fences; a seq_cst
// read-modify-write is a full barrier on x86 (a locked instruction) and is what TSan sees.
inline void full_fence() {
#if defined(__SANITIZE_THREAD__)
  static std::atomic<unsigned> fence_word{0};
  fence_word.fetch_add(0, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace gfnmap::detail
