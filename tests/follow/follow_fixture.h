// Shared fixture of the follow tests: named SimHost states (one or more per decision-table row
// of spec 4), a memslot over them, and small assertion helpers.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gfnmap/follow.h"
#include "gfnmap/memslot.h"
#include "gfnmap/sim_host.h"
#include "gfnmap/types.h"

namespace gfnmap::test {

// The slot of every state: kSlotPages pages at kBaseGfn; the page under test is kPageIndex, so
// an offset error shows up as a wrong hva.
inline constexpr Gfn kBaseGfn{0x100};
inline constexpr uint64_t kSlotPages = 4;
inline constexpr uint64_t kPageIndex = 1;

// Host states. Each is built the same way on every call (SimHost is deterministic), so two
// instances can be compared call for call.
enum class State {
  kNoSlot,                // row 1: slot == nullptr
  kInvalidSlot,           // row 2: slot flagged KVM_MEMSLOT_INVALID over a present page
  kReadonlySlot,          // rows 3, 4: READONLY slot over a present writable anon page
  kReadonlySlotNotPresent,  // row 4 then the slow path: READONLY slot, nothing mapped yet
  kPresentWritable,       // row 5: anon private page populated by a write
  kNotPresentAnon,        // rows 7, 9: anon private, nothing mapped (read: zero page)
  kNotPresentAnonNoZeroPage,  // rows 7, 8: the same on a host without the zero page (a read
                              // maps a fresh exclusive page, writable at once)
  kZeroPage,              // row 9: anon private page mapped to the zero page by a read
  kCowShared,             // row 9: anon private page CoW-shared with a simulated fork child
  kSharedNotPresent,      // row 8: memfd shared RW, nothing mapped (a read maps it writable)
  kFastMissOnce,          // row 8: present writable page whose first fast lookup misses
  kWriteProtected,        // row 9: present page with a write-protected PTE, RW VMA
  kFileSharedWritenotify,  // row 9: shared file page (resident) mapped read-only by a read
  kReadOnlyVma,           // rows 9, 15: PROT_READ memfd page, present
  kSignalPending,         // row 10: not present, a non-fatal signal pending
  kSignalFatal,           // row 10: not present, a fatal signal pending
  kFatalBeforeLock,       // row 11: not present, fatal signal before the mmap lock (-EAGAIN)
  kPoisoned,              // row 12: hwpoisoned page
  kNoVma,                 // row 13: the slot's hva range is not mapped
  kFileNotResident,       // rows 14, 16: private file page on disk (needs I/O)
  kSwappedOut,            // row 14: anon page swapped out
  kProtNone,              // row 15: PROT_NONE VMA
  kGupFault,              // row 16: RW VMA whose GUP fails with -EFAULT (OOM/SIGBUS-like)
  kPfnmap,                // rows 17, 21: VM_PFNMAP, refcounted device pages, PTE present RW
  kPfnmapVmIo,            // row 21: VM_IO | VM_PFNMAP, PTE present RW
  kPfnmapMissing,         // row 21 via fixup: PTE missing, fixup_user_fault installs it
  kPfnmapFixupFails,      // row 18: PTE missing, fixup_user_fault fails (-EFAULT)
  kPfnmapFixupDropsLock,  // row 19: fixup drops the mmap lock once, nothing changes
  kPfnmapVmaReplaced,     // row 19 / invariant 15: while unlocked the VMA is replaced
  kPfnmapReadOnlyPte,     // row 20: PTE present, read-only
  kPfnmapRefcountZero,    // rows 4/21, 22, 24: TTM-style refcount-0 pages
  kPfnmapReserved,        // row 21: PG_reserved struct pages
  kPfnmapNoStructPage,    // row 21: no struct page (MMIO)
};

std::string_view to_string(State state);
// Every state, in declaration order.
const std::vector<State>& all_states();

// A built state: the host, the slot (unless kNoSlot) and the page under test.
struct Env {
  explicit Env(SimHostConfig config = {}) : host(config) {}
  SimHost host;
  Memslot slot;
  bool has_slot = true;
  Gfn gfn = kBaseGfn + kPageIndex;
  Hva hva;                 // gfn's hva (also for kNoSlot/kInvalidSlot: where it would be)
  Pfn replaced_device_pfn;  // kPfnmapVmaReplaced: the first device pfn of the new VMA

  const Memslot* slot_ptr() const { return has_slot ? &slot : nullptr; }
};

// Builds `state`. A setup failure is a test failure (ADD_FAILURE) and returns nullptr.
std::unique_ptr<Env> make_env(State state);

// The trace contains decision-table row `row`.
bool has_row(const FollowTrace& trace, int row);
std::string trace_to_string(const FollowTrace& trace);

// Every frame the host knows in a window around the pfns of interest, for before/after
// comparisons: (pfn, FrameInfo) of the frames behind the slot's pages and the zero page.
std::string frames_to_string(SimHost& host, const std::vector<Pfn>& pfns);

// One call of the merged __kvm_faultin_pfn and what it reported.
struct Faultin {
  Pfn pfn;
  bool writable = true;  // faultin_pfn must pre-set it; true shows a missing write
  Page page;
  FollowTrace trace;
};
Faultin faultin(Env& env, FollFlags flags);

// Releases a merged result by the rules of spec 6 for an installed fault (not retried):
// dirty when the host mapping was writable, else clean.
void release_installed(const Faultin& f);

// Fails the test with the error when r is not ok.
#define GFNMAP_ASSERT_OK(expr)                                                   \
  do {                                                                           \
    auto gfnmap_r_ = (expr);                                                     \
    ASSERT_TRUE(gfnmap_r_.ok()) << #expr << ": " << error_to_string(gfnmap_r_.error()); \
  } while (0)

}  // namespace gfnmap::test
