// tools suite, as a program: `gfnmap explain` over every row scenario (exit 0, --json parses),
// `gfnmap replay` over the example traces, exit status 1 on a mismatch and 2 on bad input, --help.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gfnmap/host_facts.h"
#include "gfnmap/kvm.h"
#include "cli_process.h"

namespace {

namespace fs = std::filesystem;

using gfnmap::test::CliResult;
using gfnmap::test::slurp;

class Cli : public gfnmap::test::CliProcessTest {
 protected:
  // Runs `gfnmap ARGS` from the source tree root (scenario paths are relative to it).
  CliResult gfnmap(const std::string& args) { return run_cli(args, GFNMAP_SOURCE_DIR); }

  std::string write_file(const std::string& name, const std::string& text) {
    const fs::path p = tmp_ / name;
    std::ofstream(p) << text;
    return gfnmap::test::shell_quote(p.string());
  }
};

// Every row 1..27 of spec 4 through the program: all expect blocks hold.
TEST_F(Cli, ExplainRows01To27_AllScenariosExitZero) {
  CliResult r = gfnmap("explain --brief scenarios");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("27 scenarios: 27 passed, 0 failed"), std::string::npos) << r.out;
  CliResult text = gfnmap("explain scenarios/row05-fast-path.json");
  EXPECT_EQ(text.status, 0) << text.err;
  EXPECT_NE(text.out.find("row 5: fast path"), std::string::npos) << text.out;
}

TEST_F(Cli, ExplainJson_ParsesWithOneEntryPerRow) {
  CliResult r = gfnmap("explain --json scenarios");
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);  // throws (test fails) if not JSON
  EXPECT_EQ(j.at("passed"), 27);
  EXPECT_EQ(j.at("failed"), 0);
  EXPECT_EQ(j.at("bad_input"), 0);
  ASSERT_EQ(j.at("scenarios").size(), 27u);
  int row = 0;
  for (const auto& s : j.at("scenarios")) {
    SCOPED_TRACE(s.at("file").get<std::string>());
    // The fields docs/explain.md documents, with their types.
    for (const char* key : {"file", "description", "row", "pass", "mismatches", "outstanding_end",
                            "requests"}) {
      EXPECT_TRUE(s.contains(key)) << key;
    }
    EXPECT_EQ(s.at("row"), ++row);  // sorted by file name: row01 .. row27
    EXPECT_EQ(s.at("pass"), true);
    EXPECT_EQ(s.at("outstanding_end"), 0);
    EXPECT_TRUE(s.at("mismatches").empty());
    ASSERT_FALSE(s.at("requests").empty());
    for (const auto& req : s.at("requests")) {
      for (const char* key : {"name", "api", "as", "gfn", "call", "steps", "rows", "path", "result",
                              "pfn", "hva", "writable", "ref", "async", "is_refcounted_page",
                              "outstanding", "frame", "release", "pass", "mismatches"}) {
        EXPECT_TRUE(req.contains(key)) << key;
      }
      EXPECT_TRUE(req.at("steps").is_array());
      EXPECT_TRUE(req.at("rows").is_array());
      EXPECT_TRUE(req.at("ref").is_boolean());
      EXPECT_TRUE(req.at("writable").is_boolean() || req.at("writable").is_null());
      EXPECT_TRUE(req.at("result").is_string());
      EXPECT_TRUE(req.at("pfn").is_string());
      for (const char* key : {"before", "after_call", "after_release"}) {
        EXPECT_TRUE(req.at("outstanding").at(key).is_number_unsigned()) << key;
      }
      EXPECT_EQ(req.at("outstanding").at("after_release"), 0);
      EXPECT_EQ(req.at("pass"), true);
      const std::string path = req.at("path");
      EXPECT_TRUE(path == "none" || path == "fast" || path == "slow" || path == "remapped") << path;
    }
  }
}

TEST_F(Cli, ExplainMismatch_ExitsOne) {
  std::string text = slurp(fs::path(GFNMAP_SOURCE_DIR) / "scenarios/row05-fast-path.json");
  const size_t at = text.find("\"rows\": [5]");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 11, "\"rows\": [7]");
  CliResult r = gfnmap("explain " + write_file("mismatch.json", text));
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("MISMATCH:  rows: expected 7, got 5"), std::string::npos) << r.out;
  // The same through --json: exit 1, the request and the scenario marked failed.
  CliResult json = gfnmap("explain --json " + write_file("mismatch2.json", text));
  EXPECT_EQ(json.status, 1) << json.err;
  const nlohmann::json j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j.at("failed"), 1);
  EXPECT_EQ(j.at("scenarios")[0].at("pass"), false);
  EXPECT_EQ(j.at("scenarios")[0].at("requests")[0].at("pass"), false);
  EXPECT_FALSE(j.at("scenarios")[0].at("requests")[0].at("mismatches").empty());
}

