// gfnmap `run --backend both|kvm` tests: the built-in guest in a real VM and gfnmap's MMU run the
// same accesses on the same layout and backing kind; both read what the prediction says.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cli_process.h"
#include "gfnmap/kvm.h"

namespace gfnmap::test {
namespace {

class RunKvmCli : public CliProcessTest {
 protected:
  void SetUp() override {
    CliProcessTest::SetUp();
    if (IsSkipped()) return;
    std::string why;
    if (!kvm::kvm_available(&why)) GTEST_SKIP() << why;
  }

  // `gfnmap run ARGS --json` with status 0 and both backends ok.
  nlohmann::json run_both(const std::string& args) {
    CliResult r = run_cli("run " + args + " --json");
    EXPECT_EQ(r.status, 0) << r.err << r.out;
    auto j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r.out;
    if (j.is_discarded()) return nlohmann::json();
    EXPECT_TRUE(j["ok"].get<bool>()) << r.out;
    EXPECT_TRUE(j["kvm"].is_object()) << r.out;
    return j;
  }
};

// Both backends did the same accesses: pages, dirty counts and read checksums agree.
void expect_same_workload(const nlohmann::json& j) {
  const auto& e = j["engine"];
  const auto& k = j["kvm"];
  ASSERT_TRUE(e.is_object());
  ASSERT_TRUE(k.is_object());
  EXPECT_TRUE(k["ok"].get<bool>()) << k["error"];
  EXPECT_EQ(e["outstanding_refs"], 0);
  EXPECT_EQ(k["pages_faulted"], j["pages"]);
  EXPECT_EQ(e["checksums"], k["checksums"]);
  EXPECT_EQ(j["checksum"]["engine_match"], true);
  EXPECT_EQ(j["checksum"]["kvm_match"], true);
  EXPECT_EQ(e["dirty"], k["dirty"]);
  const unsigned vcpus = j["config"]["vcpus"];
  const unsigned passes = j["config"]["passes"];
  EXPECT_EQ(k["exits"]["io"], vcpus * (passes + 1));  // a report per pass, then done
  EXPECT_GT(k["first_touch"]["ns_per_page"].get<double>(), 0);
}

TEST_F(RunKvmCli, DefaultBackendIsBothWithKvm) {
  nlohmann::json j = run_both("--memory 16M --write-percent 50 --pattern random --passes 3");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["config"]["backend"], "both");
  EXPECT_EQ(j["backends"], nlohmann::json::array({"engine", "kvm"}));
  EXPECT_TRUE(j["kvm_skipped"].is_null());
  expect_same_workload(j);
}

TEST_F(RunKvmCli, Invariant23_DirtyLogSameInBoth) {
  // 100% writes: each of the 2 harvests after pass 1 reports every page, in both.
  nlohmann::json j = run_both("--memory 8M --dirty-log --passes 3 --slots 2");
  ASSERT_TRUE(j.is_object());
  expect_same_workload(j);
  EXPECT_EQ(j["kvm"]["dirty"]["pages"], 2 * 2048);
  EXPECT_EQ(j["kvm"]["dirty"]["harvests"], 2);
}

TEST_F(RunKvmCli, Backings_MemfdThpFileRunInBoth) {
  for (const char* b : {"memfd", "thp", "file"}) {
    SCOPED_TRACE(b);
    nlohmann::json j = run_both(std::string("--memory 8M --write-percent 50 --backing ") + b);
    ASSERT_TRUE(j.is_object());
    expect_same_workload(j);
  }
}

TEST_F(RunKvmCli, File_UserFileWithDataEachBackendReadsItsOwnCopy) {
  // The engine writes to the user's file; the real guest must start from the file as it was.
  const fs::path file = tmp_ / "guest.img";
  {
    std::ofstream out(file, std::ios::binary);
    for (uint64_t i = 0; i < (4u << 20) / 8; ++i) {
      const uint64_t v = 0x1234567800000000ull | i;
      out.write(reinterpret_cast<const char*>(&v), sizeof v);
    }
  }
  nlohmann::json j = run_both("--memory 4M --backing file --write-percent 50 --pattern random "
                              "--file " + file.string());
  ASSERT_TRUE(j.is_object());
  expect_same_workload(j);
  EXPECT_NE(j["checksum"]["expected"][0], "0x0");
}

TEST_F(RunKvmCli, Uffd_LazyRestoreOfARealGuestReadsTheSnapshot) {
  nlohmann::json j = run_both("--memory 8M --backing uffd --write-percent 30 --passes 2");
  ASSERT_TRUE(j.is_object());
  expect_same_workload(j);
  EXPECT_NE(j["checksum"]["expected"][0], "0x0");
  // Each backend's page server placed every page once from the snapshot. The real guest's
  // pages came through missing faults of KVM's GUP; the engine's through LinuxHost's NOWAIT
  // kicks (request) or faults.
  for (const char* side : {"engine", "kvm"}) {
    const auto& u = j[side]["uffd"];
    ASSERT_TRUE(u.is_object()) << side;
    EXPECT_EQ(u["pages_copied"].get<uint64_t>() + u["pages_zeroed"].get<uint64_t>(), 2048u)
        << side;
    EXPECT_EQ(u["faults_served"], u["faults"]) << side;
  }
  EXPECT_EQ(j["kvm"]["uffd"]["faults"], 2048);
}

TEST_F(RunKvmCli, Text_SideBySide) {
  CliResult r = run_cli("run --memory 8M --dirty-log --no-progress");
  EXPECT_EQ(r.status, 0) << r.err << r.out;
  for (const char* s : {"engine (gfnmap MMU)", "kvm (real guest)", "first touch", "after",
                        "dirty pages harvested", "exits", "io 6", "kvm / engine"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
}

TEST_F(RunKvmCli, BackendKvmAlone) {
  CliResult r = run_cli("run --memory 8M --backend kvm --json");
  EXPECT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  EXPECT_TRUE(j["engine"].is_null());
  EXPECT_EQ(j["checksum"]["kvm_match"], true);
}

}  // namespace
}  // namespace gfnmap::test
