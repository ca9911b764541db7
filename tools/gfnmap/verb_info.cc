// gfnmap CLI verb `info`: the build, and the facts of this host that gfnmap's behaviour and
// tests depend on (the zero page, THP, hugetlb, userfaultfd, pagemap, /dev/kvm).
#include <cstdio>

#include "gfnmap/version.h"
#include "gfnmap/host_facts.h"
#include "host_facts_json.h"
#include "verb.h"

namespace {

constexpr const char* kInfoHelp = R"(Prints the hosts gfnmap can use here and the probed facts of this kernel
that its behaviour depends on (docs/spec.md section 12):
  zero page    a read fault of untouched private anonymous memory maps the shared zero
               page (decision-table row 9) or a fresh writable page (row 8)
  THP          the transparent-huge-page mode and whether the huge zero page is used
  hugetlb      the 2M and 1G pools (hugetlb backings need free pages)
  userfaultfd  the syscall, /dev/userfaultfd and the features (lazy restore)
  pagemap      whether pfns are physical frames (needs CAP_SYS_ADMIN) and PAGEMAP_SCAN
  /dev/kvm     whether a real guest can run, and if not, why
GFNMAP_HOST_ZERO_PAGE=1 makes gfnmap emulate the zero page on a kernel without it.
--json prints the same as one JSON object ("host" as in `run --json`).)";

GFNMAP_VERB("info", "print the build and the probed facts of this host",
            [](CLI::App& cmd) -> std::function<int()> {
              cmd.footer(kInfoHelp);
              static bool json = false;
              cmd.add_flag("--json", json, "print one JSON object");
              return [] {
                const gfnmap::HostFacts& facts = gfnmap::host_facts();
                if (json) {
                  nlohmann::json j;
                  j["version"] = GFNMAP_VERSION_STRING;
                  j["hosts"] = {{"model", true},
                                {"real_memory", true},
                                {"kvm", facts.kvm_available()},
                                {"userfaultfd", facts.uffd_available()}};
                  j["host"] = gfnmap::cli::host_facts_json(facts);
                  std::printf("%s\n", j.dump(2).c_str());
                  return 0;
                }
                std::printf("gfnmap %s\n", GFNMAP_VERSION_STRING);
                std::printf("hosts:        model yes, real memory yes, kvm %s\n",
                            facts.kvm_available() ? "yes" : "no");
                std::printf("%s", gfnmap::cli::host_facts_text(facts, "").c_str());
                return 0;
              };
            });

}  // namespace
