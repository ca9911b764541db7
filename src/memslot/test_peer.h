// gfnmap memslots: a door for tests and benchmarks only (not installed, not public API).
// It reaches states that no public call can, or builds big sets fast.
#pragma once

#include <cstdint>
#include <span>

#include "gfnmap/memslot.h"

namespace gfnmap::detail {

struct MemslotsTestPeer {
  // Sets the VM-wide page total (to reach the overflow check of spec 7.4).
  static void set_nr_memslot_pages(Memslots& slots, uint64_t pages);
  // Publishes `slots` (all in address space `as_id`, ids unique, no gfn overlap, none present
  // yet) in one swap, without checks or listener calls: bulk setup for big benchmarks.
  static void bulk_insert(Memslots& slots, unsigned as_id, std::span<const Memslot> add);
  // Makes the next `count` set builds on this thread throw std::bad_alloc (ENOMEM row).
  static void fail_set_allocations(unsigned count);
  // Whether the read sections of `slots` run the membarrier protocol (src/memslot/srcu.h).
  static bool uses_membarrier(const Memslots& slots);
};

}  // namespace gfnmap::detail
