// gfnmap memslot tests: shared helpers (region builders, a recording listener, a naive oracle).
// Header-only; included by the memslot suites.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <string>
#include <vector>

#include "gfnmap/memslot.h"

namespace gfnmap::test {

inline constexpr uint64_t kHvaBase = 0x7f0000000000ULL;

inline UserspaceMemoryRegion region(uint32_t id, uint64_t gpa, uint64_t size,
                                    uint64_t hva = kHvaBase, uint32_t flags = 0,
                                    uint32_t as_id = 0) {
  UserspaceMemoryRegion r;
  r.slot = (as_id << 16) | id;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = size;
  r.userspace_addr = hva;
  return r;
}

// Expects an error with `code` whose message contains `what`.
#define EXPECT_MEMSLOT_ERROR(expr, want_code, what)                                         \
  do {                                                                                      \
    auto r_ = (expr);                                                                       \
    ASSERT_FALSE(r_.ok()) << "expected " << ::gfnmap::errno_name(want_code) << " ("        \
                          << (what) << ")";                                                 \
    EXPECT_EQ(r_.code(), (want_code)) << ::gfnmap::error_to_string(r_.error());            \
    EXPECT_NE(r_.error().message.find(what), std::string::npos)                            \
        << "message: " << r_.error().message << "\n wanted: " << (what);                   \
  } while (0)

#define ASSERT_MEMSLOT_OK(expr, change)                                                  \
  do {                                                                                   \
    auto r_ = (expr);                                                                    \
    ASSERT_TRUE(r_.ok()) << ::gfnmap::error_to_string(r_.error());                       \
    ASSERT_EQ(*r_, std::optional<::gfnmap::MemslotChange>(change));                      \
  } while (0)

// A snapshot of one address space's slots (by value), for before/after comparisons.
inline std::vector<Memslot> snapshot(const Memslots& slots, unsigned as_id = 0) {
  auto lock = slots.read_lock();
  auto s = lock.set(as_id).slots();
  return {s.begin(), s.end()};
}

}  // namespace gfnmap::test
