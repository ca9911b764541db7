// gfnmap CLI: the scenario's host model, a SimHost built from the "host" block of a scenario
// file and changed by a request's "host" block. Format: docs/explain.md.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_input.h"
#include "gfnmap/sim_host.h"
#include "scenario.h"

namespace gfnmap::cli {

class HostModel {
 public:
  // Builds the model from a scenario's "host" block: {"config", "files", "vmas", "ops"}.
  // A null block gives an empty address space. BadInput (with the field's path) when
  // malformed or when SimHost refuses a step.
  explicit HostModel(const JsonReader& host);

  SimHost& sim() { return *sim_; }
  HostMm& mm() { return *sim_; }

  // Applies a request's "host" block: {"ops": [...]}.
  void apply_changes(const JsonReader& changes);
  // Checks a request's "host" block without applying it (BadInput on the first error).
  void validate_changes(const JsonReader& changes);
  // A SimHost refusal inside a callback the resolver triggered (inject_fixup's
  // while_unlocked), "" when none; clears it.
  std::string take_deferred_error();

  // An address: a number, or "NAME" / "NAME+OFFSET" / "NAME-OFFSET" naming a VMA of the
  // "vmas" list. BadInput for an unknown name.
  Hva address(const JsonReader& value) const;

  // The frame's state (nullopt for pfns the model never had).
  std::optional<FrameState> frame(Pfn pfn) const;
  // The frame that hva maps now, if a PTE is present.
  std::optional<FrameState> mapped_frame(Hva hva) const;

  // The VMAs, one line each ("ram  [0x7f0000000000, 0x7f0000200000) anon-private rw- 4k").
  std::vector<std::string> describe_vmas() const;

 private:
  void run_ops(const JsonReader& ops, bool dry);
  void run_op(const JsonReader& op, bool dry);

  std::unique_ptr<SimHost> sim_;
  std::map<std::string, Hva, std::less<>> vma_names_;
  std::map<std::string, FileId, std::less<>> file_names_;
  std::string deferred_error_;
};

}  // namespace gfnmap::cli
