// gfnmap LinuxHost, internal: the region table (published immutable sets read lock-free) and
// the per-page state arrays the fast path reads.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "gfnmap/linux_host.h"

namespace gfnmap::detail {

// Per-page state bits. Set by the slow path after the kernel populated the page; cleared by
// every invalidation of the page (before the change and again after it).
inline constexpr uint8_t kPagePresent = 1u << 0;   // the PTE is populated
inline constexpr uint8_t kPageWritable = 1u << 1;  // ... and host-writable (no fault needed)

// The arrays of one mapping, shared by the pieces it is split into (mprotect, partial unmap).
// Never freed before LinuxHost: a fast-path reader may still hold a pointer to them.
struct PageArrays {
  Hva base;  // hva of index 0
  uint64_t npages = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> state;
  std::unique_ptr<std::atomic<uint32_t>[]> refs;  // LinuxHost's references per page
  std::unique_ptr<std::atomic<uint64_t>[]> pfn;   // valid while kPagePresent

  explicit PageArrays(Hva b, uint64_t n)
      : base(b),
        npages(n),
        state(new std::atomic<uint8_t>[n]()),
        refs(new std::atomic<uint32_t>[n]()),
        pfn(new std::atomic<uint64_t>[n]()) {}
  uint64_t index(Hva hva) const { return (hva - base) >> kPageShift; }
  bool covers(Hva hva) const { return hva >= base && index(hva) < npages; }

  // Sequential fault-around (FaultAround::kSequential): the runs of sequential faults followed
  // now. A run's next fault is expected at page index `next` (kNoStream: the slot is free or
  // being updated); `window` is the number of pages its last fault populated. Only hints: a
  // lost update costs a smaller window, never a wrong page.
  static constexpr uint64_t kNoStream = ~uint64_t{0};
  struct Stream {
    std::atomic<uint64_t> next{kNoStream};
    std::atomic<uint32_t> window{0};
  };
  Stream streams[LinuxHost::kFaultAroundStreams];
  std::atomic<uint32_t> victim{0};  // the slot a new run takes (round robin)
};

struct LinuxRegion {
  Hva start;
  Hva end;
  RegionKind kind = RegionKind::kAnonymous;
  int prot = 0;
  uint32_t vm_flags = 0;
  bool owned = false;
  LazyBacking* lazy = nullptr;
  std::shared_ptr<PageArrays> pages;

  bool contains(Hva hva) const { return hva >= start && hva < end; }
  bool device() const { return kind == RegionKind::kDevice; }
  bool file_backed() const {
    return kind == RegionKind::kFileShared || kind == RegionKind::kFilePrivate;
  }
  bool shared() const {
    return kind == RegionKind::kFileShared || kind == RegionKind::kMemfdShared;
  }
  bool hugetlb() const {
    return kind == RegionKind::kHugetlb2M || kind == RegionKind::kHugetlb1G;
  }
};

struct LinuxRegionSet {
  std::vector<LinuxRegion> regions;  // sorted by start, disjoint
  mutable std::atomic<uint32_t> last{0};  // last hit, a hint only
};

}  // namespace gfnmap::detail
