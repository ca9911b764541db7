// gfnmap CLI input helpers shared by `explain` and `replay`: reading files, JSON with line
// numbers, strict objects (unknown fields are errors), numbers with hex and K/M/G, flag names.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gfnmap::cli {

// Bad input (file, syntax, schema, number). The verbs print it and exit with status 2.
// what() is complete: "FILE:LINE: message" or "FILE: message".
class BadInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The whole file, or BadInput ("FILE: cannot open: No such file or directory").
std::string read_text_file(const std::string& path);

// 1-based line and column of byte `offset` in `text`.
std::pair<size_t, size_t> line_col(std::string_view text, size_t offset);

// Parses JSON (comments not allowed); syntax errors become BadInput "FILE:LINE:COL: ...".
nlohmann::json parse_json_text(std::string_view text, const std::string& file);

// An unsigned number: a JSON unsigned integer, or a string in decimal or 0x-hex with an
// optional binary suffix K, M, G or T ("2M" == 0x200000). Throws BadInput naming `what`.
uint64_t parse_u64(std::string_view text, std::string_view what);
uint64_t json_u64(const nlohmann::json& value, std::string_view what);

// "0x1f" for numbers in tables.
std::string hex(uint64_t value);

// Parses "A|B|0x4" against a name table; names may carry `prefix` ("KVM_MEM_", "FOLL_").
// "0" and "" give 0. Unknown names throw BadInput listing the known ones.
uint64_t parse_flag_names(std::string_view text, std::string_view what,
                          std::initializer_list<std::pair<std::string_view, uint64_t>> names,
                          std::string_view prefix);

// Walks a JSON document with a path for error messages ("requests[2].expect.result") and
// rejects fields it was not asked about. The owning document's text is used to point at
// the line of an offending key when that key occurs once in the file.
class JsonReader {
 public:
  JsonReader(const nlohmann::json& value, std::string path, const std::string* file,
             const std::string* text)
      : value_(value), path_(std::move(path)), file_(file), text_(text) {}

  const nlohmann::json& value() const { return value_; }
  const std::string& path() const { return path_; }
  const std::string* file() const { return file_; }
  const std::string* text() const { return text_; }

  // Requires an object whose keys are all in `known`.
  void expect_object(std::initializer_list<std::string_view> known) const;
  bool has(std::string_view key) const;
  JsonReader at(std::string_view key) const;    // the field (must exist)
  JsonReader index(size_t i) const;             // an array element
  size_t array_size() const;                    // requires an array

  bool get_bool() const;
  int64_t get_int() const;
  uint64_t get_u64() const;
  std::string get_string() const;

  std::optional<bool> opt_bool(std::string_view key) const;
  std::optional<uint64_t> opt_u64(std::string_view key) const;
  std::optional<std::string> opt_string(std::string_view key) const;

  // BadInput "FILE:LINE: PATH: message" (LINE when the last key of PATH is found once).
  [[noreturn]] void fail(const std::string& message) const;
  [[noreturn]] void fail_key(std::string_view key, const std::string& message) const;

 private:
  std::string location(std::string_view key) const;

  const nlohmann::json& value_;
  std::string path_;
  const std::string* file_;
  const std::string* text_;
};

}  // namespace gfnmap::cli
