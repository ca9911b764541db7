// gfnmap CLI `explain`: resolver scenarios (host model setup, memslots, requests in any API
// generation, expectations), their parser, runner and text/JSON reports. Format: docs/explain.md.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "gfnmap/follow.h"
#include "gfnmap/memslot.h"
#include "gfnmap/types.h"

namespace gfnmap::cli {

// Which entry point a request goes through.
enum class RequestApi {
  kFaultin,          // [merged] __kvm_faultin_pfn (faultin_pfn)
  kKvmFollowPfn,     // [merged] kvm_follow_pfn with pin / map_writable / refcounted_page
  kFollowPfn,        // [v7] __kvm_follow_pfn (FollowPfn)
  kGfnToPfnMemslot,  // [v7 legacy] __gfn_to_pfn_memslot with its bools
};
std::string_view to_string(RequestApi api);

// How the caller gives the page back after the request (spec 6).
enum class ReleaseRule {
  kNone,     // keep it (the final reference count shows it)
  kUnused,   // [merged] release_page_unused (a retried fault)
  kClean,    // [merged] release_page_clean; [v7] release_pfn_clean
  kDirty,    // [merged] release_page_dirty; [v7] release_pfn_dirty
  kFaultin,  // [merged] release_faultin_page(page, unused=false, dirty=writable), as x86 does
};
std::string_view to_string(ReleaseRule rule);

// Optional checks of a request's outcome; absent fields are not checked.
struct RequestExpect {
  std::optional<std::string> result;  // FAULT, NOSLOT, ...; "pfn" = any valid pfn; or a number
  std::optional<std::optional<bool>> writable;  // null = not reported by the API
  std::optional<bool> ref;
  std::optional<std::vector<int>> rows;  // exactly these rows, in order
  std::optional<std::string> path;       // none, fast, slow, remapped
  std::optional<bool> async;             // legacy: *async after the call
  std::optional<bool> is_refcounted_page;  // v7
  std::optional<uint64_t> outstanding;   // host references outstanding after the release
};

struct RequestSpec {
  std::string name;
  RequestApi api = RequestApi::kFaultin;
  unsigned as_id = 0;
  Gfn gfn;
  FollFlags flags = 0;  // faultin, kvm_follow_pfn, follow_pfn
  // [merged] kvm_follow_pfn (faultin: only refcounted_page and map_writable as "pointer given").
  bool pin = false;
  bool map_writable = true;          // the pointer is supplied
  bool refcounted_page = true;       // the pointer is supplied
  bool allow_unsafe_mappings = false;
  // [v7] follow_pfn.
  bool atomic = false;
  bool allow_write_mapping = false;
  bool guarded = false;
  // [v7] legacy wrapper.
  bool interruptible = false;
  bool async_ptr = false;
  bool write_fault = false;
  bool writable_ptr = false;
  // Runs the request inside this KVM_SET_USER_MEMORY_REGION (DELETE or MOVE), after the old
  // slot was published INVALID (flush_shadow_memslot): the decision-table row 2 window.
  std::optional<UserspaceMemoryRegion> during;
  nlohmann::json host_before;  // host-model changes applied just before the request
  ReleaseRule release = ReleaseRule::kNone;
  RequestExpect expect;
};

struct MemslotSpec {
  UserspaceMemoryRegion region;
  RegionIoctl ioctl = RegionIoctl::kV1;
};

struct Scenario {
  std::string file;
  std::string text;  // the file's contents (for line numbers in later errors)
  std::string description;
  std::optional<int> row;  // the decision-table row it demonstrates (informative)
  MemslotsConfig config;
  nlohmann::json host;  // host-model setup, validated by the parser
  std::vector<MemslotSpec> memslots;
  std::vector<RequestSpec> requests;
  std::optional<uint64_t> expect_outstanding;  // references outstanding at the end
};

// Reads and validates a scenario file: BadInput for a missing file, bad JSON (with line and
// column), an unknown field, a bad number or an impossible combination.
Scenario load_scenario(const std::string& path);
Scenario parse_scenario(const std::string& text, const std::string& file);

// A frame's state in the host model.
struct FrameState {
  uint64_t pfn = 0;
  std::string kind;       // zero, anon, page-cache, device, hole
  int64_t refcount = 0;   // page_ref_count
  uint32_t held = 0;      // references and pins handed out through HostMm, not yet put
  bool dirty = false;     // set_page_dirty was called
  bool accessed = false;  // mark_page_accessed was called
  bool reserved = false;
  bool poisoned = false;
  bool freed = false;
};

struct RequestOutcome {
  std::string call;  // the call as a person would write it
  Pfn pfn;
  Hva hva;
  std::optional<bool> writable;  // nullopt: the API did not report it
  bool ref = false;              // the caller now holds a reference or pin
  std::optional<bool> async;     // legacy
  std::optional<bool> is_refcounted_page;  // v7
  FollowTrace trace;
  std::string trace_note;  // how the trace was obtained when not directly
  uint64_t outstanding_before = 0;
  uint64_t outstanding_after_call = 0;
  uint64_t outstanding_after_release = 0;
  std::optional<FrameState> frame_before;
  std::optional<FrameState> frame_after_call;
  std::optional<FrameState> frame_after_release;
  std::string released;  // what the release did, "" for none
  std::vector<std::string> mismatches;
};

struct ScenarioOutcome {
  const Scenario* scenario = nullptr;
  std::vector<RequestOutcome> requests;
  uint64_t outstanding_end = 0;
  std::vector<std::string> mismatches;  // scenario-level
  size_t failed() const;                // mismatching requests + scenario-level mismatches
};

// Runs the scenario on a fresh host model and memslots. BadInput when the setup itself fails
// (a memslot KVM would reject, a host range the model refuses).
ScenarioOutcome run_scenario(const Scenario& scenario);

std::string format_explain_text(const ScenarioOutcome& outcome);
nlohmann::json explain_to_json(const ScenarioOutcome& outcome);

}  // namespace gfnmap::cli
