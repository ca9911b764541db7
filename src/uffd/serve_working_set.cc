// gfnmap serve: the working-set file (version 1): the pages a restore touched first, in order,
// recorded by one restore and prefetched by the next.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "gfnmap/serve.h"

namespace gfnmap::uffd {

namespace {
constexpr const char* kMagic = "gfnmap-working-set";

bool parse_u64(const std::string& s, size_t& pos, uint64_t& out) {
  while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t')) ++pos;
  const size_t start = pos;
  uint64_t v = 0;
  while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
    const uint64_t d = static_cast<uint64_t>(s[pos] - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
    ++pos;
  }
  out = v;
  return pos > start;
}
}  // namespace

Result<std::vector<WorkingSetEntry>> read_working_set(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    int e = errno ? errno : ENOENT;
    return make_error(e, "working set ", path, ": ", std::strerror(e));
  }
  std::string line;
  if (!std::getline(in, line)) {
    return make_error(EINVAL, "working set ", path, ": empty file (expected \"", kMagic, " 1\")");
  }
  if (line.rfind(kMagic, 0) != 0) {
    return make_error(EINVAL, "working set ", path, ": line 1: not a gfnmap working-set file "
                      "(expected \"", kMagic, " 1\")");
  }
  size_t pos = std::strlen(kMagic);
  uint64_t version = 0;
  if (!parse_u64(line, pos, version) || version != 1) {
    return make_error(EINVAL, "working set ", path, ": line 1: unsupported version (this gfnmap "
                      "reads version 1)");
  }
  std::vector<WorkingSetEntry> out;
  size_t lineno = 1;
  while (std::getline(in, line)) {
    ++lineno;
    size_t p = 0;
    while (p < line.size() && (line[p] == ' ' || line[p] == '\t')) ++p;
    if (p == line.size() || line[p] == '#') continue;
    WorkingSetEntry e;
    if (!parse_u64(line, p, e.offset) || !parse_u64(line, p, e.time_ns)) {
      return make_error(EINVAL, "working set ", path, ": line ", lineno,
                        ": expected \"OFFSET TIME_NS\" (two unsigned integers)");
    }
    while (p < line.size() && (line[p] == ' ' || line[p] == '\t' || line[p] == '\r')) ++p;
    if (p != line.size()) {
      return make_error(EINVAL, "working set ", path, ": line ", lineno, ": trailing text");
    }
    if (e.offset & 4095) {
      return make_error(EINVAL, "working set ", path, ": line ", lineno, ": offset ", e.offset,
                        " is not 4K-aligned");
    }
    out.push_back(e);
  }
  return out;
}

Result<void> write_working_set(const std::string& path, const std::vector<WorkingSetEntry>& set) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) {
    int e = errno;
    return make_error(e, "working set ", tmp, ": ", std::strerror(e));
  }
  std::fprintf(f, "%s 1\n# offset_bytes time_ns: memory-file offsets of pages in first-touch "
               "order, ns after the handshake\n", kMagic);
  for (const WorkingSetEntry& e : set) {
    std::fprintf(f, "%llu %llu\n", static_cast<unsigned long long>(e.offset),
                 static_cast<unsigned long long>(e.time_ns));
  }
  const bool ok = std::fflush(f) == 0 && !std::ferror(f);
  const int e = errno;
  std::fclose(f);
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return make_error(ok ? errno : e, "working set ", path, ": write failed");
  }
  return {};
}

}  // namespace gfnmap::uffd
