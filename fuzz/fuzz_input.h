// gfnmap fuzz targets: a reader that turns the fuzzer's bytes into bounded integers and choices;
// past the end of the input every read gives 0, so any prefix of an input is a valid input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace gfnmap::fuzz {

class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return pos_ >= size_; }
  size_t remaining() const { return empty() ? 0 : size_ - pos_; }

  uint8_t u8() { return empty() ? 0 : data_[pos_++]; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (uint16_t{u8()} << 8)); }
  uint32_t u32() { return u16() | (uint32_t{u16()} << 16); }
  uint64_t u64() { return u32() | (uint64_t{u32()} << 32); }
  bool flag() { return u8() & 1; }
  // A value in [0, n) (n > 0); one byte when n <= 256.
  uint32_t below(uint32_t n) { return n <= 256 ? u8() % n : u32() % n; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace gfnmap::fuzz
