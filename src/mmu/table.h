// gfnmap MMU, internal: where table nodes live. Nodes are carved from 4 MiB-aligned chunks that
// also hold their pfn side data (found from a node's address); a level-2 table's chunk "block".
#pragma once

#include <cstdint>

#include "gfnmap/mmu.h"

namespace gfnmap::detail {

inline constexpr uint64_t kSptChunkBytes = uint64_t{4} << 20;

struct SptChunk;

// Per node, beside its entries (written under the MMU lock; pfn_base is also read lock-free).
struct SptSide {
  SptWord<uint64_t> pfn_base;  // a leaf's pfn is pfn_base + pfn_off[i] (Mmu::Impl::set_leaf_pfn)
  bool pfn_base_set;
  SptChunk* block;             // a level-2 table: the block holding its 512 level-1 tables
};

// A chunk: reserved with mmap (zero-filled, MAP_NORESERVE: memory is used only where written).
// Two kinds:
//  - a pool chunk holds tables of levels 2 to 4, any slot (`used` marks the live ones);
//  - a block belongs to one level-2 table L: node[j] is the level-1 table of L's entry j,
//    `used` marks the ones L links now. Allocated and freed with L. Its node[] is the flat
//    level-1 array of L's 1 GiB region (see SptNode for the all-zero invariant).
struct SptChunk {
  SptNode node[kSptEntries];                          // 2 MiB, at offset 0
  SptWord<uint32_t> pfn_off[kSptEntries][kSptEntries];  // 1 MiB
  SptSide side[kSptEntries];
  uint64_t used[kSptEntries / 64];
  uint64_t resident[kSptEntries / 64];  // slots ever used (their memory stays until unmapped)
  uint32_t nr_used;
  uint32_t nr_resident;
};
static_assert(sizeof(SptChunk) <= kSptChunkBytes);
static_assert(std::is_trivial_v<SptChunk>);

// Memory a used slot costs: its entries, its pfn offsets and its side data.
inline constexpr uint64_t kSptNodeBytes =
    sizeof(SptNode) + sizeof(SptWord<uint32_t>) * kSptEntries + sizeof(SptSide);

inline SptChunk* spt_chunk_of(const SptNode* n) {
  // SAFETY: every node is node[k] of a chunk aligned to kSptChunkBytes.
  return reinterpret_cast<SptChunk*>(reinterpret_cast<uintptr_t>(n) & ~(kSptChunkBytes - 1));
}
inline unsigned spt_slot_of(const SptNode* n) {
  return static_cast<unsigned>((reinterpret_cast<uintptr_t>(n) & (kSptChunkBytes - 1)) /
                               sizeof(SptNode));
}
inline SptSide& spt_side(const SptNode* n) { return spt_chunk_of(n)->side[spt_slot_of(n)]; }
inline SptWord<uint32_t>* spt_pfn_off(const SptNode* n) {
  return spt_chunk_of(n)->pfn_off[spt_slot_of(n)];
}

// The flat level-1 array of the 1 GiB region of level-2 table l2: kSptRegionPages entries.
inline SptEntry* spt_region_entries(const SptNode* l2) {
  // SAFETY: SptNode is exactly kSptEntries entries (static_assert above), so the block's
  // node[] is one contiguous array of entries.
  return &spt_side(l2).block->node[0].e[0];
}

// Chunk reservation and release (mmap / munmap); throws std::bad_alloc when mmap fails.
SptChunk* spt_map_chunk();
void spt_unmap_chunk(SptChunk* chunk);

}  // namespace gfnmap::detail
