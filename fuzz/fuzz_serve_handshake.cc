// gfnmap fuzz target: `gfnmap serve`'s handshake parser and region validation on any text,
// against a naive validator (pairwise overlap scan); accepted regions must survive a round trip.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "gfnmap/serve.h"

namespace {

[[noreturn]] void disagree(const std::string& what) {
  std::fprintf(stderr, "fuzz_serve_handshake: DISAGREEMENT: %s\n", what.c_str());
  std::abort();
}

// The first region with a problem decides: 0 all fine, else the errno its problems allow
// (ERANGE only for a region that reaches past the file, EINVAL only for the others; -1 either).
int naive_validate(const std::vector<gfnmap::uffd::ServeRegion>& regions, uint64_t file_size) {
  if (regions.empty()) return EINVAL;
  for (size_t i = 0; i < regions.size(); ++i) {
    const auto& r = regions[i];
    bool inval = false;
    const bool ps_ok = r.page_size == 4096 || r.page_size == (uint64_t{2} << 20);
    inval |= !ps_ok || r.size == 0;
    if (ps_ok) {
      inval |= (r.base_host_virt_addr | r.size | r.offset) % r.page_size != 0;
    }
    inval |= r.size > ~uint64_t{0} - r.base_host_virt_addr;  // the end wraps
    const bool range = r.size > file_size || r.offset > file_size - r.size;
    for (size_t j = 0; j < i && !inval; ++j) {
      const auto& o = regions[j];
      inval |= r.base_host_virt_addr < o.base_host_virt_addr + o.size &&
               o.base_host_virt_addr < r.base_host_virt_addr + r.size;
    }
    if (inval && range) return -1;
    if (inval) return EINVAL;
    if (range) return ERANGE;
  }
  return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gfnmap::uffd;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto parsed = parse_handshake(text);
  if (!parsed.ok()) {
    if (parsed.error().code != EINVAL) disagree("parse error with errno " +
                                                std::to_string(parsed.error().code));
    return 0;
  }
  const std::vector<ServeRegion>& regions = parsed.value();
  for (uint64_t file_size : {uint64_t{64} << 20, ~uint64_t{0}}) {
    auto v = validate_regions(regions, file_size);
    const int want = naive_validate(regions, file_size);
    const int got = v.ok() ? 0 : v.error().code;
    if (want == -1 ? got != EINVAL && got != ERANGE : got != want) {
      disagree("validate_regions errno " + std::to_string(got) + ", naive " +
               std::to_string(want) + " (" + std::to_string(regions.size()) + " regions)");
    }
  }
  // The parsed regions, written back in the current form, parse to the same regions.
  std::string again = "[";
  for (const ServeRegion& r : regions) {
    if (again.size() > 1) again += ",";
    again += "{\"base_host_virt_addr\":" + std::to_string(r.base_host_virt_addr) +
             ",\"size\":" + std::to_string(r.size) + ",\"offset\":" + std::to_string(r.offset) +
             ",\"page_size\":" + std::to_string(r.page_size) + "}";
  }
  again += "]";
  auto back = parse_handshake(again);
  if (!back.ok()) disagree("round trip refused: " + gfnmap::error_to_string(back.error()));
  if (back.value().size() != regions.size()) disagree("round trip changed the region count");
  for (size_t i = 0; i < regions.size(); ++i) {
    const ServeRegion& a = regions[i];
    const ServeRegion& b = back.value()[i];
    if (a.base_host_virt_addr != b.base_host_virt_addr || a.size != b.size ||
        a.offset != b.offset || a.page_size != b.page_size) {
      disagree("round trip changed region " + std::to_string(i));
    }
  }
  return 0;
}