TEST_F(Cli, ExplainBadInput_ExitsTwoWithAClearMessage) {
  CliResult missing = gfnmap("explain does-not-exist.json");
  EXPECT_EQ(missing.status, 2);
  EXPECT_NE(missing.err.find("does-not-exist.json: cannot open"), std::string::npos) << missing.err;

  CliResult syntax = gfnmap("explain " + write_file("syntax.json", "{\n \"memslots\": [\n  {\"slot\": 0,}\n ]\n}\n"));
  EXPECT_EQ(syntax.status, 2);
  EXPECT_NE(syntax.err.find("syntax.json:3:"), std::string::npos) << syntax.err;

  CliResult unknown = gfnmap("explain " + write_file("unknown.json", "{\"requets\": []}"));
  EXPECT_EQ(unknown.status, 2);
  EXPECT_NE(unknown.err.find("unknown field \"requets\""), std::string::npos) << unknown.err;

  CliResult number = gfnmap("explain " + write_file("number.json",
      R"({"memslots": [{"slot": 0, "gpa": "0", "size": "12Q", "hva": "0x7f0000000000"}]})"));
  EXPECT_EQ(number.status, 2);
  EXPECT_NE(number.err.find("bad number \"12Q\""), std::string::npos) << number.err;

  CliResult none = gfnmap("explain");
  EXPECT_EQ(none.status, 2);
}

// The options an example trace needs (the trace's own header says so too); others need none.
std::string trace_options(const std::string& file) {
  if (file == "address-spaces.trace") return "--address-spaces 2";
  if (file == "slot-limit.trace") return "--slots 4";
  return "";
}

// The host-fact scenarios (the model with a fact switched, "config": {"zero_page": false})
// pass on every machine: both branches of a fact-dependent row run everywhere.
TEST_F(Cli, ExplainHostFactScenarios_Pass) {
  CliResult r = gfnmap("explain --json scenarios/host-facts");
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_GE(j.at("passed").get<int>(), 1);
  EXPECT_EQ(j.at("failed").get<int>(), 0);
}

