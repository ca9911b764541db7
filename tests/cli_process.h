// Shared fixture for suites that run the gfnmap CLI as a program: a per-test temp folder and
// run_cli(ARGS), which captures the exit status, stdout and stderr. Skips without the CLI.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace gfnmap::test {

namespace fs = std::filesystem;

struct CliResult {
  int status = -1;  // exit status, or -1 when killed by a signal
  std::string out;
  std::string err;
};

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One shell word, whatever s contains.
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The including target defines GFNMAP_CLI_PATH when the CLI is built (GFNMAP_BUILD_TOOLS).
class CliProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
#ifndef GFNMAP_CLI_PATH
    GTEST_SKIP() << "the gfnmap CLI is not built here (GFNMAP_BUILD_TOOLS=OFF)";
#else
    tmp_ = fs::temp_directory_path() /
           ("gfnmap_cli_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(tmp_);
#endif
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }

  // Runs `gfnmap ARGS` (ARGS are shell words) in `cwd`, or in the test's own directory, with
  // `env` (shell words like NAME=value) added to its environment.
  CliResult run_cli(const std::string& args, const std::string& cwd = "",
                    const std::string& env = "") {
    CliResult r;
#ifdef GFNMAP_CLI_PATH
    const fs::path out = tmp_ / "stdout";
    const fs::path err = tmp_ / "stderr";
    std::string cmd = cwd.empty() ? "" : "cd " + shell_quote(cwd) + " && ";
    if (!env.empty()) cmd += "env " + env + " ";
    cmd += shell_quote(GFNMAP_CLI_PATH) + " " + args + " >" + shell_quote(out.string()) + " 2>" +
           shell_quote(err.string());
    const int raw = std::system(cmd.c_str());
    r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
#else
    (void)args;
    (void)cwd;
    (void)env;
#endif
    return r;
  }

  fs::path tmp_;
};

}  // namespace gfnmap::test
