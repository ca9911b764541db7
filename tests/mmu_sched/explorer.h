// gfnmap interleaving checker: a deterministic scheduler that runs actors as real threads one at
// a time, switching only at the library's yield points, and enumerates schedules depth-first.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "sched/sched_hooks.h"

namespace gfnmap::test::sched {

// One step: an actor ran from one yield point (or its start) to the next (or its end, or a
// blocking hook whose wait is not over).
struct Step {
  int actor = 0;
  std::string from;
  std::string to;
  uint64_t a = 0, b = 0;  // the payload of `to` (GFNMAP_YIELD2)
  bool blocked = false;   // `to` is a GFNMAP_BLOCK_UNTIL whose ready() was false
  bool done = false;      // the actor returned
};

// What one schedule runs: built afresh for every schedule, so every run starts from the same
// state. run_actor runs on actor i's own thread; everything else on the scheduler's thread
// while every actor is parked.
class Scenario {
 public:
  virtual ~Scenario() = default;
  virtual std::vector<std::string> actor_names() const = 0;
  virtual void run_actor(int i) = 0;
  // After every step: online checks (add_violation) and bookkeeping.
  virtual void after_step(const Step& step, size_t index) = 0;
  // After every actor returned and its thread was joined: the end-of-schedule checks.
  virtual void finish() = 0;
  // The state after a step, one short line, for counterexamples.
  virtual std::string state_line() = 0;
  // Everything that decides what can still happen and what the end checks will say, beyond
  // the actors' yield points and payloads (which the explorer adds): shared state, the actors'
  // hidden progress, the checker's records. Two prefixes with equal keys have equal futures,
  // so the second is not explored further. Empty: no pruning.
  virtual std::string state_key() { return {}; }

  void add_violation(std::string what) {
    if (violations_.empty()) violations_.push_back(std::move(what));
  }
  const std::vector<std::string>& violations() const { return violations_; }

 private:
  std::vector<std::string> violations_;
};

struct ExploreOptions {
  uint64_t max_schedules = 1'000'000;  // stop (not exhausted) after this many
  size_t max_depth = 64;               // steps with a choice; beyond it the first actor runs
  bool stop_at_first_violation = true;
  bool prune_visited = true;  // stateful search: skip prefixes that reach a visited state
};

struct ExploreResult {
  uint64_t schedules = 0;
  uint64_t states = 0;       // distinct states at choice points (with pruning), or nodes of
                             // the schedule tree (distinct prefixes run) without it
  uint64_t pruned = 0;       // choice points that reached an already visited state
  uint64_t max_steps = 0;    // the longest schedule
  uint64_t depth_bounded = 0;  // schedules that hit max_depth
  bool exhausted = false;    // every schedule within the bounds was run
  double seconds = 0;
  std::string violation;                  // the first one found, empty if none
  std::vector<std::string> counterexample;  // its schedule, one line per step
};

using ScenarioFactory = std::function<std::unique_ptr<Scenario>()>;

ExploreResult explore(const ScenarioFactory& make, const ExploreOptions& options = {});

}  // namespace gfnmap::test::sched
