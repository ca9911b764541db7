// gfnmap CLI: the host facts as JSON and text. Field names are part of the JSON schemas of
// `info --json` and `run --json` (docs/run.md).
#include "host_facts_json.h"

#include <fmt/format.h>

#include <array>
#include <string_view>

namespace gfnmap::cli {

namespace {

// UFFD_FEATURE_* bit names, bit 0 upward (linux/userfaultfd.h up to Linux 6.8).
constexpr std::array<std::string_view, 17> kUffdFeatureNames = {
    "PAGEFAULT_FLAG_WP", "EVENT_FORK",      "EVENT_REMAP",       "EVENT_REMOVE",
    "MISSING_HUGETLBFS", "MISSING_SHMEM",   "EVENT_UNMAP",       "SIGBUS",
    "THREAD_ID",         "MINOR_HUGETLBFS", "MINOR_SHMEM",       "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON",            "WP_ASYNC",
    "MOVE"};

nlohmann::json uffd_feature_names(uint64_t features) {
  nlohmann::json names = nlohmann::json::array();
  for (size_t bit = 0; bit < 64; ++bit) {
    if (!(features >> bit & 1)) continue;
    names.push_back(bit < kUffdFeatureNames.size() ? std::string(kUffdFeatureNames[bit])
                                                   : fmt::format("bit{}", bit));
  }
  return names;
}

const char* yes_no(bool b) { return b ? "yes" : "no"; }

}  // namespace

nlohmann::json host_facts_json(const HostFacts& f) {
  nlohmann::json j;
  j["kernel"] = f.kernel_release;
  j["zero_page"] = f.zero_page;
  j["zero_page_emulated"] = f.zero_page_emulated;
  j["zero_page_how"] = f.zero_page_how;
  j["thp"] = {{"enabled", f.thp_enabled.empty() ? nlohmann::json(nullptr)
                                                : nlohmann::json(f.thp_enabled)},
              {"huge_zero_page", f.thp_huge_zero_page}};
  j["hugetlb"] = {{"2M", {{"total", f.hugetlb_2m_total}, {"free", f.hugetlb_2m_free}}},
                  {"1G", {{"total", f.hugetlb_1g_total}, {"free", f.hugetlb_1g_free}}}};
  j["userfaultfd"] = {{"syscall", f.uffd_syscall},
                      {"dev", f.uffd_dev},
                      {"features", fmt::format("{:#x}", f.uffd_features)},
                      {"feature_names", uffd_feature_names(f.uffd_features)},
                      {"why", f.uffd_available() ? nlohmann::json(nullptr)
                                                 : nlohmann::json(f.uffd_why)}};
  j["pagemap"] = {{"physical_pfns", f.pagemap_pfns}, {"pagemap_scan", f.pagemap_scan}};
  j["kvm"] = {{"available", f.kvm_available()},
              {"status", to_string(f.kvm)},
              {"why", f.kvm_available() ? nlohmann::json(nullptr) : nlohmann::json(f.kvm_why)}};
  return j;
}

std::string host_facts_text(const HostFacts& f, const std::string& in) {
  std::string s;
  s += fmt::format("{}kernel:       {}\n", in, f.kernel_release);
  s += fmt::format("{}zero page:    {}{} ({})\n", in, yes_no(f.zero_page),
                   f.zero_page_emulated ? ", emulated" : "", f.zero_page_how);
  s += fmt::format("{}THP:          {}, huge zero page {}\n", in,
                   f.thp_enabled.empty() ? "not built in" : f.thp_enabled,
                   yes_no(f.thp_huge_zero_page));
  s += fmt::format("{}hugetlb:      2M {} ({} free), 1G {} ({} free)\n", in, f.hugetlb_2m_total,
                   f.hugetlb_2m_free, f.hugetlb_1g_total, f.hugetlb_1g_free);
  std::string names;
  for (const auto& n : uffd_feature_names(f.uffd_features)) {
    names += (names.empty() ? "" : " ") + n.get<std::string>();
  }
  if (f.uffd_available()) {
    s += fmt::format("{}userfaultfd:  syscall {}, /dev/userfaultfd {}; features {:#x}: {}\n", in,
                     yes_no(f.uffd_syscall), yes_no(f.uffd_dev), f.uffd_features, names);
  } else {
    s += fmt::format("{}userfaultfd:  no ({})\n", in, f.uffd_why);
  }
  s += fmt::format("{}pagemap:      {} pfns, PAGEMAP_SCAN {}\n", in,
                   f.pagemap_pfns ? "physical" : "virtual (no CAP_SYS_ADMIN)",
                   yes_no(f.pagemap_scan));
  s += fmt::format("{}/dev/kvm:     {}\n", in, f.kvm_available() ? "yes" : "no: " + f.kvm_why);
  return s;
}

}  // namespace gfnmap::cli
