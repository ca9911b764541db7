// gfnmap host/sim, internal: the model's mmap lock, a reader-writer lock that knows which
// thread holds it, so holds nest (the v7 hwpoison probe GUPs under the lock) and misuse is seen.
#pragma once

#include <condition_variable>
#include <mutex>

namespace gfnmap::detail {

// One thread's holds of one MmapLock (kept in a thread_local list).
struct MmapLockHold {
  const void* lock = nullptr;
  int shared = 0;
  int exclusive = 0;
};

// Writer-preferring reader-writer lock with per-thread hold tracking. A thread that holds it
// (shared or exclusive) may take it shared again without blocking; an exclusive request from
// a thread that holds it shared is refused (it would deadlock).
class MmapLock {
 public:
  MmapLock() = default;
  MmapLock(const MmapLock&) = delete;
  MmapLock& operator=(const MmapLock&) = delete;

  void lock_shared();
  // false when this thread holds no shared hold (an unbalanced unlock).
  bool unlock_shared();
  // false (EDEADLK) when this thread holds it shared. Nests with itself.
  bool lock();
  void unlock();

  bool held_by_this_thread() const;
  bool held_shared_by_this_thread() const;
  bool held_exclusive_by_this_thread() const;

  // fixup_user_fault's lock drop: releases every shared hold of this thread and returns how
  // many there were (0: nothing dropped, e.g. the thread holds it exclusive or not at all).
  int drop_shared();
  // Retakes `depth` shared holds after drop_shared (no-op for 0).
  void retake_shared(int depth);

 private:
  using Hold = MmapLockHold;
  Hold* find_hold(bool create) const;
  void forget_hold_if_empty() const;
  void acquire_shared_slow();

  std::mutex m_;
  std::condition_variable cv_;
  int readers_ = 0;
  int waiting_writers_ = 0;
  bool writer_ = false;
};

// RAII shared hold.
class MmapReadGuard {
 public:
  explicit MmapReadGuard(MmapLock& lock) : lock_(lock) { lock_.lock_shared(); }
  ~MmapReadGuard() { lock_.unlock_shared(); }
  MmapReadGuard(const MmapReadGuard&) = delete;
  MmapReadGuard& operator=(const MmapReadGuard&) = delete;

 private:
  MmapLock& lock_;
};

}  // namespace gfnmap::detail