// `info` reports this host's probed facts, the same ones this test process probes.
TEST_F(Cli, Info_ReportsTheProbedHostFacts) {
  const gfnmap::HostFacts& facts = gfnmap::host_facts();
  CliResult r = gfnmap("info --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const auto& h = j.at("host");
  EXPECT_EQ(h.at("zero_page").get<bool>(), facts.zero_page);
  EXPECT_FALSE(h.at("zero_page_how").get<std::string>().empty());
  EXPECT_EQ(h.at("kvm").at("available").get<bool>(), facts.kvm_available());
  EXPECT_EQ(h.at("kvm").at("why").is_null(), facts.kvm_available());
  EXPECT_EQ(h.at("userfaultfd").at("syscall").get<bool>(), facts.uffd_syscall);
  EXPECT_EQ(h.at("pagemap").at("physical_pfns").get<bool>(), facts.pagemap_pfns);
  EXPECT_EQ(h.at("hugetlb").at("2M").at("total").get<uint64_t>(), facts.hugetlb_2m_total);
  EXPECT_EQ(j.at("hosts").at("kvm").get<bool>(), facts.kvm_available());
  CliResult text = gfnmap("info");
  ASSERT_EQ(text.status, 0) << text.err;
  EXPECT_NE(text.out.find(facts.zero_page ? "zero page:    yes" : "zero page:    no"),
            std::string::npos)
      << text.out;
  EXPECT_NE(text.out.find("/dev/kvm:"), std::string::npos);
}

// GFNMAP_HOST_ZERO_PAGE=1 forces the zero-page fact on (emulated where the kernel lacks it);
// =0 is ignored where the kernel has it.
TEST_F(Cli, Info_ZeroPageOverride) {
  const gfnmap::HostFacts& facts = gfnmap::host_facts();
  const bool kernel = facts.zero_page && !facts.zero_page_emulated;
  CliResult on = run_cli("info --json", "", "GFNMAP_HOST_ZERO_PAGE=1");
  ASSERT_EQ(on.status, 0) << on.err;
  const auto jon = nlohmann::json::parse(on.out).at("host");
  EXPECT_TRUE(jon.at("zero_page").get<bool>());
  EXPECT_EQ(jon.at("zero_page_emulated").get<bool>(), !kernel);
  CliResult off = run_cli("info --json", "", "GFNMAP_HOST_ZERO_PAGE=0");
  ASSERT_EQ(off.status, 0) << off.err;
  const auto joff = nlohmann::json::parse(off.out).at("host");
  EXPECT_EQ(joff.at("zero_page").get<bool>(), kernel) << "0 never denies a real zero page";
  EXPECT_FALSE(joff.at("zero_page_emulated").get<bool>());
}

TEST_F(Cli, ReplayExampleTraces_ExitZeroAndJsonParses) {
  std::vector<std::string> traces;
  for (const auto& e : fs::directory_iterator(fs::path(GFNMAP_SOURCE_DIR) / "scenarios/traces")) {
    if (e.path().extension() == ".trace") traces.push_back(e.path().filename().string());
  }
  std::sort(traces.begin(), traces.end());
  EXPECT_GE(traces.size(), 4u);
  for (const std::string& file : traces) {
    SCOPED_TRACE(file);
    const std::string args = trace_options(file) + " scenarios/traces/" + file;
    CliResult text = gfnmap("replay " + args);
    EXPECT_EQ(text.status, 0) << text.out << text.err;
    EXPECT_NE(text.out.find("final slot table:"), std::string::npos);
    CliResult json = gfnmap("replay --json " + args);
    ASSERT_EQ(json.status, 0) << json.err;
    const nlohmann::json j = nlohmann::json::parse(json.out);
    EXPECT_EQ(j.at("expect_failures"), 0);
    EXPECT_TRUE(j.at("slots").is_array());
    ASSERT_FALSE(j.at("operations").empty());
    for (const char* key : {"trace", "config", "generations"}) EXPECT_TRUE(j.contains(key)) << key;
    for (const auto& op : j.at("operations")) {
      for (const char* key : {"line", "text", "ioctl", "region", "result", "expect", "expect_met"}) {
        EXPECT_TRUE(op.contains(key)) << key;
      }
      for (const char* key : {"slot", "as", "id", "flags", "gpa", "size", "hva"}) {
        EXPECT_TRUE(op.at("region").contains(key)) << key;
      }
      const auto& res = op.at("result");
      for (const char* key : {"ok", "change", "errno", "message", "summary"}) {
        EXPECT_TRUE(res.contains(key)) << key;
      }
      EXPECT_EQ(res.at("ok").get<bool>(), res.at("errno").is_null());
    }
    for (const auto& slot : j.at("slots")) {
      for (const char* key : {"as", "slot", "flags", "gpa", "gpa_end", "npages", "hva"}) {
        EXPECT_TRUE(slot.contains(key)) << key;
      }
    }
  }
  // The lifecycle trace's final table: slot 0 re-created with 1024 pages, slot 1 untouched.
  const nlohmann::json j = nlohmann::json::parse(gfnmap("replay --json scenarios/traces/lifecycle.trace").out);
  ASSERT_EQ(j.at("slots").size(), 2u);
  EXPECT_EQ(j.at("slots")[0].at("npages"), 1024);
  EXPECT_EQ(j.at("slots")[1].at("slot"), 1);
}

TEST_F(Cli, ReplayExpectNotMet_ExitsOne) {
  CliResult r = gfnmap("replay scenarios/traces/address-spaces.trace");  // needs --address-spaces 2
  EXPECT_EQ(r.status, 1) << r.out << r.err;
}

// `replay --kvm`: every operation of the example traces also goes to a real VM; gfnmap, configured
// like that kernel, gives the same errno for each (invariant 21 against the running kernel).
TEST_F(Cli, ReplayKvm_Invariant21_ExampleTracesAgreeWithTheKernel) {
  std::string why;
  if (!gfnmap::kvm::kvm_available(&why)) GTEST_SKIP() << why;
  for (const char* file : {"lifecycle.trace", "errors.trace", "slot-limit.trace",
                           "address-spaces.trace"}) {
    SCOPED_TRACE(file);
    CliResult r = gfnmap(std::string("replay --kvm --json scenarios/traces/") + file);
    ASSERT_TRUE(r.status == 0 || r.status == 1) << r.err;
    const nlohmann::json j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j.at("peer"), "kvm");
    EXPECT_EQ(j.at("disagreements"), 0) << r.out;
    size_t kernel_errors = 0;
    for (const auto& op : j.at("operations")) {
      ASSERT_TRUE(op.contains("peer"));
      EXPECT_TRUE(op.at("agrees").get<bool>()) << op.dump();
      kernel_errors += !op.at("peer").at("ok").get<bool>();
    }
    if (std::string(file) == "errors.trace") {
      EXPECT_GE(kernel_errors, 10u);
    }
  }
  // The text form prints the kernel's line under each operation and the total.
  CliResult text = gfnmap("replay --kvm scenarios/traces/lifecycle.trace");
  EXPECT_EQ(text.status, 0) << text.out << text.err;
  EXPECT_NE(text.out.find("kvm: OK  (agrees)"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("kvm: 0 disagreements"), std::string::npos) << text.out;
}

// A valid slot above --kvm-max-slot is refused before anything reaches the kernel (its shadow
// MMU allocates metadata per page); sizes the kernel itself rejects are let through.
TEST_F(Cli, ReplayKvm_RefusesHugeValidSlotsAndConflictingOptions) {
  CliResult big = gfnmap("replay --kvm " + write_file("big.trace", "slot=1 size=2G hva=1G\n"));
  EXPECT_EQ(big.status, 2);
  EXPECT_NE(big.err.find("big.trace:1: a slot of 0x80000000 bytes is larger than --kvm-max-slot 1G"),
            std::string::npos) << big.err;
  CliResult limit = gfnmap("replay --kvm --kvm-max-slot 1M " +
                           write_file("mid.trace", "slot=1 size=2M hva=1G\n"));
  EXPECT_EQ(limit.status, 2);
  EXPECT_NE(limit.err.find("--kvm-max-slot 1M"), std::string::npos) << limit.err;
  std::string many;
  for (int i = 0; i < 65; ++i) many += "slot=1 size=1M hva=1G\nslot=1 size=0\n";
  CliResult sum = gfnmap("replay --kvm --kvm-max-slot 1M " + write_file("sum.trace", many));
  EXPECT_EQ(sum.status, 2);
  EXPECT_NE(sum.err.find("sum.trace:129: the slot sizes up to here add up to more than 64 x "
                         "--kvm-max-slot 1M"), std::string::npos) << sum.err;
  EXPECT_EQ(gfnmap("replay --kvm --kvm-max-slot 1q scenarios/traces/lifecycle.trace").status, 2);
  EXPECT_EQ(gfnmap("replay --kvm --slots 4 scenarios/traces/lifecycle.trace").status, 2);
  EXPECT_EQ(gfnmap("replay --kvm-max-slot 1G scenarios/traces/lifecycle.trace").status, 2);
}

TEST_F(Cli, ReplayBadInput_ExitsTwoWithTheLine) {
  CliResult missing = gfnmap("replay nope.trace");
  EXPECT_EQ(missing.status, 2);
  EXPECT_NE(missing.err.find("nope.trace: cannot open"), std::string::npos) << missing.err;
  CliResult bad = gfnmap("replay " + write_file("bad.trace", "# c\nslot=0 size=0x1z\n"));
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("bad.trace:2:"), std::string::npos) << bad.err;
  CliResult key = gfnmap("replay " + write_file("key.trace", "slot=0 size=4K sise=1\n"));
  EXPECT_EQ(key.status, 2);
  EXPECT_NE(key.err.find("unknown key \"sise\""), std::string::npos) << key.err;
  EXPECT_EQ(gfnmap("replay --slots 0 scenarios/traces/lifecycle.trace").status, 2);
  EXPECT_EQ(gfnmap("replay --address-spaces 3 scenarios/traces/lifecycle.trace").status, 2);
}

