// tools suite, in process: every shipped row scenario and example trace parses and holds its
// expectations; malformed scenarios and traces are BadInput, never a crash or another exception.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "cli_input.h"
#include "memslot_trace.h"
#include "scenario.h"

namespace gfnmap::cli {
namespace {

namespace fs = std::filesystem;

const fs::path kScenarios = fs::path(GFNMAP_SOURCE_DIR) / "scenarios";

std::vector<fs::path> row_scenarios() {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(kScenarios)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("row") && e.path().extension() == ".json") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// rowNN-*.json -> NN, or 0.
int row_of(const fs::path& file) {
  std::smatch m;
  const std::string name = file.filename().string();
  static const std::regex kRow("^row([0-9][0-9])-.*\\.json$");
  return std::regex_match(name, m, kRow) ? std::stoi(m[1]) : 0;
}

// Decision table rows 1..27 (spec 4): one scenario each, named for its row, whose requests all
// carry an expect block and at least one of which is resolved through that row.
TEST(RowScenarios, Rows01To27_OneScenarioPerRowWithExpectations) {
  std::set<int> rows;
  for (const fs::path& file : row_scenarios()) {
    SCOPED_TRACE(file.string());
    const int row = row_of(file);
    ASSERT_GE(row, 1);
    ASSERT_LE(row, 27);
    EXPECT_TRUE(rows.insert(row).second) << "two scenarios for row " << row;
    Scenario s = load_scenario(file.string());
    EXPECT_EQ(s.row, row);
    ASSERT_FALSE(s.requests.empty());
    bool row_seen = false;
    for (const RequestSpec& r : s.requests) {
      EXPECT_TRUE(r.expect.result.has_value()) << r.name;
      EXPECT_TRUE(r.expect.ref.has_value()) << r.name;
      ASSERT_TRUE(r.expect.rows.has_value()) << r.name;
      row_seen |= std::find(r.expect.rows->begin(), r.expect.rows->end(), row) !=
                  r.expect.rows->end();
    }
    EXPECT_TRUE(row_seen) << "no request expects row " << row;
    EXPECT_EQ(s.expect_outstanding, 0u);
  }
  EXPECT_EQ(rows.size(), 27u);
}

// The resolver really takes the rows the scenarios claim, and every scenario ends with zero
// outstanding host references (issue 2: every test ends balanced).
TEST(RowScenarios, Rows01To27_ExpectationsHoldAndReferencesBalance) {
  for (const fs::path& file : row_scenarios()) {
    SCOPED_TRACE(file.string());
    Scenario s = load_scenario(file.string());
    ScenarioOutcome out = run_scenario(s);
    for (size_t i = 0; i < out.requests.size(); ++i) {
      for (const std::string& m : out.requests[i].mismatches) {
        ADD_FAILURE() << "request " << i + 1 << ": " << m;
      }
    }
    for (const std::string& m : out.mismatches) ADD_FAILURE() << m;
    EXPECT_EQ(out.failed(), 0u);
    EXPECT_EQ(out.outstanding_end, 0u);
    // The text and JSON reports render without throwing and agree on the verdict.
    EXPECT_FALSE(format_explain_text(out).empty());
    EXPECT_EQ(explain_to_json(out).at("pass"), true);
  }
}

TEST(RowScenarios, ExpectMismatchIsReportedNotThrown) {
  const std::string text = R"({
    "host": {"vmas": [{"name": "ram", "size": "64K", "prot": "rw", "kind": "anon-private"}]},
    "memslots": [{"slot": 0, "gpa": "0", "size": "64K", "hva": "ram"}],
    "requests": [{"gpa": "0x1000", "flags": "WRITE", "release": "dirty",
                  "expect": {"result": "NOSLOT", "rows": [1], "ref": false}}],
    "expect": {"outstanding": 0}})";
  Scenario s = parse_scenario(text, "inline.json");
  ScenarioOutcome out = run_scenario(s);
  ASSERT_EQ(out.requests.size(), 1u);
  EXPECT_EQ(out.requests[0].mismatches.size(), 3u);  // result, ref, rows
  EXPECT_EQ(out.failed(), 1u);
  EXPECT_EQ(out.outstanding_end, 0u);
}

std::string bad_input_message(const std::string& text) {
  try {
    Scenario s = parse_scenario(text, "t.json");
    (void)run_scenario(s);
  } catch (const BadInput& e) {
    return e.what();
  }
  return "";
}

