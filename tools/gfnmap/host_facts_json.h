// gfnmap CLI: the host facts (gfnmap/host_facts.h) as JSON and as text, for `info` and `run`,
// so that every result says what it ran on.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "gfnmap/host_facts.h"

namespace gfnmap::cli {

// {"kernel", "zero_page", "zero_page_emulated", "zero_page_how", "thp": {...}, "hugetlb": {...},
//  "userfaultfd": {...}, "pagemap": {...}, "kvm": {...}} (docs/run.md, "host").
nlohmann::json host_facts_json(const HostFacts& facts);
// One "name: value" line per fact, each indented by `indent`.
std::string host_facts_text(const HostFacts& facts, const std::string& indent);

}  // namespace gfnmap::cli
