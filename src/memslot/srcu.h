// gfnmap memslots: a sleepable-RCU-like read section for the published slot sets.
// Readers never block: a section adds 1 to a lock count and 1 to an unlock count of the
// thread's own (no atomic read-modify-write, no fence when the kernel has membarrier);
// synchronize() waits out every section that began before it. The argument is in srcu.cc.
#pragma once

#include <atomic>
#include <climits>

// ThreadSanitizer does not model membarrier (and GCC's does not support standalone fences), so
// TSan builds always run the portable protocol, whose every step is an atomic it checks.
#if defined(__SANITIZE_THREAD__)
#define GFNMAP_SRCU_NO_MEMBARRIER 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define GFNMAP_SRCU_NO_MEMBARRIER 1
#endif
#endif

namespace gfnmap::detail {

// Per-thread counters in two epochs, like Linux SRCU's two indexes with per-thread instead of
// per-CPU lock and unlock counts. A thread's first section gives it one of kReaderSlots reader
// slots (process-wide, so the same slot in every Srcu; freed when the thread exits). A section
// adds 1 to its thread's lock count of the current epoch and, when it ends, 1 to the unlock
// count of that epoch of the thread it ends on. Only the owning thread writes a slot's counts,
// so each add is a plain load and store, and the counts only grow; the two are separate so that
// back-to-back sections do not chain through one memory location. Threads beyond kReaderSlots
// share atomic counts.
//
// Two protocols order a reader's lock count before its loads of the published sets:
// - membarrier (Linux 4.14+, probed once per process): the reader has only a compiler barrier;
//   synchronize() issues membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED), which makes every
//   running thread of the process execute a full memory barrier.
// - seq_cst (kernels without it, Mode::kSeqCst, TSan builds): the lock count is a seq_cst RMW.
// The publish that synchronize() follows must be a seq_cst store, and readers' loads of the
// published pointer seq_cst loads (plain moves on x86). synchronize() callers must be
// serialised (Memslots holds its slots lock).
class Srcu {
 public:
  enum class Mode {
    kAuto,    // membarrier when the kernel offers it (never under TSan), else seq_cst
    kSeqCst,  // always the seq_cst protocol (tests run both protocols on any host)
  };
  static constexpr unsigned kReaderSlots = 64;
  // Thread-local slot values other than 0 .. kReaderSlots - 1.
  static constexpr unsigned kUnassigned = UINT_MAX;  // before the thread's first section
  static constexpr unsigned kShared = UINT_MAX - 1;  // no slot: the shared counts

  explicit Srcu(Mode mode = Mode::kAuto);
  Srcu(const Srcu&) = delete;
  Srcu& operator=(const Srcu&) = delete;

  // srcu_read_lock: returns the token to pass to read_unlock (the epoch), on any thread.
  unsigned read_lock() noexcept;
  void read_unlock(unsigned token) noexcept;
  // synchronize_srcu: returns once every read section that began before the call has ended.
  void synchronize();

  bool uses_membarrier() const { return membarrier_; }
  // Whether this process can use the membarrier protocol (the probe's answer, cached).
  static bool membarrier_available();
  // The calling thread's reader slot: 0 .. kReaderSlots - 1, kUnassigned or kShared (tests).
  static unsigned this_thread_slot();

 private:
  // Counts of sections, per epoch. A slot's are written only by its owner thread; the shared
  // ones by any thread, with atomic RMWs.
  struct alignas(64) Counts {
    std::atomic<long> locks[2] = {0, 0};
    std::atomic<long> unlocks[2] = {0, 0};
  };

  unsigned read_lock_slow() noexcept;
  void read_unlock_slow(unsigned token) noexcept;
  static unsigned claim_thread_slot() noexcept;
  long active_readers(unsigned epoch) const noexcept;

  const bool membarrier_;
  std::atomic<unsigned> epoch_{0};
  Counts slots_[kReaderSlots];
  Counts shared_;
};

// This thread's reader slot, or kUnassigned, or kShared.
inline thread_local unsigned tls_srcu_slot = Srcu::kUnassigned;

inline unsigned Srcu::read_lock() noexcept {
  const unsigned slot = tls_srcu_slot;
  if (slot >= kReaderSlots) [[unlikely]] return read_lock_slow();
  const unsigned epoch = epoch_.load(std::memory_order_relaxed) & 1;
  std::atomic<long>& locks = slots_[slot].locks[epoch];
#ifndef GFNMAP_SRCU_NO_MEMBARRIER
  if (membarrier_) [[likely]] {
    // I of srcu.cc: a plain store (a release, which is a plain mov on x86); then a compiler
    // barrier, so that the set loads are emitted after it. The hardware barrier between them
    // is the one synchronize()'s membarrier runs on this thread when it needs one.
    locks.store(locks.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return epoch;
  }
#endif
  locks.fetch_add(1, std::memory_order_seq_cst);  // I of the seq_cst protocol
  return epoch;
}

inline void Srcu::read_unlock(unsigned token) noexcept {
  const unsigned slot = tls_srcu_slot;
  if (slot >= kReaderSlots) [[unlikely]] return read_unlock_slow(token);
  std::atomic<long>& unlocks = slots_[slot].unlocks[token & 1];
  // D of srcu.cc: release, so that every load of this section happens before a writer's load
  // that sees this count (hence before it frees the old set).
  unlocks.store(unlocks.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

}  // namespace gfnmap::detail
