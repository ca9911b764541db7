// gfnmap fuzz target: `gfnmap explain`'s scenario parser and runner on any text: bad input must
// end as BadInput naming the file, and a parsed scenario must run and render without a crash.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cli_input.h"
#include "scenario.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gfnmap::cli;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto check_message = [](const BadInput& e) {
    const std::string what = e.what();
    if (what.rfind("fuzz.json", 0) != 0) {
      std::fprintf(stderr, "fuzz_explain: error without the file name: %s\n", what.c_str());
      std::abort();
    }
  };
  Scenario s;
  try {
    s = parse_scenario(text, "fuzz.json");
  } catch (const BadInput& e) {
    check_message(e);
    return 0;
  }
  try {
    ScenarioOutcome out = run_scenario(s);
    const std::string rendered = format_explain_text(out);
    const std::string json = explain_to_json(out).dump(2);
    if (rendered.empty() || json.empty()) std::abort();
  } catch (const BadInput& e) {
    check_message(e);
  }
  return 0;
}
