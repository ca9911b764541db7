// gfnmap interleaving checker: the baton scheduler (one actor thread runs at a time, switching
// at GFNMAP_YIELD / GFNMAP_BLOCK_UNTIL) and the depth-first enumeration of schedules.
#include "mmu_sched/explorer.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <semaphore>
#include <thread>

namespace gfnmap::test::sched {
namespace {

constexpr int kScheduler = -1;

// One schedule. Invariant: exactly one thread (an actor, or the test's thread before the first
// step and after the last) holds the baton and runs. The holder decides who runs next: itself
// (no switch at all) or another actor, whose semaphore it releases before waiting on its own
// (a release/acquire pair, so what one wrote happens before what the next reads). The checks
// after each step run on the thread that holds the baton, while every other actor is parked.
class Baton final : public gfnmap::sched::Hooks {
 public:
  explicit Baton(Scenario& sc) : sc_(sc), names_(sc.actor_names()), actors_(names_.size()) {
    for (size_t i = 0; i < actors_.size(); ++i) {
      sems_.push_back(std::make_unique<std::binary_semaphore>(0));
    }
  }

  // Runs the schedule that follows `prefix` (indices into the runnable actors at each choice
  // point), then always the first runnable actor. Returns every choice made as (index, number
  // of runnable actors); fills `steps`. With `visited`, a choice point whose state is in it
  // ends the branching (its future was explored from the first prefix that reached it).
  std::vector<std::pair<int, int>> run(const std::vector<int>& prefix, size_t max_depth,
                                       std::vector<Step>* steps, bool* bounded,
                                       std::unordered_set<std::string>* visited,
                                       uint64_t* pruned) {
    prefix_ = &prefix;
    max_depth_ = max_depth;
    steps_ = steps;
    visited_ = visited;
    pruned_ = pruned;
    std::vector<std::thread> threads;
    for (size_t i = 0; i < actors_.size(); ++i) {
      threads.emplace_back([this, i] { actor_main(static_cast<int>(i)); });
    }
    const int first = decide();
    if (first >= 0) {
      sems_[static_cast<size_t>(first)]->release();
      main_sem_.acquire();
    }
    for (auto& t : threads) t.join();
    *bounded = bounded_;
    return choices_;
  }

  void yield(const char* point, uint64_t a, uint64_t b) override {
    const int self = t_self;
    A& me = actors_[static_cast<size_t>(self)];
    me.at = point;
    me.a = a;
    me.b = b;
    switch_from(self);
  }

  // Parks while ready() is false; the scheduler resumes it only once ready() holds, and nothing
  // runs in between, so the real wait after this hook does not block.
  void block_until(const char* point, FunctionRef<bool()> ready) override {
    if (ready()) return;
    const int self = t_self;
    A& me = actors_[static_cast<size_t>(self)];
    while (!ready()) {
      me.at = point;
      me.a = me.b = 0;
      me.ready = &ready;
      switch_from(self);
      me.ready = nullptr;
    }
  }

 private:
  struct A {
    std::string at = "start";
    uint64_t a = 0, b = 0;
    bool done = false;
    const FunctionRef<bool()>* ready = nullptr;  // set while blocked
  };

  // Ends the running step (its checks), then picks the next actor: -1 when all are done.
  int decide() {
    if (cur_ >= 0) {
      const A& a = actors_[static_cast<size_t>(cur_)];
      Step s;
      s.actor = cur_;
      s.from = cur_from_;
      s.to = a.at;
      s.a = a.a;
      s.b = a.b;
      s.blocked = a.ready != nullptr;
      s.done = a.done;
      steps_->push_back(s);
      sc_.after_step(s, steps_->size() - 1);
    }
    std::vector<int> runnable;
    bool all_done = true;
    for (size_t i = 0; i < actors_.size(); ++i) {
      A& a = actors_[i];
      if (a.done) continue;
      all_done = false;
      if (a.ready == nullptr || (*a.ready)()) runnable.push_back(static_cast<int>(i));
    }
    if (all_done) return -1;
    if (runnable.empty()) deadlock();
    int pick = 0;
    if (runnable.size() > 1 && branching_) {
      if (choices_.size() < prefix_->size()) {
        pick = (*prefix_)[choices_.size()];
        if (pick >= static_cast<int>(runnable.size())) {
          std::fprintf(stderr, "mmu_sched: the schedule is not deterministic (choice %zu)\n",
                       choices_.size());
          std::abort();
        }
      } else if (visited_ != nullptr && !visited_->insert(key()).second) {
        ++*pruned_;
        branching_ = false;
      }
      if (branching_) {
        if (choices_.size() < max_depth_) {
          choices_.emplace_back(pick, static_cast<int>(runnable.size()));
        } else {
          bounded_ = true;
          branching_ = false;
        }
      }
    }
    cur_ = runnable[static_cast<size_t>(pick)];
    cur_from_ = actors_[static_cast<size_t>(cur_)].at;
    return cur_;
  }

  // The scheduler's work on an actor's thread runs without hooks (its checks take the MMU lock).
  int decide_here() {
    gfnmap::sched::t_hooks = nullptr;
    const int next = decide();
    gfnmap::sched::t_hooks = this;
    return next;
  }

  void switch_from(int self) {
    const int next = decide_here();
    if (next == self) return;
    sems_[static_cast<size_t>(next)]->release();
    sems_[static_cast<size_t>(self)]->acquire();
  }