TEST(ScenarioBadInput, SyntaxErrorNamesLineAndColumn) {
  EXPECT_EQ(bad_input_message("{\n \"memslots\": [\n  {\"slot\": 0,}\n ]\n}\n").rfind("t.json:3:", 0),
            0u);
}

TEST(ScenarioBadInput, UnknownFieldNumberApiAndFlagAreRefused) {
  const std::string base = R"({"memslots": [{"slot": 0, "gpa": "0", "size": SIZE, "hva": "0x7f0000000000"}],
    "requests": [{"api": API, "gpa": "0x1000", "flags": FLAGS EXTRA}]})";
  auto make = [&](std::string size, std::string api, std::string flags, std::string extra) {
    std::string t = base;
    t.replace(t.find("SIZE"), 4, size);
    t.replace(t.find("API"), 3, api);
    t.replace(t.find("FLAGS"), 5, flags);
    t.replace(t.find("EXTRA"), 5, extra);
    return t;
  };
  EXPECT_EQ(bad_input_message(make("\"64K\"", "\"faultin_pfn\"", "\"WRITE\"", "")), "");
  EXPECT_NE(bad_input_message(make("\"64Q\"", "\"faultin_pfn\"", "\"WRITE\"", "")).find("bad number"),
            std::string::npos);
  EXPECT_NE(bad_input_message(make("-1", "\"faultin_pfn\"", "\"WRITE\"", "")), "");
  EXPECT_NE(bad_input_message(make("\"64K\"", "\"gup\"", "\"WRITE\"", "")).find("unknown api"),
            std::string::npos);
  EXPECT_NE(bad_input_message(make("\"64K\"", "\"faultin_pfn\"", "\"WRTIE\"", "")), "");
  EXPECT_NE(bad_input_message(make("\"64K\"", "\"faultin_pfn\"", "\"WRITE\"", ", \"colour\": 1"))
                .find("unknown field \"colour\""),
            std::string::npos);
  EXPECT_NE(bad_input_message(make("\"64K\"", "\"faultin_pfn\"", "true", "")), "");
}

TEST(ScenarioBadInput, MemslotKvmWouldRejectIsBadInput) {
  EXPECT_NE(bad_input_message(R"({"memslots": [{"slot": 0, "gpa": "0x800", "size": "64K",
                                                 "hva": "0x7f0000000000"}]})"),
            "");
}

// Never a crash: any truncation or single-byte corruption of a shipped scenario either runs or
// is BadInput (no other exception, no sanitizer report).
RC_GTEST_PROP(ScenarioBadInput, CorruptedScenarioIsBadInputOrRuns, ()) {
  static const std::vector<fs::path> files = row_scenarios();
  RC_PRE(!files.empty());
  const fs::path& file = files[*rc::gen::inRange<size_t>(0, files.size())];
  std::string text = read_text_file(file.string());
  const size_t at = *rc::gen::inRange<size_t>(0, text.size());
  const int how = *rc::gen::inRange(0, 3);
  static const std::string kBytes = "{}[]\",:0123456789xKM-+ tfn";
  if (how == 0) {
    text.resize(at);
  } else if (how == 1) {
    text[at] = kBytes[*rc::gen::inRange<size_t>(0, kBytes.size())];
  } else {
    text.erase(at, 1);
  }
  try {
    Scenario s = parse_scenario(text, file.string());
    ScenarioOutcome out = run_scenario(s);
    (void)format_explain_text(out);
    (void)explain_to_json(out).dump();
  } catch (const BadInput&) {
  }
}

// ---------------------------------------------------------------------------------------------
// Traces (`gfnmap replay`).

ReplayReport replay(const std::string& file, unsigned address_spaces = 1, uint32_t slots = kUserMemSlots) {
  MemslotsConfig config;
  config.nr_address_spaces = address_spaces;
  config.nr_user_slots = slots;
  const std::string path = (kScenarios / "traces" / file).string();
  const std::vector<TraceOp> ops = parse_memslot_trace(read_text_file(path), path);
  return run_memslot_trace(ops, config, path);
}

