// gfnmap CLI verb `explain`: runs scenario files (host model, memslots, resolver requests) and
// prints each resolution step by step with its decision-table rows; checks "expect" blocks.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli_input.h"
#include "scenario.h"
#include "verb.h"

namespace gfnmap::cli {
namespace {

constexpr const char* kExplainFooter = R"(A scenario is a JSON file:
  {"description": "...", "row": 5,
   "config":   {"address_spaces": 1, "slots": 32764},
   "host":     {"vmas": [{"name": "ram", "size": "2M", "kind": "anon-private"}],
                "ops": [{"op": "populate", "hva": "ram", "len": "64K", "write": true}]},
   "memslots": [{"slot": 0, "gpa": "0", "size": "2M", "hva": "ram"}],
   "requests": [{"api": "faultin_pfn", "gpa": "0x1000", "flags": "WRITE",
                 "release": "faultin",
                 "expect": {"result": "pfn", "writable": true, "ref": true, "rows": [5]}}],
   "expect":   {"outstanding": 0}}
Every request: name, gfn|gpa, as, host {"ops": [...]} applied first, during (a DELETE/MOVE
memslot change the request runs inside), release, expect (result, writable, ref, rows, path,
async, is_refcounted_page, outstanding; absent fields are not checked).
APIs: faultin_pfn, kvm_follow_pfn (pin, map_writable, refcounted_page, allow_unsafe_mappings),
follow_pfn [v7] (flags with GET, atomic, allow_write_mapping, guarded_by_mmu_notifier),
gfn_to_pfn_memslot [v7 legacy] (atomic, interruptible, async, write_fault, writable).
Release rules: none, unused, clean, dirty, faultin. Numbers: decimal, "0x..", "2M".
A directory argument runs every *.json file in it, sorted.
Exit status: 0 all expectations held, 1 a mismatch, 2 bad usage or input.
Full reference: docs/explain.md; one example per decision-table row: scenarios/.)";

struct ExplainOptions {
  std::vector<std::string> paths;
  bool json = false;
  bool brief = false;
};

std::vector<std::string> expand(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  for (const std::string& p : paths) {
    std::error_code ec;
    if (std::filesystem::is_directory(p, ec)) {
      std::vector<std::string> in_dir;
      for (const auto& entry : std::filesystem::directory_iterator(p, ec)) {
        if (entry.path().extension() == ".json") in_dir.push_back(entry.path().string());
      }
      std::sort(in_dir.begin(), in_dir.end());
      if (in_dir.empty()) throw BadInput(fmt::format("{}: no *.json scenario in this directory", p));
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else {
      files.push_back(p);
    }
  }
  return files;
}

int run_explain(const ExplainOptions& opt) {
  std::vector<std::string> files;
  try {
    files = expand(opt.paths);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "gfnmap explain: %s\n", e.what());
    return 2;
  }
  int status = 0;
  size_t passed = 0;
  size_t failed = 0;
  size_t bad = 0;
  nlohmann::json all = nlohmann::json::array();
  for (const std::string& file : files) {
    try {
      Scenario s = load_scenario(file);
      ScenarioOutcome out = run_scenario(s);
      const bool ok = out.failed() == 0;
      ok ? ++passed : ++failed;
      if (!ok) status = std::max(status, 1);
      if (opt.json) {
        all.push_back(explain_to_json(out));
      } else if (opt.brief) {
        std::printf("%s %s%s\n", ok ? "PASS" : "FAIL", file.c_str(),
                    s.description.empty() ? "" : (": " + s.description).c_str());
        if (!ok) {
          for (size_t i = 0; i < out.requests.size(); ++i) {
            for (const std::string& m : out.requests[i].mismatches) {
              std::printf("     request %zu: %s\n", i + 1, m.c_str());
            }
          }
          for (const std::string& m : out.mismatches) std::printf("     %s\n", m.c_str());
        }
      } else {
        std::fputs(format_explain_text(out).c_str(), stdout);
        std::fputs("\n", stdout);
      }
    } catch (const BadInput& e) {
      std::fflush(stdout);
      std::fprintf(stderr, "gfnmap explain: %s\n", e.what());
      ++bad;
      status = 2;
    }
  }
  if (opt.json) {
    nlohmann::json top;
    top["scenarios"] = std::move(all);
    top["passed"] = passed;
    top["failed"] = failed;
    top["bad_input"] = bad;
    std::printf("%s\n", top.dump(2).c_str());
  } else if (files.size() > 1 || opt.brief) {
    std::printf("%zu scenario%s: %zu passed, %zu failed%s\n", files.size(),
                files.size() == 1 ? "" : "s", passed, failed,
                bad ? fmt::format(", {} bad input", bad).c_str() : "");
  }
  return status;
}

GFNMAP_VERB("explain",
            "run resolver scenarios and explain each resolution with its decision-table rows",
            [](CLI::App& cmd) -> std::function<int()> {
              auto opt = std::make_shared<ExplainOptions>();
              cmd.footer(kExplainFooter);
              cmd.add_option("SCENARIO", opt->paths,
                             "scenario files (JSON) or directories of them")
                  ->required();
              cmd.add_flag("--json", opt->json, "print one JSON object instead of text");
              cmd.add_flag("--brief", opt->brief, "one PASS/FAIL line per scenario");
              return [opt] { return run_explain(*opt); };
            });

}  // namespace
}  // namespace gfnmap::cli
