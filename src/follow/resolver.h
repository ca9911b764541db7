// gfnmap follow, internal: the one resolver core behind both APIs (v7 FollowPfn and merged
// KvmFollowPfn). The differences of spec 2.4 are fields of detail::Request, not copies.
#pragma once

#include "gfnmap/follow.h"

namespace gfnmap::detail {

struct Request {
  // Inputs, normalised from either API.
  const Memslot* slot = nullptr;
  Gfn gfn;
  FollFlags flags = 0;         // caller flags only (kFollCallerFlags)
  bool atomic = false;         // [v7] fast path only
  bool pin = false;            // [merged] pin instead of get
  bool try_writable = false;   // v7 allow_write_mapping / merged map_writable != nullptr
  bool keep_ref = true;        // v7 kFollGet; always true when merged
  bool guarded = false;        // [v7] guarded_by_mmu_notifier
  bool need_page_out = true;   // [merged] refcounted_page pointer was supplied
  FollowSemantics sem;
  FollowTrace* trace = nullptr;

  // Outputs.
  Hva hva;
  bool writable = false;
  bool writable_resolved = false;  // writable was decided by a successful path
  bool readonly_slot_cleared = false;  // READONLY slot: upgrade disabled (row 4)
  Page page;                       // the reference the caller now holds, if any
  bool is_refcounted_page = false;  // [v7] output
};

// __kvm_follow_pfn / kvm_follow_pfn: gfn -> hva (rows 1-4), then hva_to_pfn.
Pfn follow(HostMm& mm, Request& req);

}  // namespace gfnmap::detail
