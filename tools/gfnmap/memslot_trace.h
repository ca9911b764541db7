// gfnmap CLI `replay`: memslot operation traces (one KVM_SET_USER_MEMORY_REGION per line),
// their parser, the runner that applies them to Memslots, and the text/JSON reports.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gfnmap/memslot.h"

namespace gfnmap::cli {

// One line of a trace:
//   slot=ID [as=AS] [flags=NAME|NAME|0xN] [gpa=N] size=N [hva=N] [gmem_fd=N] [gmem_offset=N]
//   [ioctl=v1|v2] [expect=WHAT]
// Numbers are decimal or 0x-hex with an optional K/M/G/T suffix; '#' starts a comment.
// Without as=, slot= is KVM's raw 32-bit field (address space in bits 16..31).
struct TraceOp {
  size_t line = 0;        // 1-based line in the file
  std::string text;       // the line without its comment, trimmed
  UserspaceMemoryRegion region;
  RegionIoctl ioctl = RegionIoctl::kV1;
  std::optional<std::string> expect;  // OK, NOOP, CREATE, DELETE, MOVE, FLAGS_ONLY or an errno name
};

// Parses a whole trace; BadInput "FILE:LINE: message" on the first malformed line.
std::vector<TraceOp> parse_memslot_trace(std::string_view text, const std::string& file);

// What one implementation answered for one operation.
struct OpOutcome {
  int err = 0;                         // 0 or a positive errno
  std::string message;                 // gfnmap's message for an error
  std::optional<MemslotChange> change;  // on success; nullopt = no-op modify
  bool kind_known = true;              // false: success without the change kind (the kernel)
  // "OK CREATE", "OK NOOP", "OK" (kind unknown), "EINVAL".
  std::string summary() const;
};

struct OpReport {
  const TraceOp* op = nullptr;
  OpOutcome gfnmap;
  std::optional<OpOutcome> peer;  // a second implementation (real KVM), when compared
  bool expect_met = true;         // the op's expect= held (true without one)
  bool peer_agrees = true;        // same errno (and success) as the peer
};

// The compare hook for `--kvm`: applies the same operation elsewhere and reports its outcome.
using PeerApply = std::function<OpOutcome(const UserspaceMemoryRegion&, RegionIoctl)>;

struct ReplayReport {
  std::string file;
  MemslotsConfig config;
  std::string peer_name;  // "" without a peer
  std::vector<OpReport> ops;
  std::vector<Memslot> final_slots;   // every address space, in (as, gpa) order
  std::vector<uint64_t> generations;  // per address space
  size_t expect_failures = 0;
  size_t disagreements = 0;
};

// Applies every op in order to a fresh Memslots(config) (and to `peer` when given).
ReplayReport run_memslot_trace(const std::vector<TraceOp>& ops, const MemslotsConfig& config,
                               const std::string& file, const PeerApply& peer = {},
                               const std::string& peer_name = {});

std::string format_replay_text(const ReplayReport& report);
nlohmann::json replay_to_json(const ReplayReport& report);

// "LOG_DIRTY_PAGES|READONLY", or "0".
std::string mem_flags_to_string(uint32_t flags);
// Parses memslot flag names (LOG_DIRTY_PAGES, READONLY, GUEST_MEMFD, with or without KVM_MEM_).
uint32_t parse_mem_flags(std::string_view text, std::string_view what);

}  // namespace gfnmap::cli
