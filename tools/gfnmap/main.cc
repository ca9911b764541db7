// gfnmap CLI entry point: collects the verbs (one verb_<name>.cc each) into one CLI11 app.
// Exit status: 0 success, 1 the work reported a failure or disagreement, 2 bad usage or input.
#include <cstdio>
#include <exception>

#include "gfnmap/version.h"
#include "verb.h"

namespace gfnmap::cli {
std::vector<Verb>& verbs() {
  static std::vector<Verb> all;
  return all;
}
}  // namespace gfnmap::cli

int main(int argc, char** argv) {
  CLI::App app{
      "gfnmap: KVM's guest-memory fault-in path (memslots, follow_pfn, the MMU) in user space.\n"
      "Run 'gfnmap VERB --help' for a verb's options."};
  app.require_subcommand(1);
  app.set_version_flag("--version", "gfnmap " GFNMAP_VERSION_STRING);
  std::function<int()> action;
  for (auto& verb : gfnmap::cli::verbs()) {
    CLI::App* cmd = app.add_subcommand(verb.name, verb.summary);
    auto run = verb.setup(*cmd);
    cmd->callback([&action, run] { action = run; });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    return action ? action() : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gfnmap: %s\n", e.what());
    return 2;
  }
}
