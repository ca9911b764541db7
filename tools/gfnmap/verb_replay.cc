// gfnmap CLI verb `replay`: applies a memslot operation trace (KVM_SET_USER_MEMORY_REGION per
// line) to gfnmap's Memslots and prints each result and the final slot table (docs/replay.md).
#include <fmt/format.h>

#include <cstdio>

#include "cli_input.h"
#include "memslot_trace.h"
#include "verb.h"

namespace gfnmap::cli {
namespace {

constexpr const char* kReplayFooter = R"(Trace format (one KVM_SET_USER_MEMORY_REGION per line, '#' starts a comment):
  slot=ID [as=AS] [flags=LOG_DIRTY_PAGES|READONLY|GUEST_MEMFD|0xN] [gpa=N] size=N [hva=N]
  [ioctl=v1|v2] [expect=OK|NOOP|CREATE|DELETE|MOVE|FLAGS_ONLY|EINVAL|EEXIST|...]
Numbers: decimal or 0x-hex, optional K/M/G/T suffix. size=0 deletes. Omitted gpa/hva/flags
are 0, as is 0; without as=, slot= is KVM's raw field (address space in bits 16..31).
Example:
  slot=0 flags=LOG_DIRTY_PAGES gpa=0 size=2M hva=0x7f0000000000 expect=CREATE
Exit status: 0 done, 1 an expect= did not hold, 2 bad usage or input.
Full reference: docs/replay.md; examples: scenarios/traces/.)";

struct ReplayOptions {
  std::string trace;
  bool json = false;
  unsigned address_spaces = 1;
  uint32_t slots = kUserMemSlots;
};

int run_replay(const ReplayOptions& opt) {
  MemslotsConfig config;
  config.nr_address_spaces = opt.address_spaces;
  config.nr_user_slots = opt.slots;
  ReplayReport report;
  std::vector<TraceOp> ops;
  try {
    std::string text = read_text_file(opt.trace);
    ops = parse_memslot_trace(text, opt.trace);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "gfnmap replay: %s\n", e.what());
    return 2;
  }
  report = run_memslot_trace(ops, config, opt.trace);
  if (opt.json) {
    std::printf("%s\n", replay_to_json(report).dump(2).c_str());
  } else {
    std::fputs(format_replay_text(report).c_str(), stdout);
  }
  return report.expect_failures || report.disagreements ? 1 : 0;
}

GFNMAP_VERB("replay", "apply a memslot operation trace and print each result and the final slots",
            [](CLI::App& cmd) -> std::function<int()> {
              auto opt = std::make_shared<ReplayOptions>();
              cmd.footer(kReplayFooter);
              cmd.add_option("TRACE", opt->trace, "memslot operation trace file")
                  ->required();
              cmd.add_flag("--json", opt->json, "print one JSON object instead of text");
              cmd.add_option("--address-spaces", opt->address_spaces,
                             "number of address spaces, 1 or 2 (default 1, as on this machine)")
                  ->check(CLI::Range(1u, 2u));
              cmd.add_option("--slots", opt->slots,
                             "user slots per address space (KVM_USER_MEM_SLOTS; default 32764, "
                             "as KVM_CAP_NR_MEMSLOTS reports here)")
                  ->check(CLI::Range(1u, static_cast<unsigned>(kMemSlotsNum)));
              return [opt] { return run_replay(*opt); };
            });

}  // namespace
}  // namespace gfnmap::cli
