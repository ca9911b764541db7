// gfnmap interleaving checker: the system under test (SimHost, memslots, dirty log, MMU, vCPUs,
// async page faults) built afresh per schedule, its actors, and the checks of every schedule.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gfnmap/async_pf.h"
#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"
#include "mmu_sched/explorer.h"

namespace gfnmap::test::sched {

enum class ActorKind {
  kVcpuWrite,      // Vcpu::write_u64 of one page (faults it in when needed)
  kVcpuRead,       // Vcpu::read_u64 of one page
  kDiscard,        // SimHost::discard (MADV_DONTNEED): invalidate_range_start/end around it
  kWriteProtect,   // SimHost::write_protect: the same bracket, the frame stays
  kDelete,         // KVM_SET_USER_MEMORY_REGION DELETE of slot 0
  kMove,           // ... MOVE of slot 0 to kMoveBaseGfn
  kHarvest,        // KVM_GET_DIRTY_LOG of slot 0 (clear, write-protect, flush)
  kAsyncComplete,  // kvm_check_async_pf_completion: the page-ready re-fault (a prefetch)
};
const char* to_string(ActorKind kind);

struct ActorSpec {
  ActorKind kind;
  uint64_t page = 0;  // the slot page it touches (host ranges: the first page)
  uint64_t pages = 1;  // host ranges only
};

struct WorldConfig {
  uint64_t npages = 2;               // slot 0's pages (at most 64: one dirty-bitmap word)
  bool log_dirty = false;            // slot 0 logs dirty pages
  std::vector<uint64_t> prefault;    // pages written through a setup vCPU (leaves exist)
  std::vector<ActorSpec> actors;
  // kAsyncComplete actors: their page is swapped out in setup, a vCPU with async PF faults on
  // it (page not present) and the worker completes before the schedule starts.
};

inline constexpr uint64_t kBaseGfn = 0x100;
inline constexpr uint64_t kMoveBaseGfn = 0x200;

std::unique_ptr<Scenario> make_world(const WorldConfig& config);

}  // namespace gfnmap::test::sched
