// gfnmap CLI input helpers: strict, line-numbered reading of scenario JSON and trace text.
// Every malformed input becomes a BadInput with its location; nothing here aborts.
#include "cli_input.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

namespace gfnmap::cli {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BadInput(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  std::ostringstream out;
  out << in.rdbuf();
  if (in.bad()) throw BadInput(fmt::format("{}: read error", path));
  return out.str();
}

std::pair<size_t, size_t> line_col(std::string_view text, size_t offset) {
  size_t line = 1;
  size_t col = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return {line, col};
}

nlohmann::json parse_json_text(std::string_view text, const std::string& file) {
  try {
    return nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the 1-based position of the offending character (0 when unknown).
    size_t offset = e.byte > 0 ? e.byte - 1 : 0;
    auto [line, col] = line_col(text, offset);
    std::string msg = e.what();
    // "[json.exception.parse_error.101] parse error at line 3, column 5: syntax error ..."
    if (auto pos = msg.find(": "); pos != std::string::npos && msg.starts_with("[json"))
      msg = msg.substr(pos + 2);
    throw BadInput(fmt::format("{}:{}:{}: bad JSON: {}", file, line, col, msg));
  } catch (const nlohmann::json::exception& e) {
    // Not a syntax error but still bad input, with no position: a number out of range
    // ("[json.exception.out_of_range.406] number overflow parsing '1E400'").
    std::string msg = e.what();
    if (auto pos = msg.find("] "); pos != std::string::npos && msg.starts_with("[json"))
      msg = msg.substr(pos + 2);
    throw BadInput(fmt::format("{}: bad JSON: {}", file, msg));
  }
}

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

}  // namespace

namespace {

// The number in `text`, or nullopt with the reason in *why.
std::optional<uint64_t> try_parse_u64(std::string_view text, std::string* why) {
  std::string_view s = trim(text);
  if (s.empty()) {
    *why = "empty";
    return std::nullopt;
  }
  unsigned shift = 0;
  switch (s.back()) {
    case 'K': case 'k': shift = 10; break;
    case 'M': case 'm': shift = 20; break;
    case 'G': case 'g': shift = 30; break;
    case 'T': case 't': shift = 40; break;
    default: break;
  }
  if (shift) s.remove_suffix(1);
  unsigned base = 10;
  if (s.size() >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    s.remove_prefix(2);
  }
  if (s.empty()) {
    *why = "no digits";
    return std::nullopt;
  }
  uint64_t v = 0;
  for (char c : s) {
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = static_cast<unsigned>(c - '0');
    } else if (base == 16 && c >= 'a' && c <= 'f') {
      d = static_cast<unsigned>(c - 'a' + 10);
    } else if (base == 16 && c >= 'A' && c <= 'F') {
      d = static_cast<unsigned>(c - 'A' + 10);
    } else {
      *why = fmt::format("unexpected character '{}' (use decimal, 0x-hex, or a K/M/G/T suffix)", c);
      return std::nullopt;
    }
    if (v > (std::numeric_limits<uint64_t>::max() - d) / base) {
      *why = "does not fit 64 bits";
      return std::nullopt;
    }
    v = v * base + d;
  }
  if (shift && v > (std::numeric_limits<uint64_t>::max() >> shift)) {
    *why = "does not fit 64 bits";
    return std::nullopt;
  }
  return v << shift;
}

// The number in a JSON value, or nullopt with the reason in *why.
std::optional<uint64_t> try_json_u64(const nlohmann::json& value, std::string* why) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    *why = fmt::format("bad number {}: must not be negative", value.dump());
  } else if (value.is_number_float()) {
    *why = fmt::format("bad number {}: must be an integer (large values: use a \"0x...\" string)",
                       value.dump());
  } else if (value.is_string()) {
    const auto& s = value.get_ref<const std::string&>();
    if (auto v = try_parse_u64(s, why)) return v;
    *why = fmt::format("bad number \"{}\": {}", s, *why);
  } else {
    *why = fmt::format("expected a number or a string like \"0x1000\" or \"2M\", got {}",
                       value.dump());
  }
  return std::nullopt;
}

}  // namespace

uint64_t parse_u64(std::string_view text, std::string_view what) {
  std::string why;
  if (auto v = try_parse_u64(text, &why)) return *v;
  throw BadInput(fmt::format("{}: bad number \"{}\": {}", what, text, why));
}

uint64_t json_u64(const nlohmann::json& value, std::string_view what) {
  std::string why;
  if (auto v = try_json_u64(value, &why)) return *v;
  throw BadInput(fmt::format("{}: {}", what, why));
}

std::string hex(uint64_t value) { return fmt::format("{:#x}", value); }

