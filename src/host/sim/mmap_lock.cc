// gfnmap host/sim: the model's mmap lock (see mmap_lock.h). Per-thread holds live in a small
// thread_local list, one entry per lock this thread holds.
#include "mmap_lock.h"

#include <algorithm>
#include <vector>

#include "sched/sched_hooks.h"

namespace gfnmap::detail {
namespace {

thread_local std::vector<MmapLockHold> t_holds;

}  // namespace

MmapLock::Hold* MmapLock::find_hold(bool create) const {
  for (auto& h : t_holds) {
    if (h.lock == this) return &h;
  }
  if (!create) return nullptr;
  t_holds.push_back(MmapLockHold{this, 0, 0});
  return &t_holds.back();
}

void MmapLock::forget_hold_if_empty() const {
  std::erase_if(t_holds, [this](const MmapLockHold& h) {
    return h.lock == this && h.shared == 0 && h.exclusive == 0;
  });
}

void MmapLock::acquire_shared_slow() {
  GFNMAP_BLOCK_UNTIL("mmap_lock.shared", [this] { return !writer_ && waiting_writers_ == 0; });
  std::unique_lock l(m_);
  cv_.wait(l, [this] { return !writer_ && waiting_writers_ == 0; });
  ++readers_;
}

void MmapLock::lock_shared() {
  Hold* h = find_hold(false);
  if (h && (h->shared > 0 || h->exclusive > 0)) {
    ++h->shared;  // nested: this thread already excludes writers
    return;
  }
  acquire_shared_slow();
  find_hold(true)->shared = 1;
}

bool MmapLock::unlock_shared() {
  Hold* h = find_hold(false);
  if (!h || h->shared == 0) return false;
  if (--h->shared == 0 && h->exclusive == 0) {
    forget_hold_if_empty();
    std::lock_guard l(m_);
    --readers_;
    cv_.notify_all();
  }
  return true;
}

bool MmapLock::lock() {
  Hold* h = find_hold(false);
  if (h && h->exclusive > 0) {
    ++h->exclusive;
    return true;
  }
  if (h && h->shared > 0) return false;
  GFNMAP_BLOCK_UNTIL("mmap_lock.exclusive", [this] { return !writer_ && readers_ == 0; });
  {
    std::unique_lock l(m_);
    ++waiting_writers_;
    cv_.wait(l, [this] { return !writer_ && readers_ == 0; });
    --waiting_writers_;
    writer_ = true;
  }
  find_hold(true)->exclusive = 1;
  return true;
}

void MmapLock::unlock() {
  Hold* h = find_hold(false);
  if (!h || h->exclusive == 0) return;
  if (--h->exclusive > 0) return;
  // Shared holds taken while exclusive keep excluding writers only through this thread; once
  // exclusive is gone they become real reader holds.
  int shared = h->shared;
  if (shared == 0) forget_hold_if_empty();
  std::lock_guard l(m_);
  writer_ = false;
  if (shared > 0) ++readers_;
  cv_.notify_all();
}

bool MmapLock::held_by_this_thread() const {
  const Hold* h = find_hold(false);
  return h && (h->shared > 0 || h->exclusive > 0);
}
bool MmapLock::held_shared_by_this_thread() const {
  const Hold* h = find_hold(false);
  return h && h->shared > 0;
}
bool MmapLock::held_exclusive_by_this_thread() const {
  const Hold* h = find_hold(false);
  return h && h->exclusive > 0;
}

int MmapLock::drop_shared() {
  Hold* h = find_hold(false);
  if (!h || h->shared == 0 || h->exclusive > 0) return 0;
  int depth = h->shared;
  h->shared = 0;
  forget_hold_if_empty();
  std::lock_guard l(m_);
  --readers_;
  cv_.notify_all();
  return depth;
}

void MmapLock::retake_shared(int depth) {
  if (depth <= 0) return;
  acquire_shared_slow();
  find_hold(true)->shared = depth;
}

}  // namespace gfnmap::detail
