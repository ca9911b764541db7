// gfnmap `run` verb tests (engine backend): the program on small workloads over the host model
// and real memory (anon, thp, memfd, file, uffd), the --json schema v2 (docs/run.md), exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_process.h"

namespace gfnmap::test {
namespace {

namespace fs = std::filesystem;

using RunOutput = CliResult;

std::string fmt_hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(v));
  return v ? buf : "0x0";
}

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

// Counters of a run must balance: every fault ends in exactly one way. j is the whole document.
void expect_balanced(const nlohmann::json& j) {
  EXPECT_TRUE(j["ok"].get<bool>());
  const auto& e = j["engine"];
  ASSERT_TRUE(e.is_object());
  const auto& f = e["faults"];
  EXPECT_EQ(e["outstanding_refs"].get<uint64_t>(), 0u);
  EXPECT_EQ(e["unexpected_exits"].get<uint64_t>(), 0u);
  EXPECT_TRUE(e["ok"].get<bool>());
  EXPECT_GE(f["total"].get<uint64_t>(), e["installs"]["total"].get<uint64_t>());
  EXPECT_EQ(e["installs"]["total"].get<uint64_t>(),
            e["installs"]["4k"].get<uint64_t>() + e["installs"]["2m"].get<uint64_t>() +
                e["installs"]["1g"].get<uint64_t>());
  // The reads saw what the guest's access sequence predicts (no --overlap here).
  EXPECT_EQ(j["checksum"]["engine_match"], true) << j["checksum"].dump();
}

TEST_F(RunCli, Json_SchemaV2DefaultsAndEveryPageFaultedOnce) {
  // Defaults other than memory (2 vCPUs, anonymous real memory, 100% writes, 2 passes).
  nlohmann::json j = run_json("--memory 8M --no-progress --backend engine");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["schema_version"], 2);
  const auto& c = j["config"];
  EXPECT_EQ(c["vcpus"], 2);
  EXPECT_EQ(c["memory_bytes"], 8u << 20);
  EXPECT_EQ(c["slots"], 1);
  EXPECT_EQ(c["backing"], "anon");
  EXPECT_EQ(c["backend"], "engine");
  EXPECT_TRUE(c["snapshot"].is_null());
  EXPECT_EQ(c["write_percent"], 100);
  EXPECT_EQ(c["pattern"], "sequential");
  EXPECT_EQ(c["passes"], 2);
  EXPECT_EQ(c["max_level"], "1g");
  for (const char* key : {"overlap", "dirty_log", "async_pf", "pagemap", "fault_around", "seed"})
    EXPECT_TRUE(c.contains(key)) << key;
  EXPECT_EQ(j["backends"], nlohmann::json::array({"engine"}));
  EXPECT_EQ(j["kvm_skipped"], "--backend engine");
  EXPECT_TRUE(j["kvm"].is_null());
  EXPECT_EQ(j["pages"], 2048);
  EXPECT_EQ(j["pages_per_vcpu"], 1024);
  const auto& e = j["engine"];
  ASSERT_TRUE(e.is_object());
  EXPECT_EQ(e["pages_faulted"], 2048);
  EXPECT_EQ(e["after"]["accesses"], 2048);  // pass 2 touches every page once more
  for (const char* key : {"first_touch", "dirty", "exits", "tlb_flushes", "zapped", "splits",
                          "metadata_bytes", "checksums", "uffd"})
    EXPECT_TRUE(e.contains(key)) << key;
  EXPECT_TRUE(e["uffd"].is_null());
  EXPECT_EQ(e["checksums"].size(), 2u);
  // 100% writes: nothing is read, the checksums are 0.
  EXPECT_EQ(j["checksum"]["expected"], nlohmann::json::array({"0x0", "0x0"}));
  expect_balanced(j);
}

TEST_F(RunCli, Json_DefaultMemoryIs1GiB) {
  RunOutput r = run("--help");
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("--memory TEXT=1G"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--vcpus UINT=2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--backing TEXT=anon"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--backend"), std::string::npos) << r.out;
}

