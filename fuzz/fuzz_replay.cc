// gfnmap fuzz target: `gfnmap replay`'s trace parser and runner on any text, with MemslotModel
// as the second implementation: a parsed trace must replay with no errno or change disagreement.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "cli_input.h"
#include "memslot_model.h"
#include "memslot_trace.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gfnmap;
  using namespace gfnmap::cli;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<TraceOp> ops;
  try {
    ops = parse_memslot_trace(text, "fuzz.trace");
  } catch (const BadInput& e) {
    const std::string what = e.what();
    if (what.rfind("fuzz.trace", 0) != 0) {  // every error names the file (and line)
      std::fprintf(stderr, "fuzz_replay: error without the file name: %s\n", what.c_str());
      std::abort();
    }
    return 0;
  }
  // The CLI's default VM, and a small one (--address-spaces 2 --slots 4) where the limits bite.
  for (int variant = 0; variant < 2; ++variant) {
    MemslotsConfig config;
    if (variant == 1) {
      config.nr_address_spaces = 2;
      config.nr_user_slots = 4;
    }
    fuzz::MemslotModel model(config);
    const PeerApply peer = [&](const UserspaceMemoryRegion& r, RegionIoctl io) {
      fuzz::ModelResult m = model.apply(r, io);
      OpOutcome out;
      out.err = m.err;
      out.change = m.change;
      return out;
    };
    ReplayReport report = run_memslot_trace(ops, config, "fuzz.trace", peer, "model");
    for (const OpReport& r : report.ops) {
      const bool same_change = r.gfnmap.err != 0 || r.gfnmap.change == r.peer->change;
      if (!r.peer_agrees || !same_change) {
        std::fprintf(stderr, "fuzz_replay: DISAGREEMENT (config %d) at line %zu `%s`: gfnmap %s, "
                     "model %s\n", variant, r.op->line, r.op->text.c_str(),
                     r.gfnmap.summary().c_str(), r.peer->summary().c_str());
        std::abort();
      }
    }
    if (report.disagreements != 0) std::abort();
    const std::string out = format_replay_text(report);
    const std::string json = replay_to_json(report).dump(2);
    if (out.empty() || json.empty()) std::abort();
  }
  return 0;
}
