// gfnmap `run` verb tests: the program on small workloads over the host model and real
// memory, checking the documented defaults, the --json schema (docs/run.md) and exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "cli_process.h"

namespace gfnmap::test {
namespace {

namespace fs = std::filesystem;

using RunOutput = CliResult;

class RunCli : public CliProcessTest {
 protected:
  // Runs `gfnmap run ARGS` (ARGS are plain words, no quoting needed).
  RunOutput run(const std::string& args) { return run_cli("run " + args); }

  nlohmann::json run_json(const std::string& args) {
    RunOutput r = run(args + " --json");
    EXPECT_EQ(r.status, 0) << r.err;
    auto j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r.out;
    return j;
  }
};

// Counters of a run must balance: every fault ends in exactly one way.
void expect_balanced(const nlohmann::json& j) {
  const auto& f = j["faults"];
  EXPECT_EQ(j["outstanding_refs"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["unexpected_exits"].get<uint64_t>(), 0u);
  EXPECT_TRUE(j["ok"].get<bool>());
  EXPECT_GE(f["total"].get<uint64_t>(), j["installs"]["total"].get<uint64_t>());
  EXPECT_EQ(j["installs"]["total"].get<uint64_t>(),
            j["installs"]["4k"].get<uint64_t>() + j["installs"]["2m"].get<uint64_t>() +
                j["installs"]["1g"].get<uint64_t>());
}

TEST_F(RunCli, Json_SchemaV1DefaultsAndEveryPageFaultedOnce) {
  // Defaults other than memory (2 vCPUs, anonymous real memory, 100% writes, 2 passes).
  nlohmann::json j = run_json("--memory 8M --no-progress");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["schema_version"], 1);
  const auto& c = j["config"];
  EXPECT_EQ(c["vcpus"], 2);
  EXPECT_EQ(c["memory_bytes"], 8u << 20);
  EXPECT_EQ(c["slots"], 1);
  EXPECT_EQ(c["backing"], "anon");
  EXPECT_EQ(c["write_percent"], 100);
  EXPECT_EQ(c["pattern"], "sequential");
  EXPECT_EQ(c["passes"], 2);
  EXPECT_EQ(c["max_level"], "1g");
  for (const char* key : {"overlap", "dirty_log", "async_pf", "pagemap", "fault_around", "seed"})
    EXPECT_TRUE(c.contains(key)) << key;
  EXPECT_EQ(j["pages"], 2048);
  EXPECT_EQ(j["pages_per_vcpu"], 1024);
  EXPECT_EQ(j["after"]["accesses"], 2048);  // pass 2 touches every page once more
  for (const char* key : {"first_touch", "dirty", "tlb_flushes", "zapped", "splits",
                          "metadata_bytes"})
    EXPECT_TRUE(j.contains(key)) << key;
  expect_balanced(j);
}

TEST_F(RunCli, Json_DefaultMemoryIs1GiB) {
  RunOutput r = run("--help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("--memory TEXT=1G"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--vcpus UINT=2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--backing TEXT=anon"), std::string::npos) << r.out;
}

TEST_F(RunCli, Model_FaultsEqualPagesWithoutOverlap) {
  nlohmann::json j = run_json("--memory 4M --backing model --vcpus 4 --slots 2");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["faults"]["total"], 1024);
  EXPECT_EQ(j["installs"]["4k"], 1024);
  expect_balanced(j);
}

TEST_F(RunCli, Invariant23_DirtyLogHarvestsEveryWrittenPage) {
  // 100% writes: every later pass writes every page, each harvest reports all of them, and
  // every write after a harvest takes the lock-free dirty-log fast path.
  nlohmann::json j = run_json("--memory 4M --backing model --dirty-log --passes 3");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["dirty"]["harvests"], 2);
  EXPECT_EQ(j["dirty"]["pages"], 2 * 1024);
  EXPECT_EQ(j["faults"]["fast"], 2 * 1024);
  expect_balanced(j);
}

TEST_F(RunCli, Invariant24_AsyncPfOnModelFileCompletesEveryPage) {
  nlohmann::json j =
      run_json("--memory 2M --backing model-file --async-pf --pattern random --write-percent 50");
  ASSERT_TRUE(j.is_object());
  EXPECT_GT(j["faults"]["async"].get<uint64_t>(), 0u);
  // Every page got mapped once: by its own fault or by the "page ready" prefetch.
  EXPECT_GE(j["installs"]["total"].get<uint64_t>(), 512u);
  expect_balanced(j);
}

TEST_F(RunCli, Text_ReportAndProgressBar) {
  RunOutput r = run("--memory 4M --backing model --dirty-log --progress");
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* line : {"pages faulted", "faults", "first touch", "after",
                           "dirty pages harvested", "outstanding references 0"})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  EXPECT_NE(r.err.find("%"), std::string::npos) << "no progress bar on stderr: " << r.err;
  RunOutput quiet = run("--memory 4M --backing model --no-progress");
  EXPECT_EQ(quiet.status, 0);
  EXPECT_EQ(quiet.err.find("%"), std::string::npos) << quiet.err;
}

TEST_F(RunCli, BadUsage_ExitsTwoWithAMessage) {
  for (const char* args : {"--memory 3", "--vcpus 0", "--backing nope", "--pattern zigzag",
                           "--write-percent 101", "--max-level 512g"}) {
    RunOutput r = run(args);
    EXPECT_EQ(r.status, 2) << args;
    EXPECT_FALSE(r.err.empty()) << args;
  }
}

}  // namespace
}  // namespace gfnmap::test
