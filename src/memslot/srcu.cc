// gfnmap memslots: the SRCU read side (striped two-epoch counters) and its grace-period wait.
// Correctness and progress are argued next to synchronize().
#include "srcu.h"

#include <chrono>
#include <thread>

namespace gfnmap::detail {
namespace {

// Threads spread over the stripes round-robin, so vCPU threads rarely share a counter line.
unsigned this_thread_stripe() noexcept {
  static std::atomic<unsigned> next{0};
  thread_local const unsigned stripe =
      next.fetch_add(1, std::memory_order_relaxed) % Srcu::kStripes;
  return stripe;
}

}  // namespace

unsigned Srcu::read_lock() noexcept {
  const unsigned stripe = this_thread_stripe();
  const unsigned epoch = epoch_.load(std::memory_order_seq_cst) & 1;
  // R2 below: seq_cst so that it precedes, in the single total order S, every later seq_cst
  // load this reader makes of a published set pointer (R3).
  stripes_[stripe].count[epoch].fetch_add(1, std::memory_order_seq_cst);
  return stripe * 2 + epoch;
}

void Srcu::read_unlock(unsigned token) noexcept {
  // Release (part of seq_cst): every read of the set by this reader happens-before the
  // writer's load that sees the counter drop, hence before the set is freed.
  stripes_[token / 2].count[token & 1].fetch_sub(1, std::memory_order_seq_cst);
}

// Why this is enough (all operations below and in read_lock/read_unlock are seq_cst, so there
// is one total order S consistent with program order):
//
// A writer publishes a new set pointer (W) and then calls synchronize(), which observes, for
// each stripe and for BOTH epochs, the counter equal to 0 at some point Z after W in S.
// A reader R does R2 (increment), R3 (load the set pointer), ..., R4 (decrement), all on one
// counter. If R3 returned the old pointer, R3 precedes W in S (a seq_cst load sees the last
// store before it in S), so R2 < R3 < W < Z. R's counter is then at least 1 at Z unless R4 < Z
// (every reader's increment precedes its decrement, so other readers cannot cancel R's). Hence
// a zero at Z proves R4 < Z: R has left before the old set is freed. Readers whose R2 follows
// W load the new pointer (or a newer one), which this grace period does not free.
//
// The epoch flips exist for progress only: after the flip to e^1, new readers count on e^1,
// so the wait on epoch e needs only the finitely many readers that read e before the flip;
// the second flip does the same for e^1. Without flips a steady stream of readers could keep a
// counter above zero for ever.
void Srcu::synchronize() {
  for (int phase = 0; phase < 2; ++phase) {
    const unsigned old_epoch = epoch_.load(std::memory_order_seq_cst) & 1;
    epoch_.store(old_epoch ^ 1, std::memory_order_seq_cst);
    for (Stripe& stripe : stripes_) {
      unsigned spins = 0;
      while (stripe.count[old_epoch].load(std::memory_order_seq_cst) != 0) {
        // Read sections are short: spin briefly, then yield, then sleep.
        if (++spins < 64) continue;
        if (spins < 256) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(20));
        }
      }
    }
  }
}

}  // namespace gfnmap::detail