uint64_t parse_flag_names(std::string_view text, std::string_view what,
                          std::initializer_list<std::pair<std::string_view, uint64_t>> names,
                          std::string_view prefix) {
  uint64_t flags = 0;
  std::string_view rest = trim(text);
  if (rest.empty()) return 0;
  for (;;) {
    size_t bar = rest.find('|');
    std::string_view tok = trim(rest.substr(0, bar));
    if (tok.starts_with(prefix)) tok.remove_prefix(prefix.size());
    if (tok.empty()) throw BadInput(fmt::format("{}: empty flag name in \"{}\"", what, text));
    bool found = false;
    for (const auto& [name, bit] : names) {
      if (tok == name) {
        flags |= bit;
        found = true;
        break;
      }
    }
    if (!found) {
      if (tok[0] >= '0' && tok[0] <= '9') {
        flags |= parse_u64(tok, what);
      } else {
        std::string known;
        for (const auto& [name, bit] : names) known += (known.empty() ? "" : ", ") + std::string(name);
        throw BadInput(fmt::format("{}: unknown flag \"{}\" (known: {}, or a number)", what, tok,
                                   known));
      }
    }
    if (bar == std::string_view::npos) break;
    rest = rest.substr(bar + 1);
  }
  return flags;
}

// ---------------------------------------------------------------------------------------------

std::string JsonReader::location(std::string_view key) const {
  std::string loc = *file_;
  if (text_ && !key.empty()) {
    // Point at the key's line when it occurs exactly once in the file.
    std::string needle = fmt::format("\"{}\"", key);
    size_t first = text_->find(needle);
    if (first != std::string::npos && text_->find(needle, first + 1) == std::string::npos) {
      loc += fmt::format(":{}", line_col(*text_, first).first);
    }
  }
  return loc;
}

void JsonReader::fail(const std::string& message) const {
  // The last key of the path, for the line hint: "requests[2].expect" -> "expect".
  std::string_view key = path_;
  if (auto dot = key.rfind('.'); dot != std::string_view::npos) key = key.substr(dot + 1);
  if (auto br = key.find('['); br != std::string_view::npos) key = key.substr(0, br);
  throw BadInput(fmt::format("{}: {}: {}", location(key), path_.empty() ? "(top)" : path_,
                             message));
}

void JsonReader::fail_key(std::string_view key, const std::string& message) const {
  std::string p = path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  throw BadInput(fmt::format("{}: {}: {}", location(key), p, message));
}

void JsonReader::expect_object(std::initializer_list<std::string_view> known) const {
  if (!value_.is_object()) fail(fmt::format("expected an object, got {}", value_.type_name()));
  for (const auto& [key, v] : value_.items()) {
    bool ok = false;
    for (std::string_view k : known) ok = ok || k == key;
    if (!ok) {
      std::string list;
      for (std::string_view k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      fail_key(key, fmt::format("unknown field \"{}\" (known here: {})", key, list));
    }
  }
}

bool JsonReader::has(std::string_view key) const {
  return value_.is_object() && value_.contains(key);
}

JsonReader JsonReader::at(std::string_view key) const {
  if (!has(key)) fail(fmt::format("missing field \"{}\"", key));
  std::string p = path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  return JsonReader(value_.at(std::string(key)), std::move(p), file_, text_);
}

size_t JsonReader::array_size() const {
  if (!value_.is_array()) fail(fmt::format("expected an array, got {}", value_.type_name()));
  return value_.size();
}

JsonReader JsonReader::index(size_t i) const {
  if (!value_.is_array() || i >= value_.size()) fail("index out of range");
  return JsonReader(value_.at(i), fmt::format("{}[{}]", path_, i), file_, text_);
}

bool JsonReader::get_bool() const {
  if (!value_.is_boolean()) fail(fmt::format("expected true or false, got {}", value_.dump()));
  return value_.get<bool>();
}

int64_t JsonReader::get_int() const {
  if (!value_.is_number_integer()) fail(fmt::format("expected an integer, got {}", value_.dump()));
  return value_.get<int64_t>();
}

uint64_t JsonReader::get_u64() const {
  std::string why;
  if (auto v = try_json_u64(value_, &why)) return *v;
  fail(why);
}

std::string JsonReader::get_string() const {
  if (!value_.is_string()) fail(fmt::format("expected a string, got {}", value_.dump()));
  return value_.get<std::string>();
}

std::optional<bool> JsonReader::opt_bool(std::string_view key) const {
  if (!has(key)) return std::nullopt;
  return at(key).get_bool();
}

std::optional<uint64_t> JsonReader::opt_u64(std::string_view key) const {
  if (!has(key)) return std::nullopt;
  return at(key).get_u64();
}

std::optional<std::string> JsonReader::opt_string(std::string_view key) const {
  if (!has(key)) return std::nullopt;
  return at(key).get_string();
}

}  // namespace gfnmap::cli
