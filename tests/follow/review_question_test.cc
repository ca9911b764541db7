// The seed's review question (spec 2.4): v7's upgrade test `!writable && allow` equals
// `!(flags & FOLL_WRITE) && allow`; and Sean's objection: v7 reports a write fault unwritable.
#include <gtest/gtest.h>

#include "follow_fixture.h"
#include "gfnmap/follow.h"
#include "pre_series_ref.h"

namespace gfnmap::test {
namespace {

// The two spellings of the upgrade condition, as written in the review.
bool v7_upgrade_condition(bool foll_write, bool allow) {
  const bool writable = foll_write && allow;  // computed first in the v7 slow path
  return !writable && allow;
}
bool foll_write_upgrade_condition(bool foll_write, bool allow) { return !foll_write && allow; }

TEST(ReviewQuestion, UpgradeConditionsEqualExhaustively) {
  // !(w && a) && a == (!w || !a) && a == !w && a, over every input.
  for (bool foll_write : {false, true}) {
    for (bool allow : {false, true}) {
      EXPECT_EQ(v7_upgrade_condition(foll_write, allow),
                foll_write_upgrade_condition(foll_write, allow))
          << "FOLL_WRITE=" << foll_write << " allow=" << allow;
    }
  }
  // And the only case where the upgrade is attempted is a read fault that allows it.
  EXPECT_TRUE(v7_upgrade_condition(false, true));
  EXPECT_FALSE(v7_upgrade_condition(true, true));
  EXPECT_FALSE(v7_upgrade_condition(false, false));
  EXPECT_FALSE(v7_upgrade_condition(true, false));
}

// Through the resolver on real host states: v7 follow_pfn (which uses the `!writable` form)
// against the pre-series reference (which uses the `!write_fault && writable` form, i.e. the
// FOLL_WRITE form): same pfn, same host calls (so the same upgrade attempts), same writable on
// success, for every state, every caller flag set with FOLL_GET, and allow on and off.
TEST(ReviewQuestion, UpgradeConditionsEqualThroughTheResolver) {
  for (State state : all_states()) {
    for (FollFlags flags : {FollFlags{0}, kFollWrite, kFollNowait, kFollInterruptible,
                            kFollWrite | kFollNowait, kFollWrite | kFollInterruptible}) {
      for (bool allow : {false, true}) {
        SCOPED_TRACE(std::string(to_string(state)) + " " + foll_flags_to_string(flags) +
                     (allow ? " allow" : " !allow"));
        std::unique_ptr<Env> a = make_env(state);
        std::unique_ptr<Env> b = make_env(state);
        ASSERT_TRUE(a && b);
        FollowPfn foll;
        foll.slot = a->slot_ptr();
        foll.gfn = a->gfn;
        foll.flags = flags | kFollGet;
        foll.allow_write_mapping = allow;
        FollowTrace trace;
        Pfn got = follow_pfn(a->host, foll, &trace);

        bool async = false, writable = false;
        Hva hva;
        Pfn want = ref::gfn_to_pfn_memslot(b->host, b->slot_ptr(), b->gfn, false,
                                           flags & kFollInterruptible,
                                           (flags & kFollNowait) ? &async : nullptr,
                                           flags & kFollWrite, allow ? &writable : nullptr, &hva);
        if (async) want = kPfnErrNeedsIo;  // the reference's spelling of NEEDS_IO
        EXPECT_EQ(got, want) << pfn_to_string(got) << " vs " << pfn_to_string(want);
        const SimCounters ca = a->host.counters(), cb = b->host.counters();
        EXPECT_EQ(ca.fast_lookups, cb.fast_lookups);
        EXPECT_EQ(ca.fast_hits, cb.fast_hits);
        EXPECT_EQ(has_row(trace, 8), !(flags & kFollWrite) && allow && ca.fast_hits > 0 &&
                                         trace.path == FollowPath::kSlow);
        if (!is_error_noslot_pfn(got) && allow) {
          EXPECT_EQ(foll.writable, writable);
        }
        release_pfn_clean(a->host, got, foll.hva);
        ref::release_pfn_clean(b->host, want, hva);
        EXPECT_EQ(a->host.outstanding_refs(), 0u);
        EXPECT_EQ(b->host.outstanding_refs(), 0u);
        if (HasFailure()) return;
      }
    }
  }
}

// Sean's objection: FOLL_WRITE without allow_write_mapping succeeds (a host-writable mapping was
// obtained, CoW broken if needed) but v7 reports writable == false; the merged code reports
// true. Fast path, slow path and remapped path alike.
TEST(ReviewQuestion, SeansObjectionV7WriteWithoutAllowReportsUnwritable) {
  for (State state : {State::kPresentWritable, State::kNotPresentAnon, State::kCowShared,
                      State::kPfnmap}) {
    SCOPED_TRACE(to_string(state));
    {
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      FollowPfn foll;
      foll.slot = env->slot_ptr();
      foll.gfn = env->gfn;
      foll.flags = kFollGet | kFollWrite;
      foll.allow_write_mapping = false;
      FollowTrace trace;
      Pfn pfn = follow_pfn(env->host, foll, &trace);
      ASSERT_FALSE(is_error_noslot_pfn(pfn)) << trace_to_string(trace);
      EXPECT_FALSE(foll.writable) << "v7 reports the permission, not the mapping";
      if (trace.path != FollowPath::kRemapped) {
        EXPECT_TRUE(env->host.pte(env->hva).writable);  // yet the host mapping is writable
        EXPECT_EQ(env->host.pte(env->hva).pfn, pfn);
      }
      // A v7 caller trusting `writable` would release clean and lose the dirty bit.
      release_pfn_clean(env->host, pfn, foll.hva);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
    {
      std::unique_ptr<Env> env = make_env(state);
      ASSERT_TRUE(env);
      Faultin f = faultin(*env, kFollWrite);
      ASSERT_FALSE(is_error_noslot_pfn(f.pfn)) << trace_to_string(f.trace);
      EXPECT_TRUE(f.writable) << "[merged] set exactly when a writable mapping was obtained";
      release_installed(f);
      EXPECT_EQ(env->host.outstanding_refs(), 0u);
    }
  }
}

}  // namespace
}  // namespace gfnmap::test
