// gfnmap CLI: the verb registry. Each verb lives in its own verb_<name>.cc and registers itself
// with a static GFNMAP_VERB object, so adding a verb touches no other file.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace gfnmap::cli {

struct Verb {
  std::string name;
  std::string summary;
  // Adds the subcommand's options to `cmd`; returns the action run when it is chosen. The
  // action returns the process exit status.
  std::function<std::function<int()>(CLI::App& cmd)> setup;
};

std::vector<Verb>& verbs();

struct VerbRegistrar {
  explicit VerbRegistrar(Verb verb) { verbs().push_back(std::move(verb)); }
};

}  // namespace gfnmap::cli

#define GFNMAP_VERB_CONCAT2(a, b) a##b
#define GFNMAP_VERB_CONCAT(a, b) GFNMAP_VERB_CONCAT2(a, b)
#define GFNMAP_VERB(...)                                                                  \
  static ::gfnmap::cli::VerbRegistrar GFNMAP_VERB_CONCAT(gfnmap_verb_registrar_, __LINE__)( \
      ::gfnmap::cli::Verb{__VA_ARGS__})