TEST_F(RunCli, Model_FaultsEqualPagesWithoutOverlap) {
  // The default backend on the host model is engine alone, with the reason.
  nlohmann::json j = run_json("--memory 4M --backing model --vcpus 4 --slots 2");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["config"]["backend"], "engine");
  EXPECT_NE(j["kvm_skipped"].get<std::string>().find("host model"), std::string::npos);
  EXPECT_EQ(j["engine"]["faults"]["total"], 1024);
  EXPECT_EQ(j["engine"]["installs"]["4k"], 1024);
  expect_balanced(j);
}

TEST_F(RunCli, Invariant23_DirtyLogHarvestsEveryWrittenPage) {
  // 100% writes: every later pass writes every page, each harvest reports all of them, and
  // every write after a harvest takes the lock-free dirty-log fast path.
  nlohmann::json j = run_json("--memory 4M --backing model --dirty-log --passes 3");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["engine"]["dirty"]["harvests"], 2);
  EXPECT_EQ(j["engine"]["dirty"]["pages"], 2 * 1024);
  EXPECT_EQ(j["engine"]["faults"]["fast"], 2 * 1024);
  expect_balanced(j);
}

TEST_F(RunCli, Invariant24_AsyncPfOnModelFileCompletesEveryPage) {
  nlohmann::json j =
      run_json("--memory 2M --backing model-file --async-pf --pattern random --write-percent 50");
  ASSERT_TRUE(j.is_object());
  EXPECT_GT(j["engine"]["faults"]["async"].get<uint64_t>(), 0u);
  // Every page got mapped once: by its own fault or by the "page ready" prefetch.
  EXPECT_GE(j["engine"]["installs"]["total"].get<uint64_t>(), 512u);
  expect_balanced(j);
}

TEST_F(RunCli, Text_ReportAndProgressBar) {
  RunOutput r = run("--memory 4M --backing model --dirty-log --progress");
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* line : {"engine (gfnmap MMU)", "pages faulted", "first touch", "after",
                           "dirty pages harvested", "exits", "read checksums", "as predicted",
                           "outstanding references  0", "engine faults", "engine installs",
                           "kvm backend skipped: backing model is the host model"})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  EXPECT_NE(r.err.find("%"), std::string::npos) << "no progress bar on stderr: " << r.err;
  RunOutput quiet = run("--memory 4M --backing model --no-progress");
  EXPECT_EQ(quiet.status, 0);
  EXPECT_EQ(quiet.err.find("%"), std::string::npos) << quiet.err;
  // The dirty line is printed only with --dirty-log (docs/run.md says so).
  EXPECT_EQ(quiet.out.find("dirty pages harvested"), std::string::npos) << quiet.out;
}

TEST_F(RunCli, BadUsage_ExitsTwoWithAMessage) {
  for (const char* args :
       {"--memory 3", "--vcpus 0", "--backing nope", "--pattern zigzag", "--write-percent 101",
        "--max-level 512g", "--backend nope", "--snapshot /nonexistent",
        "--backing uffd --snapshot /nonexistent/snap --backend engine",
        "--backing model --backend kvm", "--backing model --backend both",
        "--memory 2G --backend kvm", "--file x --backing anon", "--fault-around 48",
        "--fault-around 1", "--fault-around 1024", "--fault-around always",
        "--fault-around 64x"}) {
    RunOutput r = run(args);
    EXPECT_EQ(r.status, 2) << args << "\n" << r.out;
    EXPECT_FALSE(r.err.empty()) << args;
  }
  RunOutput r = run("--backing model --backend kvm");
  EXPECT_NE(r.err.find("--backend kvm: backing model is the host model"), std::string::npos)
      << r.err;
  r = run("--fault-around 48");
  EXPECT_NE(r.err.find("--fault-around 48: expected sequential, off or a power of two"),
            std::string::npos)
      << r.err;
}

