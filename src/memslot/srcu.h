// gfnmap memslots: a sleepable-RCU-like read section for the published slot sets.
// Readers do two atomic RMWs and never block; synchronize() waits out every earlier reader.
#pragma once

#include <atomic>

namespace gfnmap::detail {

// Two counters per stripe (one per epoch); a reader increments and later decrements the same
// counter, chosen by the current epoch and by its thread's stripe. Correctness argument:
// see srcu.cc. synchronize() callers must be serialised (Memslots holds its slots lock).
class Srcu {
 public:
  static constexpr unsigned kStripes = 8;

  // srcu_read_lock: returns the token to pass to read_unlock (stripe * 2 + epoch).
  unsigned read_lock() noexcept;
  void read_unlock(unsigned token) noexcept;
  // synchronize_srcu: returns once every read section that began before the call has ended.
  void synchronize();

 private:
  struct alignas(64) Stripe {
    std::atomic<long> count[2] = {0, 0};
  };
  std::atomic<unsigned> epoch_{0};
  Stripe stripes_[kStripes];
};

}  // namespace gfnmap::detail
