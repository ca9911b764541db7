// The seed's refactor, verified: the v7 legacy wrapper gfn_to_pfn_memslot equals the pre-series
// resolver (reference model) over every bool/pointer combination and every host state.
#include <gtest/gtest.h>

#include <sstream>

#include "follow_fixture.h"
#include "gfnmap/follow.h"
#include "pre_series_ref.h"

namespace gfnmap::test {
namespace {

struct Combo {
  bool atomic, interruptible, async, write_fault, writable;
};

std::string to_string(const Combo& c) {
  std::ostringstream out;
  out << "atomic=" << c.atomic << " interruptible=" << c.interruptible
      << " async=" << (c.async ? "ptr" : "null") << " write_fault=" << c.write_fault
      << " writable=" << (c.writable ? "ptr" : "null");
  return out.str();
}

// All 32 combinations but atomic with async, which is BUG_ON in the pre-series code and
// rejected (KVM_PFN_ERR_FAULT) by v7 (checked separately below).
std::vector<Combo> all_combos() {
  std::vector<Combo> v;
  for (int bits = 0; bits < 32; ++bits) {
    Combo c{bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8), bool(bits & 16)};
    if (c.atomic && c.async) continue;
    v.push_back(c);
  }
  return v;
}

// What one side produced.
struct Outcome {
  Pfn pfn;
  bool async = false;
  bool writable = true;  // preset: the pre-series code leaves it untouched on an atomic miss
  Hva hva{0xdead000};
};

std::vector<Pfn> interesting_pfns(SimHost& host, const Env& env, Pfn result) {
  std::vector<Pfn> pfns{host.zero_pfn()};
  if (!is_error_noslot_pfn(result)) pfns.push_back(result);
  PteInfo pte = host.pte(env.hva);
  if (pte.state == PteInfo::State::kPresent) pfns.push_back(pte.pfn);
  if (std::optional<VmaInfo> vma = host.vma_info(env.hva); vma && vma->kind == VmaKind::kPfnmap) {
    pfns.push_back(Pfn(vma->device_pfn.value + kPageIndex));
  }
  return pfns;
}

class LegacyMatchesPreSeries : public testing::TestWithParam<State> {};

TEST_P(LegacyMatchesPreSeries, AllCombinations) {
  const State state = GetParam();
  for (const Combo& c : all_combos()) {
    SCOPED_TRACE(std::string(test::to_string(state)) + ": " + to_string(c));
    std::unique_ptr<Env> a = make_env(state);  // the legacy wrapper (v7 over the core)
    std::unique_ptr<Env> b = make_env(state);  // the pre-series reference
    ASSERT_TRUE(a && b);

    Outcome got, want;
    got.pfn = gfn_to_pfn_memslot(a->host, a->slot_ptr(), a->gfn, c.atomic, c.interruptible,
                                 c.async ? &got.async : nullptr, c.write_fault,
                                 c.writable ? &got.writable : nullptr, &got.hva);
    ref::PreSeriesStats stats;
    want.pfn = ref::gfn_to_pfn_memslot(b->host, b->slot_ptr(), b->gfn, c.atomic,
                                       c.interruptible, c.async ? &want.async : nullptr,
                                       c.write_fault, c.writable ? &want.writable : nullptr,
                                       &want.hva, &stats);
    ASSERT_FALSE(stats.bug);

    EXPECT_EQ(got.pfn, want.pfn) << pfn_to_string(got.pfn) << " vs " << pfn_to_string(want.pfn);
    EXPECT_EQ(got.async, want.async);
    EXPECT_EQ(got.hva, want.hva);
    const bool error = is_error_noslot_pfn(want.pfn);
    if (c.writable) {
      if (!error) {
        EXPECT_EQ(got.writable, want.writable);
      } else {
        // The documented difference: the legacy wrapper reports false on every error; the
        // pre-series code left its slow-path preset (write_fault) or, on an atomic miss, the
        // caller's value.
        EXPECT_FALSE(got.writable);
        // Row 22 (refcount-0 PFNMAP page, writable PTE): the remapped path stored pte_write.
        std::optional<bool> row22;
        if (state == State::kPfnmapRefcountZero && want.pfn == kPfnErrFault) row22 = true;
        EXPECT_EQ(want.writable,
                  ref::pre_series_writable_on_error(b->slot_ptr(), c.atomic, c.write_fault,
                                                    /*before=*/true, row22));
      }
    }
    // Same calls into the host, same held references.
    EXPECT_EQ(a->host.outstanding_refs(), b->host.outstanding_refs());
    EXPECT_EQ(a->host.dump(), b->host.dump());

    // Release as a pre-series caller would: dirty if the mapping was writable.
    const bool dirty = c.writable && !error && got.writable;
    if (dirty) {
      release_pfn_dirty(a->host, got.pfn, got.hva);
      ref::release_pfn_dirty(b->host, want.pfn, want.hva);
    } else {
      release_pfn_clean(a->host, got.pfn, got.hva);
      ref::release_pfn_clean(b->host, want.pfn, want.hva);
    }
    EXPECT_EQ(a->host.outstanding_refs(), 0u);
    EXPECT_EQ(b->host.outstanding_refs(), 0u);
    EXPECT_EQ(a->host.violations(), 0u);
    EXPECT_EQ(b->host.violations(), 0u);
    EXPECT_EQ(frames_to_string(a->host, interesting_pfns(a->host, *a, got.pfn)),
              frames_to_string(b->host, interesting_pfns(b->host, *b, want.pfn)));
    EXPECT_EQ(a->host.dump(), b->host.dump());
    if (HasFailure()) return;  // one combination's story is enough
  }
}

INSTANTIATE_TEST_SUITE_P(EveryState, LegacyMatchesPreSeries, testing::ValuesIn(all_states()),
                         [](const testing::TestParamInfo<State>& param_info) {
                           return std::string(test::to_string(param_info.param));
                         });

// atomic with async: BUG_ON before the series; v7 rejects it with KVM_PFN_ERR_FAULT, takes no
// reference and never reaches the host.
TEST(LegacyAtomicAsync, RejectedWithoutTouchingTheHost) {
  std::unique_ptr<Env> env = make_env(State::kPresentWritable);
  ASSERT_TRUE(env);
  bool async = false, writable = true;
  Hva hva;
  Pfn pfn = gfn_to_pfn_memslot(env->host, env->slot_ptr(), env->gfn, true, false, &async, true,
                               &writable, &hva);
  EXPECT_EQ(pfn, kPfnErrFault);
  EXPECT_FALSE(async);
  EXPECT_FALSE(writable);
  EXPECT_EQ(env->host.counters().fast_lookups, 0u);
  EXPECT_EQ(env->host.counters().slow_gups, 0u);
  EXPECT_EQ(env->host.outstanding_refs(), 0u);

  ref::PreSeriesStats stats;
  std::unique_ptr<Env> b = make_env(State::kPresentWritable);
  ASSERT_TRUE(b);
  (void)ref::gfn_to_pfn_memslot(b->host, b->slot_ptr(), b->gfn, true, false, &async, true,
                                &writable, &hva, &stats);
  EXPECT_TRUE(stats.bug);
}

// A null hva pointer is allowed in both and changes nothing else.
TEST(LegacyNullHva, SameResult) {
  std::unique_ptr<Env> a = make_env(State::kPresentWritable);
  std::unique_ptr<Env> b = make_env(State::kPresentWritable);
  ASSERT_TRUE(a && b);
  bool wa = false, wb = false;
  Pfn pa = gfn_to_pfn_memslot(a->host, a->slot_ptr(), a->gfn, false, false, nullptr, false, &wa,
                              nullptr);
  Pfn pb = ref::gfn_to_pfn_memslot(b->host, b->slot_ptr(), b->gfn, false, false, nullptr, false,
                                   &wb, nullptr);
  EXPECT_EQ(pa, pb);
  EXPECT_EQ(wa, wb);
  release_pfn_clean(a->host, pa, a->hva);
  ref::release_pfn_clean(b->host, pb, b->hva);
  EXPECT_EQ(a->host.outstanding_refs(), 0u);
  EXPECT_EQ(b->host.outstanding_refs(), 0u);
}

}  // namespace
}  // namespace gfnmap::test