// --fault-around: the default populates ahead of the vCPUs' sequential slices (each page still
// faults once in the MMU), off populates nothing ahead, a fixed window its aligned window.
TEST_F(RunCli, FaultAround_PoliciesInConfigAndPopulatedAhead) {
  nlohmann::json seq = run_json("--memory 8M --backend engine");
  ASSERT_TRUE(seq.is_object());
  EXPECT_EQ(seq["config"]["fault_around_policy"], "sequential");
  EXPECT_EQ(seq["config"]["fault_around"], 64);
  EXPECT_EQ(seq["engine"]["faults"]["total"], 2048);
  EXPECT_GT(seq["engine"]["populated_ahead"].get<uint64_t>(), 1900u);
  nlohmann::json off = run_json("--memory 8M --backend engine --fault-around off");
  ASSERT_TRUE(off.is_object());
  EXPECT_EQ(off["config"]["fault_around_policy"], "off");
  EXPECT_EQ(off["config"]["fault_around"], 0);
  EXPECT_EQ(off["engine"]["populated_ahead"], 0);
  nlohmann::json fixed = run_json("--memory 8M --backend engine --fault-around 16 --vcpus 1");
  ASSERT_TRUE(fixed.is_object());
  EXPECT_EQ(fixed["config"]["fault_around_policy"], "fixed");
  EXPECT_EQ(fixed["engine"]["populated_ahead"], 2048 - 2048 / 16);
  nlohmann::json model = run_json("--memory 4M --backing model");
  ASSERT_TRUE(model.is_object());
  EXPECT_TRUE(model["engine"]["populated_ahead"].is_null()) << "the host model has none";
  for (const nlohmann::json* j : {&seq, &off, &fixed, &model}) expect_balanced(*j);
  RunOutput text = run("--memory 4M --backend engine --no-progress");
  EXPECT_NE(text.out.find("engine host            fault-around sequential (up to 64 pages): "),
            std::string::npos)
      << text.out;
}