  void actor_main(int i) {
    t_self = i;
    sems_[static_cast<size_t>(i)]->acquire();
    gfnmap::sched::t_hooks = this;
    sc_.run_actor(i);
    actors_[static_cast<size_t>(i)].at = "end";
    actors_[static_cast<size_t>(i)].done = true;
    const int next = decide_here();
    gfnmap::sched::t_hooks = nullptr;
    if (next >= 0) {
      sems_[static_cast<size_t>(next)]->release();
    } else {
      main_sem_.release();
    }
  }

  [[noreturn]] void deadlock() {
    std::fprintf(stderr, "mmu_sched: deadlock, every live actor is blocked:\n");
    for (size_t i = 0; i < actors_.size(); ++i) {
      std::fprintf(stderr, "  %s at %s%s\n", names_[i].c_str(), actors_[i].at.c_str(),
                   actors_[i].done ? " (done)" : "");
    }
    std::fprintf(stderr, "after %zu steps\n", steps_->size());
    std::abort();
  }

  // The state at a choice point: every actor's position and payload, then the scenario's key.
  std::string key() {
    std::string k;
    for (const A& a : actors_) {
      k += a.at;
      k += a.done ? "!" : (a.ready ? "?" : ":");
      k += std::to_string(a.a) + "," + std::to_string(a.b) + ";";
    }
    return k + "|" + sc_.state_key();
  }

  static thread_local int t_self;

  Scenario& sc_;
  std::vector<std::string> names_;
  std::vector<A> actors_;
  std::vector<std::unique_ptr<std::binary_semaphore>> sems_;
  std::binary_semaphore main_sem_{0};
  // The schedule being run (set by run, used by whoever holds the baton).
  const std::vector<int>* prefix_ = nullptr;
  size_t max_depth_ = 0;
  std::vector<Step>* steps_ = nullptr;
  std::unordered_set<std::string>* visited_ = nullptr;
  uint64_t* pruned_ = nullptr;
  std::vector<std::pair<int, int>> choices_;
  bool bounded_ = false;
  bool branching_ = true;
  int cur_ = kScheduler;  // the actor of the running step
  std::string cur_from_;
};

thread_local int Baton::t_self = kScheduler;

std::string payload(const Step& s) {
  if (s.a == 0 && s.b == 0) return {};
  char buf[64];
  std::snprintf(buf, sizeof buf, " (0x%llx, 0x%llx)", static_cast<unsigned long long>(s.a),
                static_cast<unsigned long long>(s.b));
  return buf;
}

}  // namespace

ExploreResult explore(const ScenarioFactory& make, const ExploreOptions& options) {
  ExploreResult res;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int> prefix;
  std::unordered_set<std::string> visited;
  std::unordered_set<std::string>* seen = options.prune_visited ? &visited : nullptr;
  res.states = 1;  // the root
  for (;;) {
    std::unique_ptr<Scenario> sc = make();
    std::vector<Step> steps;
    bool bounded = false;
    std::vector<std::pair<int, int>> choices;
    std::vector<std::string> names = sc->actor_names();
    std::vector<std::string> lines;
    {
      Baton baton(*sc);
      choices = baton.run(prefix, options.max_depth, &steps, &bounded, seen, &res.pruned);
    }
    sc->finish();
    ++res.schedules;
    res.max_steps = std::max<uint64_t>(res.max_steps, steps.size());
    if (bounded) ++res.depth_bounded;
    // New tree nodes: the choices past the forced prefix, and the branch taken at its end.
    const size_t shared = prefix.empty() ? 0 : prefix.size() - 1;
    if (seen == nullptr) res.states += choices.size() - shared;
    if (!sc->violations().empty() && res.violation.empty()) {
      res.violation = sc->violations().front();
      // Re-run the same schedule to print the state after every step.
      std::vector<int> replay;
      for (auto [c, n] : choices) replay.push_back(c);
      std::unique_ptr<Scenario> again = make();
      struct Printer final : Scenario {
        Scenario& inner;
        std::vector<std::string>& out;
        std::vector<std::string> names;
        Printer(Scenario& s, std::vector<std::string>& o) : inner(s), out(o),
                                                            names(s.actor_names()) {}
        std::vector<std::string> actor_names() const override { return names; }
        void run_actor(int i) override { inner.run_actor(i); }
        void after_step(const Step& s, size_t index) override {
          inner.after_step(s, index);
          char head[64];
          std::snprintf(head, sizeof head, "%3zu. %-8s ", index + 1,
                        names[static_cast<size_t>(s.actor)].c_str());
          out.push_back(std::string(head) + s.from + " -> " + s.to + payload(s) +
                        (s.blocked ? " [blocked]" : "") + "   | " + inner.state_line());
        }
        void finish() override { inner.finish(); }
        std::string state_line() override { return inner.state_line(); }
      } printer(*again, res.counterexample);
      {
        Baton baton(printer);
        std::vector<Step> s2;
        bool b2 = false;
        baton.run(replay, options.max_depth, &s2, &b2, nullptr, nullptr);
      }
      printer.finish();
      if (options.stop_at_first_violation) break;
    }
    // Next prefix: the deepest choice with an untried alternative.
    size_t k = choices.size();
    while (k > 0 && choices[k - 1].first + 1 >= choices[k - 1].second) --k;
    if (k == 0) {
      res.exhausted = true;
      break;
    }
    if (res.schedules >= options.max_schedules) break;
    prefix.clear();
    for (size_t i = 0; i + 1 < k; ++i) prefix.push_back(choices[i].first);
    prefix.push_back(choices[k - 1].first + 1);
  }
  if (seen != nullptr) res.states = visited.size();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace gfnmap::test::sched
