// gfnmap scheduler hooks: named yield points, blocking hooks and seeded-bug switches for the
// deterministic interleaving checker (tests/mmu_sched). Empty unless GFNMAP_SCHED_YIELDS is set.
#pragma once

// Only the checker's own copy of the library (target gfnmap_sched, tests/mmu_sched) defines
// GFNMAP_SCHED_YIELDS; in every other build each macro below expands to nothing (or `false`)
// and its arguments are not evaluated.
//
// GFNMAP_YIELD(name) / GFNMAP_YIELD2(name, a, b): a point where the scheduler may switch to
//   another actor (a and b are reported with the step, e.g. the fault's sequence snapshot).
//   Never placed inside an MMU-lock section or a vCPU access window: everything between two
//   yield points of one actor runs while every other actor is parked.
// GFNMAP_BLOCK_UNTIL(name, ready): placed just before a real blocking wait (a mutex, a
//   condition variable, a grace-period spin). While ready() is false the actor parks and the
//   scheduler treats it as not runnable; once chosen again ready() holds, so the real wait
//   that follows returns at once. ready() is called on the scheduler's thread while every
//   actor is parked: it may read shared state only (no thread_local state).
// GFNMAP_SEEDED_BUG(kName): true while the checker has seeded that bug (tests only).

#ifdef GFNMAP_SCHED_YIELDS

#include <atomic>
#include <cstdint>

#include "gfnmap/types.h"

namespace gfnmap::sched {

enum class Bug : unsigned {
  kNone = 0,
  kNoRetryCheck = 1,    // page_fault installs without mmu_invalidate_retry_gfn
  kSwapBeforeZap = 2,   // DELETE/MOVE publish the final set first and zap afterwards
};

class Hooks {
 public:
  virtual void yield(const char* point, uint64_t a, uint64_t b) = 0;
  virtual void block_until(const char* point, FunctionRef<bool()> ready) = 0;

 protected:
  ~Hooks() = default;
};

// The scheduler sets it on each actor thread; other threads (the scheduler's own, helper
// threads) never yield.
inline thread_local Hooks* t_hooks = nullptr;
inline std::atomic<unsigned> g_seeded_bug{0};

inline bool seeded(Bug b) {
  return g_seeded_bug.load(std::memory_order_relaxed) == static_cast<unsigned>(b);
}

}  // namespace gfnmap::sched

#define GFNMAP_YIELD2(name, a, b)                                                         \
  do {                                                                                    \
    if (::gfnmap::sched::Hooks* gfnmap_h_ = ::gfnmap::sched::t_hooks) {                   \
      gfnmap_h_->yield(name, static_cast<uint64_t>(a), static_cast<uint64_t>(b));         \
    }                                                                                     \
  } while (0)
#define GFNMAP_YIELD(name) GFNMAP_YIELD2(name, 0, 0)
#define GFNMAP_BLOCK_UNTIL(name, ...)                                                     \
  do {                                                                                    \
    if (::gfnmap::sched::Hooks* gfnmap_h_ = ::gfnmap::sched::t_hooks) {                   \
      gfnmap_h_->block_until(name, __VA_ARGS__);                                          \
    }                                                                                     \
  } while (0)
#define GFNMAP_SEEDED_BUG(name) (::gfnmap::sched::seeded(::gfnmap::sched::Bug::name))

#else

#define GFNMAP_YIELD2(name, a, b) \
  do {                            \
  } while (0)
#define GFNMAP_YIELD(name) \
  do {                     \
  } while (0)
#define GFNMAP_BLOCK_UNTIL(name, ...) \
  do {                                \
  } while (0)
#define GFNMAP_SEEDED_BUG(name) false

#endif