// Spec 7.4: CREATE, no-op modify, FLAGS_ONLY both ways, MOVE, DELETE, re-CREATE.
TEST(Traces, Lifecycle_ChangeKindsAndFinalTable) {
  ReplayReport r = replay("lifecycle.trace");
  EXPECT_EQ(r.expect_failures, 0u);
  ASSERT_EQ(r.ops.size(), 8u);
  ASSERT_EQ(r.final_slots.size(), 2u);
  EXPECT_EQ(r.final_slots[0].id, 0u);
  EXPECT_EQ(r.final_slots[0].npages, 1024u);
  EXPECT_EQ(r.final_slots[1].id, 1u);
}

// Spec 7.4: the checks in KVM's order, each with its errno.
TEST(Traces, Errors_EachCheckGivesItsErrno) {
  ReplayReport r = replay("errors.trace");
  EXPECT_EQ(r.expect_failures, 0u);
  size_t failed = 0;
  for (const OpReport& op : r.ops) failed += op.gfnmap.err != 0;
  EXPECT_GT(failed, 3u);
}

TEST(Traces, AddressSpaces_NeedTwoAddressSpaces) {
  EXPECT_EQ(replay("address-spaces.trace", 2).expect_failures, 0u);
  EXPECT_GT(replay("address-spaces.trace", 1).expect_failures, 0u);
}

TEST(Traces, SlotLimit_IdsBelowKvmUserMemSlots) {
  EXPECT_EQ(replay("slot-limit.trace", 1, 4).expect_failures, 0u);
}

TEST(Traces, EveryShippedTraceRendersAsTextAndJson) {
  for (const auto& e : fs::directory_iterator(kScenarios / "traces")) {
    SCOPED_TRACE(e.path().string());
    MemslotsConfig config;
    config.nr_address_spaces = 2;
    const std::vector<TraceOp> ops =
        parse_memslot_trace(read_text_file(e.path().string()), e.path().string());
    ReplayReport r = run_memslot_trace(ops, config, e.path().string());
    EXPECT_FALSE(format_replay_text(r).empty());
    EXPECT_TRUE(replay_to_json(r).contains("slots"));
  }
}

std::string trace_error(const std::string& text) {
  try {
    (void)parse_memslot_trace(text, "t.trace");
  } catch (const BadInput& e) {
    return e.what();
  }
  return "";
}

TEST(TraceBadInput, MalformedLinesNameTheirLine) {
  EXPECT_EQ(trace_error("# ok\nslot=0 size=4K hva=0x1000\n"), "");
  EXPECT_EQ(trace_error("\nslot=0 size=0x1z\n").rfind("t.trace:2:", 0), 0u);
  EXPECT_EQ(trace_error("slot=0 size=4K colour=1\n").rfind("t.trace:1:", 0), 0u);
  EXPECT_NE(trace_error("size=4K\n"), "");                      // no slot=
  EXPECT_NE(trace_error("slot=0 flags=DIRTY size=4K\n"), "");   // unknown flag
  EXPECT_NE(trace_error("slot=0 size=4K ioctl=v3\n"), "");
  EXPECT_NE(trace_error("slot=0 size=4K expect=MAYBE\n"), "");
  EXPECT_NE(trace_error("slot=0 size=99999999999999999999\n"), "");  // overflow
  EXPECT_NE(trace_error("slot=0 slot=1 size=4K\n"), "");              // repeated key
}

RC_GTEST_PROP(TraceBadInput, RandomLinesAreBadInputOrApply, ()) {
  static const std::vector<std::string> kTokens = {
      "slot=", "as=", "flags=", "gpa=", "size=", "hva=", "ioctl=", "expect=", "0", "1", "0x",
      "4K", "2M", "READONLY", "LOG_DIRTY_PAGES", "|", "v1", "v2", "EINVAL", " ", "#", "=", "\n",
      "0xffffffffffffffff", "65536", "-1"};
  std::string text;
  const size_t n = *rc::gen::inRange<size_t>(0, 40);
  for (size_t i = 0; i < n; ++i) text += kTokens[*rc::gen::inRange<size_t>(0, kTokens.size())];
  try {
    const std::vector<TraceOp> ops = parse_memslot_trace(text, "t.trace");
    MemslotsConfig config;
    config.nr_address_spaces = 2;
    (void)format_replay_text(run_memslot_trace(ops, config, "t.trace"));
  } catch (const BadInput&) {
  }
}

}  // namespace
}  // namespace gfnmap::cli
