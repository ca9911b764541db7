// gfnmap benchmarks: the host's facts (gfnmap/host_facts.h) at the top of every benchmark
// program's output, as Google Benchmark custom context: the console prints them under the
// machine's context and --benchmark_format=json / --benchmark_out put them in "context".
// A number means little without the host it came from: the same operation differs by 2-5x
// between the project's two kinds of host (a shared zero page or none, /dev/kvm or none).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include <benchmark/benchmark.h>

#include "gfnmap/host_facts.h"

namespace gfnmap::bench {

inline const char* yes_no(bool b) { return b ? "yes" : "no"; }

// The kind of host, in the terms the project's benchmark notes use: A has /dev/kvm and the
// shared zero page; B has neither (a kernel that is itself a PVM guest, booted with
// pvm_no_zero_page=1); any other combination is "other".
inline std::string host_kind(const HostFacts& f) {
  const bool zero = f.zero_page && !f.zero_page_emulated;
  if (f.kvm_available() && zero) return "A (/dev/kvm, zero page)";
  if (!f.kvm_available() && !zero) return "B (no /dev/kvm, no zero page)";
  return std::string("other (/dev/kvm ") + yes_no(f.kvm_available()) + ", zero page " +
         yes_no(zero) + ")";
}

inline std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// One line: "kernel 6.18.0, zero page no, THP madvise (huge zero page yes), hugetlb 2M 0/0 1G
// 0/0, userfaultfd syscall yes dev yes, pagemap pfns yes, PAGEMAP_SCAN yes, /dev/kvm no".
inline std::string host_summary(const HostFacts& f) {
  std::string s = "kernel " + f.kernel_release;
  s += std::string(", zero page ") + yes_no(f.zero_page);
  if (f.zero_page_emulated) s += " (emulated)";
  s += ", THP " + (f.thp_enabled.empty() ? std::string("not built") : f.thp_enabled);
  s += std::string(" (huge zero page ") + yes_no(f.thp_huge_zero_page) + ")";
  s += ", hugetlb 2M " + std::to_string(f.hugetlb_2m_free) + "/" +
       std::to_string(f.hugetlb_2m_total) + " 1G " + std::to_string(f.hugetlb_1g_free) + "/" +
       std::to_string(f.hugetlb_1g_total) + " free/total";
  s += std::string(", userfaultfd syscall ") + yes_no(f.uffd_syscall) + " dev " +
       yes_no(f.uffd_dev);
  s += std::string(", pagemap pfns ") + yes_no(f.pagemap_pfns);
  s += std::string(", PAGEMAP_SCAN ") + yes_no(f.pagemap_scan);
  s += std::string(", /dev/kvm ") + (f.kvm_available() ? "yes" : "no");
  return s;
}

// Adds the facts to the benchmark context: "host" (the summary line), "host_kind", and one key
// per HostFacts field. Call after benchmark::Initialize and before RunSpecifiedBenchmarks.
inline void add_host_facts_context() {
  const HostFacts& f = host_facts();
  benchmark::AddCustomContext("host", host_summary(f));
  benchmark::AddCustomContext("host_kind", host_kind(f));
  benchmark::AddCustomContext("kernel_release", f.kernel_release);
  benchmark::AddCustomContext("zero_page", std::string(yes_no(f.zero_page)) +
                                               (f.zero_page_emulated ? " (emulated)" : ""));
  benchmark::AddCustomContext("zero_page_how", f.zero_page_how);
  benchmark::AddCustomContext("thp_enabled", f.thp_enabled.empty() ? "-" : f.thp_enabled);
  benchmark::AddCustomContext("thp_huge_zero_page", yes_no(f.thp_huge_zero_page));
  benchmark::AddCustomContext("hugetlb_2m", std::to_string(f.hugetlb_2m_free) + " free of " +
                                                std::to_string(f.hugetlb_2m_total));
  benchmark::AddCustomContext("hugetlb_1g", std::to_string(f.hugetlb_1g_free) + " free of " +
                                                std::to_string(f.hugetlb_1g_total));
  benchmark::AddCustomContext("uffd_syscall", yes_no(f.uffd_syscall));
  benchmark::AddCustomContext("uffd_dev", yes_no(f.uffd_dev));
  benchmark::AddCustomContext("uffd_features", hex(f.uffd_features));
  if (!f.uffd_why.empty()) benchmark::AddCustomContext("uffd_why", f.uffd_why);
  benchmark::AddCustomContext("pagemap_pfns", yes_no(f.pagemap_pfns));
  benchmark::AddCustomContext("pagemap_scan", yes_no(f.pagemap_scan));
  benchmark::AddCustomContext("kvm", std::string(to_string(f.kvm)));
  if (!f.kvm_why.empty()) benchmark::AddCustomContext("kvm_why", f.kvm_why);
}

// The main of every Google Benchmark program here: the host facts as context, the run, then
// `summary` (same-run ratios) when given. Exit 1 on an unrecognized argument.
inline int run_benchmarks(int argc, char** argv, void (*summary)() = nullptr) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_host_facts_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (summary != nullptr) summary();
  return 0;
}

}  // namespace gfnmap::bench
