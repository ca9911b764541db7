// gfnmap serve: the handshake message (Firecracker's JSON array of guest-memory regions), its
// validation against the memory file, and session reports as text and JSON.
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <string>

#include "gfnmap/serve.h"

namespace gfnmap::uffd {

namespace {

// A strict reader of the subset of JSON a handshake uses: an array of objects whose values are
// unsigned integers (other value kinds are parsed and skipped so unknown fields do no harm).
class JsonReader {
 public:
  explicit JsonReader(std::string_view s) : s_(s) {}

  Result<std::vector<ServeRegion>> regions() {
    skip_ws();
    if (!eat('[')) return fail("expected '[' (a JSON array of regions)");
    std::vector<ServeRegion> out;
    skip_ws();
    if (eat(']')) return finish(std::move(out));
    for (;;) {
      auto r = region(out.size());
      if (!r.ok()) return r.error();
      out.push_back(*r);
      skip_ws();
      if (eat(',')) continue;
      if (eat(']')) break;
      return fail("expected ',' or ']' after region " + std::to_string(out.size() - 1));
    }
    return finish(std::move(out));
  }

 private:
  Result<std::vector<ServeRegion>> finish(std::vector<ServeRegion> out) {
    skip_ws();
    if (pos_ != s_.size()) return fail("trailing bytes after the array");
    return out;
  }

  Error fail(const std::string& what) const {
    return make_error(EINVAL, "handshake: malformed JSON at byte ", pos_, ": ", what);
  }

  Result<ServeRegion> region(size_t index) {
    skip_ws();
    const std::string where = "region " + std::to_string(index);
    if (!eat('{')) return fail("expected '{' to start " + where);
    bool have_base = false, have_size = false, have_offset = false;
    bool have_ps = false, have_ps_kib = false;
    uint64_t base = 0, size = 0, offset = 0, ps = 0, ps_kib = 0;
    skip_ws();
    if (!eat('}')) {
      for (;;) {
        skip_ws();
        auto key = string();
        if (!key.ok()) return key.error();
        skip_ws();
        if (!eat(':')) return fail("expected ':' after \"" + *key + "\" in " + where);
        skip_ws();
        uint64_t* target = nullptr;
        bool* seen = nullptr;
        if (*key == "base_host_virt_addr") target = &base, seen = &have_base;
        if (*key == "size") target = &size, seen = &have_size;
        if (*key == "offset") target = &offset, seen = &have_offset;
        if (*key == "page_size") target = &ps, seen = &have_ps;
        if (*key == "page_size_kib") target = &ps_kib, seen = &have_ps_kib;
        if (target) {
          if (pos_ < s_.size() && s_[pos_] == 'n' && s_.substr(pos_, 4) == "null" &&
              (*key == "page_size" || *key == "page_size_kib")) {
            pos_ += 4;  // an explicit null page size is the same as leaving it out
          } else {
            auto v = number(*key, where);
            if (!v.ok()) return v.error();
            *target = *v;
            *seen = true;
          }
        } else if (auto skipped = skip_value(); !skipped.ok()) {
          return skipped.error();
        }
        skip_ws();
        if (eat(',')) continue;
        if (eat('}')) break;
        return fail("expected ',' or '}' in " + where);
      }
    }
    const char* missing = !have_base ? "base_host_virt_addr"
                          : !have_size ? "size"
                          : !have_offset ? "offset"
                                          : nullptr;
    if (missing) {
      return make_error(EINVAL, "handshake: ", where, ": missing field \"", missing, "\"");
    }
    ServeRegion r;
    r.base_host_virt_addr = base;
    r.size = size;
    r.offset = offset;
    r.page_size = have_ps ? ps : have_ps_kib ? ps_kib : 4096;
    return r;
  }

  Result<uint64_t> number(const std::string& key, const std::string& where) {
    const size_t start = pos_;
    uint64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      const uint64_t d = static_cast<uint64_t>(s_[pos_] - '0');
      if (v > (UINT64_MAX - d) / 10) {
        return make_error(EINVAL, "handshake: ", where, ": field \"", key,
                          "\" does not fit in 64 bits");
      }
      v = v * 10 + d;
      ++pos_;
    }
    const bool fraction = pos_ < s_.size() && (s_[pos_] == '.' || s_[pos_] == 'e' ||
                                               s_[pos_] == 'E');
    if (pos_ == start || fraction) {
      return make_error(EINVAL, "handshake: ", where, ": field \"", key,
                        "\" is not an unsigned integer");
    }
    return v;
  }