TEST_F(Cli, HelpOnEveryVerb_ExplainsFormatsAndPointsToTheDocs) {
  CliResult explain = gfnmap("explain --help");
  EXPECT_EQ(explain.status, 0);
  EXPECT_NE(explain.out.find("docs/explain.md"), std::string::npos) << explain.out;
  // The example scenario in the help text is a working scenario.
  const std::string head = "A scenario is a JSON file:\n";
  const size_t from = explain.out.find(head);
  const size_t to = explain.out.find("\nEvery request:");
  ASSERT_NE(from, std::string::npos) << explain.out;
  ASSERT_NE(to, std::string::npos) << explain.out;
  const std::string example = explain.out.substr(from + head.size(), to - from - head.size());
  CliResult run = gfnmap("explain " + write_file("help-example.json", example));
  EXPECT_EQ(run.status, 0) << example << run.out << run.err;

  CliResult replay = gfnmap("replay --help");
  EXPECT_EQ(replay.status, 0);
  EXPECT_NE(replay.out.find("docs/replay.md"), std::string::npos) << replay.out;
  EXPECT_NE(replay.out.find("slot=ID"), std::string::npos) << replay.out;
  // And so is its example line.
  const size_t ex = replay.out.find("Example:\n  ");
  ASSERT_NE(ex, std::string::npos) << replay.out;
  const size_t line_from = ex + 11;
  const std::string line = replay.out.substr(line_from, replay.out.find('\n', line_from) - line_from);
  CliResult trace = gfnmap("replay " + write_file("help-example.trace", line + "\n"));
  EXPECT_EQ(trace.status, 0) << line << trace.out << trace.err;
}

}  // namespace
