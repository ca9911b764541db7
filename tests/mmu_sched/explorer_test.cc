// gfnmap interleaving checker: the explorer itself on toy actors, so a configuration that finds
// nothing is known to have been searched: every interleaving once, blocked actors respected.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "mmu_sched/explorer.h"

namespace gfnmap::test::sched {
namespace {

// Actor i appends its letter once per segment; segments are separated by yield points. With
// block_first, actor 1 first waits until actor 0 finished its first segment.
struct Toy final : Scenario {
  Toy(std::vector<int> y, bool block, std::set<std::string>* out)
      : yields(std::move(y)), block_first(block), outcomes(out) {}
  std::vector<std::string> actor_names() const override {
    std::vector<std::string> n;
    for (size_t i = 0; i < yields.size(); ++i) n.push_back(std::string(1, char('a' + i)));
    return n;
  }
  void run_actor(int i) override {
    if (block_first && i == 1) GFNMAP_BLOCK_UNTIL("toy.wait", [this] { return a_started; });
    for (int k = 0; k <= yields[static_cast<size_t>(i)]; ++k) {
      trace += static_cast<char>('a' + i);
      if (i == 0) a_started = true;
      if (k < yields[static_cast<size_t>(i)]) GFNMAP_YIELD("toy.yield");
    }
  }
  void after_step(const Step&, size_t) override {}
  void finish() override {
    // Without blocking every schedule gives its own trace; with it, b parking first and then
    // running after a gives a trace another schedule gives too.
    if (!outcomes->insert(trace).second && !block_first) {
      add_violation("schedule run twice: " + trace);
    }
  }
  std::string state_line() override { return trace; }
  std::string state_key() override { return trace; }

  std::vector<int> yields;
  bool block_first;
  std::set<std::string>* outcomes;
  std::string trace;
  bool a_started = false;
};

TEST(Explorer, RunsEveryInterleavingOfIndependentActorsOnce) {
  std::set<std::string> outcomes;
  ExploreOptions o;
  o.prune_visited = false;
  ExploreResult r = explore(
      [&] { return std::make_unique<Toy>(std::vector<int>{2, 3}, false, &outcomes); }, o);
  EXPECT_TRUE(r.violation.empty()) << r.violation;
  EXPECT_TRUE(r.exhausted);
  EXPECT_EQ(r.schedules, 35u);  // C(3 + 4, 3): 3 segments of a among 7
  EXPECT_EQ(outcomes.size(), 35u);
  // Three actors: 7! / (2! 2! 3!) = 210.
  outcomes.clear();
  r = explore([&] { return std::make_unique<Toy>(std::vector<int>{1, 1, 2}, false, &outcomes); },
              o);
  EXPECT_TRUE(r.exhausted);
  EXPECT_EQ(r.schedules, 210u);
  EXPECT_EQ(outcomes.size(), 210u);
}

TEST(Explorer, PruningKeepsEveryDistinctState) {
  // The key is the whole trace, so no two prefixes share one: pruning must change nothing.
  std::set<std::string> outcomes;
  ExploreResult r = explore(
      [&] { return std::make_unique<Toy>(std::vector<int>{2, 3}, false, &outcomes); });
  EXPECT_TRUE(r.exhausted);
  EXPECT_EQ(outcomes.size(), 35u);
  EXPECT_EQ(r.pruned, 0u);
}

TEST(Explorer, ABlockedActorRunsOnlyOnceItsWaitIsOver) {
  std::set<std::string> outcomes;
  ExploreOptions o;
  o.prune_visited = false;
  ExploreResult r = explore(
      [&] { return std::make_unique<Toy>(std::vector<int>{1, 1}, true, &outcomes); }, o);
  EXPECT_TRUE(r.violation.empty()) << r.violation;
  EXPECT_TRUE(r.exhausted);
  EXPECT_EQ(outcomes, (std::set<std::string>{"aabb", "abab", "abba"}));
}

}  // namespace
}  // namespace gfnmap::test::sched