  Result<std::string> string() {
    if (!eat('"')) return fail("expected a string");
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\') {
        if (++pos_ >= s_.size()) break;
      }
      out += s_[pos_++];
    }
    if (!eat('"')) return fail("unterminated string");
    return out;
  }

  Result<void> skip_value(int depth = 0) {
    if (depth > 32) return fail("nested too deeply");
    skip_ws();
    if (pos_ >= s_.size()) return fail("unexpected end");
    const char c = s_[pos_];
    if (c == '"') {
      auto s = string();
      if (!s.ok()) return s.error();
      return {};
    }
    if (c == '{' || c == '[') {
      const char close = c == '{' ? '}' : ']';
      ++pos_;
      skip_ws();
      if (eat(close)) return {};
      for (;;) {
        if (c == '{') {
          skip_ws();
          auto k = string();
          if (!k.ok()) return k.error();
          skip_ws();
          if (!eat(':')) return fail("expected ':'");
        }
        if (auto v = skip_value(depth + 1); !v.ok()) return v;
        skip_ws();
        if (eat(',')) continue;
        if (eat(close)) return {};
        return fail("expected ',' or a closing bracket");
      }
    }
    for (std::string_view word : {"true", "false", "null"}) {
      if (s_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return {};
      }
    }
    const size_t start = pos_;
    while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) ||
                                s_[pos_] == '-' || s_[pos_] == '+' || s_[pos_] == '.' ||
                                s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
    }
    if (pos_ == start) return fail("unexpected character");
    return {};
  }

  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) {
      ++pos_;
    }
  }
  bool eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  std::string_view s_;
  size_t pos_ = 0;
};

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<std::vector<ServeRegion>> parse_handshake(std::string_view json) {
  return JsonReader(json).regions();
}

Result<void> validate_regions(const std::vector<ServeRegion>& regions, uint64_t file_size) {
  if (regions.empty()) return make_error(EINVAL, "handshake: the region array is empty");
  for (size_t i = 0; i < regions.size(); ++i) {
    const ServeRegion& r = regions[i];
    const std::string where = "handshake: region " + std::to_string(i);
    if (r.page_size != 4096 && r.page_size != (2u << 20)) {
      return make_error(EINVAL, where, ": page_size ", r.page_size,
                        " is not 4096 (4K) or 2097152 (2M)");
    }
    if (r.size == 0) return make_error(EINVAL, where, ": size is 0 (an empty region)");
    const uint64_t mask = r.page_size - 1;
    if (r.base_host_virt_addr & mask) {
      return make_error(EINVAL, where, ": base_host_virt_addr ", hex(r.base_host_virt_addr),
                        " is not aligned to page_size ", r.page_size);
    }
    if (r.size & mask) {
      return make_error(EINVAL, where, ": size ", r.size, " is not a multiple of page_size ",
                        r.page_size);
    }
    if (r.offset & mask) {
      return make_error(EINVAL, where, ": offset ", r.offset, " is not aligned to page_size ",
                        r.page_size);
    }
    if (r.base_host_virt_addr + r.size < r.base_host_virt_addr) {
      return make_error(EINVAL, where, ": base_host_virt_addr + size overflows");
    }
    if (r.offset + r.size < r.offset || r.offset + r.size > file_size) {
      return make_error(ERANGE, where, ": offset ", r.offset, " + size ", r.size,
                        " reaches past the end of the memory file (", file_size, " bytes)");
    }
    for (size_t j = 0; j < i; ++j) {
      const ServeRegion& o = regions[j];
      if (r.base_host_virt_addr < o.base_host_virt_addr + o.size &&
          o.base_host_virt_addr < r.base_host_virt_addr + r.size) {
        return make_error(EINVAL, where, ": [", hex(r.base_host_virt_addr), ", +", r.size,
                          ") overlaps region ", j, " [", hex(o.base_host_virt_addr), ", +",
                          o.size, ")");
      }
    }
  }
  return {};
}

