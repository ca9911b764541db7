// gfnmap dirty property tests: random mark / GET / CLEAR sequences against a naive
// std::vector<bool> oracle (errnos, reported bits, protected bits), and the range view.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <bit>
#include <cerrno>

#include "dirty/dirty_fixture.h"
#include "gfnmap/dirty.h"

namespace gfnmap {
namespace {

using testing_dirty::RecordingProtector;
using testing_dirty::set_slot;
using testing_dirty::slot_copy;

// The oracle's KVM_CLEAR_DIRTY_LOG argument checks (the slot exists and logs).
int oracle_clear_errno(uint64_t npages, uint64_t first, uint64_t num) {
  if (first % 64 != 0) return EINVAL;
  if (first > npages) return EINVAL;
  if (num > npages - first) return EINVAL;
  if (num < npages - first && num % 64 != 0) return EINVAL;
  return 0;
}

RC_GTEST_PROP(DirtyProperty, Invariant23_GetClearMatchNaiveOracle, ()) {
  const uint64_t npages = *rc::gen::inRange<uint64_t>(1, 700);
  const bool manual = *rc::gen::arbitrary<bool>();
  Memslots slots;
  DirtyLog log(slots);
  RecordingProtector wp;
  log.set_write_protector(&wp);
  RC_ASSERT(log.enable_manual_dirty_log_protect(manual ? kDirtyLogManualProtectEnable : 0).ok());
  RC_ASSERT(set_slot(slots, 3, 0x200000, npages, kMemLogDirtyPages).ok());
  const Memslot s = slot_copy(slots, 3);
  std::vector<bool> oracle(npages, false);
  const uint64_t words = dirty_bitmap_words(npages);

  const int steps = *rc::gen::inRange(1, 60);
  for (int step = 0; step < steps; ++step) {
    const int op = *rc::gen::inRange(0, 4);
    if (op <= 1) {  // mark a few pages (sometimes outside the slot)
      const int n = *rc::gen::inRange(1, 20);
      for (int i = 0; i < n; ++i) {
        const uint64_t rel = *rc::gen::inRange<uint64_t>(0, npages + 5);
        log.mark_page_dirty_in_slot(s, s.base_gfn + rel);
        if (rel < npages) oracle[rel] = true;
      }
    } else if (op == 2) {  // GET
      std::vector<uint64_t> out(words, 0xabababab);
      auto r = log.get_dirty_log(3, out);
      RC_ASSERT(r.ok());
      uint64_t expect_count = 0;
      std::vector<bool> protected_bits(npages, false);
      for (const auto& c : wp.take()) {
        for (int b = 0; b < 64; ++b) {
          if (c.mask >> b & 1) protected_bits[c.base - s.base_gfn.value + uint64_t(b)] = true;
        }
      }
      for (uint64_t p = 0; p < words * 64; ++p) {
        const bool got = (out[p / 64] >> (p % 64)) & 1;
        const bool want = p < npages && oracle[p];
        RC_ASSERT(got == want);
        if (p < npages) RC_ASSERT(protected_bits[p] == (!manual && want));
        expect_count += want;
      }
      RC_ASSERT(*r == expect_count);
      if (!manual) std::fill(oracle.begin(), oracle.end(), false);
    } else {  // CLEAR with a random (often invalid) range and a random mask
      const uint64_t first =
          *rc::gen::oneOf(rc::gen::just<uint64_t>(0),
                          rc::gen::map(rc::gen::inRange<uint64_t>(0, words + 1),
                                       [](uint64_t w) { return w * 64; }),
                          rc::gen::inRange<uint64_t>(0, npages + 70));
      const uint64_t left = first <= npages ? npages - first : 0;
      const uint32_t num = static_cast<uint32_t>(
          *rc::gen::oneOf(rc::gen::just(left),
                          rc::gen::map(rc::gen::inRange<uint64_t>(0, words + 2),
                                       [](uint64_t w) { return w * 64; }),
                          rc::gen::inRange<uint64_t>(0, npages + 70)));
      const uint64_t mwords = dirty_bitmap_words(num);
      std::vector<uint64_t> mask(mwords);
      for (auto& m : mask) {
        m = *rc::gen::oneOf(rc::gen::arbitrary<uint64_t>(), rc::gen::just(~uint64_t{0}),
                            rc::gen::just(uint64_t{0}));
      }
      auto r = log.clear_dirty_log(3, first, num, mask);
      const int want_errno = oracle_clear_errno(npages, first, num);
      RC_ASSERT(r.code() == want_errno);
      std::vector<bool> protected_bits(npages, false);
      for (const auto& c : wp.take()) {
        for (int b = 0; b < 64; ++b) {
          if (c.mask >> b & 1) protected_bits[c.base - s.base_gfn.value + uint64_t(b)] = true;
        }
      }
      if (want_errno != 0) {
        for (bool p : protected_bits) RC_ASSERT(!p);
        continue;
      }
      uint64_t expect = 0;
      for (uint64_t i = 0; i < mwords * 64; ++i) {
        const uint64_t p = first + i;
        if (p >= npages) break;
        const bool in_mask = (mask[i / 64] >> (i % 64)) & 1;
        const bool clear = in_mask && oracle[p];
        RC_ASSERT(protected_bits[p] == clear);
        if (clear) {
          oracle[p] = false;
          ++expect;
        }
      }
      RC_ASSERT(*r == expect);
    }
  }
}

RC_GTEST_PROP(DirtyProperty, RangesMatchNaiveRuns, ()) {
  const uint64_t npages = *rc::gen::inRange<uint64_t>(0, 400);
  std::vector<uint64_t> words = *rc::gen::container<std::vector<uint64_t>>(
      dirty_bitmap_words(npages) + *rc::gen::inRange<size_t>(0, 2),
      rc::gen::oneOf(rc::gen::arbitrary<uint64_t>(), rc::gen::just(~uint64_t{0}),
                     rc::gen::just(uint64_t{0})));
  const Gfn base(*rc::gen::inRange<uint64_t>(0, 1u << 20));
  std::vector<DirtyRange> want;
  for (uint64_t p = 0; p < npages && p < words.size() * 64; ++p) {
    if (!((words[p / 64] >> (p % 64)) & 1)) continue;
    if (!want.empty() && want.back().gpa.value + want.back().length == gfn_to_gpa(base + p).value) {
      want.back().length += kPageSize;
    } else {
      want.push_back({gfn_to_gpa(base + p), kPageSize});
    }
  }
  RC_ASSERT(dirty_bitmap_to_ranges(base, words, npages) == want);
}

}  // namespace
}  // namespace gfnmap