// Without /dev/kvm (hidden in a private mount namespace), --backend kvm is a usage error that
// says why, and the default backend falls back to engine and says why.
TEST_F(RunCli, NoDevKvm_BackendKvmIsAUsageErrorAndDefaultFallsBack) {
#ifdef GFNMAP_CLI_PATH
  const std::string hide = "unshare -m sh -c 'mount -t tmpfs none /dev 2>/dev/null || exit 99; ";
  auto in_ns = [&](const std::string& args, std::string* err) {
    const fs::path out = tmp_ / "ns_out";
    const fs::path errp = tmp_ / "ns_err";
    std::string cmd = hide + "exec " + GFNMAP_CLI_PATH + " run " + args + "' >" +
                      out.string() + " 2>" + errp.string();
    const int raw = std::system(cmd.c_str());
    *err = slurp(errp);
    return std::make_pair(WIFEXITED(raw) ? WEXITSTATUS(raw) : -1, slurp(out));
  };
  std::string err;
  auto [status, out] = in_ns("--memory 4M --backend kvm", &err);
  if (status == 99 || status == 127 || status == 1) {
    GTEST_SKIP() << "cannot hide /dev in a mount namespace here: " << err;
  }
  EXPECT_EQ(status, 2) << out << err;
  EXPECT_NE(err.find("--backend kvm: /dev/kvm unavailable"), std::string::npos) << err;
  auto [status2, out2] = in_ns("--memory 4M --json", &err);
  ASSERT_EQ(status2, 0) << err;
  auto j = nlohmann::json::parse(out2, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out2;
  EXPECT_EQ(j["config"]["backend"], "engine");
  EXPECT_NE(j["kvm_skipped"].get<std::string>().find("/dev/kvm unavailable"), std::string::npos);
#endif
}

// Issue 4's real backings other than anon, as a program.
TEST_F(RunCli, Thp_2MLeavesWhereTheKernelGivesHugePages) {
  nlohmann::json j = run_json("--memory 8M --backing thp --backend engine --vcpus 1");
  ASSERT_TRUE(j.is_object());
  expect_balanced(j);
  const auto& in = j["engine"]["installs"];
  EXPECT_EQ(in["4k"].get<uint64_t>() + 512 * in["2m"].get<uint64_t>(), 2048u) << in.dump();
  const std::string thp = slurp("/sys/kernel/mm/transparent_hugepage/enabled");
  if (thp.find("[never]") == std::string::npos) {
    EXPECT_GT(in["2m"].get<uint64_t>(), 0u) << "THP is " << thp;
  }
}

TEST_F(RunCli, Memfd_EveryPageFaultedOnce4K) {
  nlohmann::json j = run_json("--memory 8M --backing memfd --backend engine --write-percent 50");
  ASSERT_TRUE(j.is_object());
  expect_balanced(j);
  EXPECT_EQ(j["engine"]["faults"]["total"], 2048);
  EXPECT_EQ(j["engine"]["installs"]["4k"], 2048);
}

TEST_F(RunCli, File_GuestWritesLandInTheFile) {
  const fs::path file = tmp_ / "guest.img";
  nlohmann::json j =
      run_json("--memory 4M --backing file --backend engine --passes 2 --file " +
               file.string());
  ASSERT_TRUE(j.is_object());
  expect_balanced(j);
  ASSERT_EQ(fs::file_size(file), 4u << 20);
  // 100% writes, 2 passes: word 0 of page p holds the pass-2 value gpa | 2 (gpa = 4 GiB + p*4K).
  std::ifstream in(file, std::ios::binary);
  for (uint64_t p = 0; p < 1024; ++p) {
    uint64_t word = 0;
    in.seekg(static_cast<std::streamoff>(p * 4096));
    in.read(reinterpret_cast<char*>(&word), sizeof word);
    ASSERT_EQ(word, ((uint64_t{1} << 32) + p * 4096) | 2) << "page " << p;
  }
}

TEST_F(RunCli, Uffd_LazyRestoreReadsTheSnapshot) {
  // A snapshot with a known word 0 per page; one vCPU reads every page once.
  const fs::path snap = tmp_ / "snap.bin";
  constexpr uint64_t kPages = 1024;
  uint64_t expect = 0;
  {
    std::ofstream out(snap, std::ios::binary);
    std::vector<uint64_t> page(512, 0);
    for (uint64_t p = 0; p < kPages; ++p) {
      page[0] = 0xabcd000000000000ull ^ (p * 0x9e3779b97f4a7c15ull);
      expect ^= page[0];
      out.write(reinterpret_cast<const char*>(page.data()), 4096);
    }
  }
  nlohmann::json j = run_json("--memory 4M --backing uffd --backend engine --vcpus 1 "
                              "--write-percent 0 --passes 1 --snapshot " + snap.string());
  ASSERT_TRUE(j.is_object());
  expect_balanced(j);
  EXPECT_EQ(j["config"]["snapshot"], snap.string());
  EXPECT_EQ(j["engine"]["checksums"][0], fmt_hex(expect));
  EXPECT_EQ(j["checksum"]["expected"][0], fmt_hex(expect));
  const auto& u = j["engine"]["uffd"];
  ASSERT_TRUE(u.is_object());
  EXPECT_GE(u["faults"].get<uint64_t>() + u["pages_copied"].get<uint64_t>(), kPages);
  EXPECT_EQ(u["faults"], u["faults_served"]);
  EXPECT_GE(u["pages_copied"].get<uint64_t>(), kPages);  // no page of it is all zero
}

TEST_F(RunCli, Uffd_GeneratedSnapshotWithWritesAndRandomOrder) {
  nlohmann::json j = run_json("--memory 8M --backing uffd --backend engine --pattern random "
                              "--write-percent 50 --passes 3");
  ASSERT_TRUE(j.is_object());
  expect_balanced(j);
  EXPECT_EQ(j["config"]["snapshot"], "generated");
  EXPECT_NE(j["checksum"]["expected"][0], "0x0");
}

TEST_F(RunCli, Overlap_ChecksumNotPredictableWithWrites) {
  nlohmann::json j = run_json("--memory 4M --backing model --overlap --write-percent 50");
  ASSERT_TRUE(j.is_object());
  EXPECT_FALSE(j["checksum"]["predictable"].get<bool>());
  EXPECT_TRUE(j["checksum"]["engine_match"].is_null());
  EXPECT_TRUE(j["ok"].get<bool>());
}

}  // namespace
}  // namespace gfnmap::test