std::string to_string(const SessionReport& r) {
  char buf[1024];
  if (!r.accepted) {
    std::snprintf(buf, sizeof buf, "session %llu (pid %d): refused: %s",
                  static_cast<unsigned long long>(r.id), r.peer_pid, r.end_reason.c_str());
    return buf;
  }
  uint64_t bytes = 0;
  for (const ServeRegion& g : r.regions) bytes += g.size;
  auto us = [](uint64_t ns) { return static_cast<double>(ns) / 1e3; };
  std::snprintf(
      buf, sizeof buf,
      "session %llu (pid %d): %s%s; %zu regions, %llu MiB; handshake %.0f us, last fault at "
      "%.3f s; faults %llu served %llu (p50 %.1f us, p99 %.1f us, max %.1f us); pages copied "
      "%llu zeroed %llu prefetched %llu; removes %llu, EAGAIN deferrals %llu, EEXIST wakes %llu",
      static_cast<unsigned long long>(r.id), r.peer_pid, r.end_reason.c_str(),
      r.peer_killed ? " (peer killed)" : "", r.regions.size(),
      static_cast<unsigned long long>(bytes >> 20), us(r.handshake_ns),
      static_cast<double>(r.last_fault_ns) / 1e9, static_cast<unsigned long long>(r.faults),
      static_cast<unsigned long long>(r.faults_served), us(r.latency_p50_ns),
      us(r.latency_p99_ns), us(r.latency_max_ns), static_cast<unsigned long long>(r.pages_copied),
      static_cast<unsigned long long>(r.pages_zeroed),
      static_cast<unsigned long long>(r.pages_prefetched), static_cast<unsigned long long>(r.removes),
      static_cast<unsigned long long>(r.eagain_deferrals),
      static_cast<unsigned long long>(r.eexist_wakes));
  return buf;
}

std::string to_json(const SessionReport& r) {
  std::string reason;
  for (char c : r.end_reason) {
    if (c == '"' || c == '\\') {
      reason += '\\';
      reason += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      reason += ' ';
    } else {
      reason += c;
    }
  }
  std::string regions = "[";
  for (const ServeRegion& g : r.regions) {
    if (regions.size() > 1) regions += ",";
    regions += "{\"base_host_virt_addr\":" + std::to_string(g.base_host_virt_addr) +
               ",\"size\":" + std::to_string(g.size) + ",\"offset\":" + std::to_string(g.offset) +
               ",\"page_size\":" + std::to_string(g.page_size) + "}";
  }
  regions += "]";
  auto u = [](uint64_t v) { return std::to_string(v); };
  return "{\"session\":" + u(r.id) + ",\"peer_pid\":" + std::to_string(r.peer_pid) +
         ",\"accepted\":" + (r.accepted ? "true" : "false") +
         ",\"failed\":" + (r.failed ? "true" : "false") +
         ",\"peer_killed\":" + (r.peer_killed ? "true" : "false") + ",\"end_reason\":\"" + reason +
         "\",\"regions\":" + regions + ",\"handshake_ns\":" + u(r.handshake_ns) +
         ",\"last_fault_ns\":" + u(r.last_fault_ns) + ",\"duration_ns\":" + u(r.duration_ns) +
         ",\"faults\":" + u(r.faults) + ",\"faults_served\":" + u(r.faults_served) +
         ",\"latency_p50_ns\":" + u(r.latency_p50_ns) + ",\"latency_p99_ns\":" +
         u(r.latency_p99_ns) + ",\"latency_max_ns\":" + u(r.latency_max_ns) +
         ",\"pages_copied\":" + u(r.pages_copied) + ",\"pages_zeroed\":" + u(r.pages_zeroed) + ",\"pages_prefetched\":" + u(r.pages_prefetched) +
         ",\"faults_during_prefetch\":" + u(r.faults_during_prefetch) +
         ",\"prefetch_done_ns\":" + u(r.prefetch_done_ns) +
         ",\"removes\":" + u(r.removes) + ",\"unmaps\":" + u(r.unmaps) + ",\"remaps\":" +
         u(r.remaps) + ",\"eagain_deferrals\":" + u(r.eagain_deferrals) +
         ",\"eexist_wakes\":" + u(r.eexist_wakes) +
         ",\"max_copies_in_flight\":" + u(r.max_copies_in_flight) + "}";
}

}  // namespace gfnmap::uffd
