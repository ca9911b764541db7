// gfnmap tests, host: helpers for SimHost tests: a notifier that records every callback (and can
// look at the host while a change is bracketed), and small GUP wrappers.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <mutex>
#include <vector>

#include "gfnmap/sim_host.h"

// g++ 12 warns about members left out of a designated initializer (-Wmissing-field-initializers,
// fixed in g++ 13); the tests use `{.backing = ...}` for MmapOptions, so the warning is off here.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace gfnmap::test {

class RecordingNotifier : public MmuNotifier {
 public:
  enum class Kind { kStart, kEnd, kClearFlushYoung, kClearYoung, kTestYoung, kRelease };
  struct Event {
    Kind kind;
    Hva start;
    Hva end;
  };

  void invalidate_range_start(Hva start, Hva end) override {
    record(Kind::kStart, start, end);
    if (on_start) on_start(start, end);
  }
  void invalidate_range_end(Hva start, Hva end) override {
    record(Kind::kEnd, start, end);
    if (on_end) on_end(start, end);
  }
  bool clear_flush_young(Hva start, Hva end) override {
    record(Kind::kClearFlushYoung, start, end);
    return young;
  }
  bool clear_young(Hva start, Hva end) override {
    record(Kind::kClearYoung, start, end);
    return young;
  }
  bool test_young(Hva start, Hva end) override {
    record(Kind::kTestYoung, start, end);
    return young;
  }
  void release() override { record(Kind::kRelease, Hva(), Hva()); }

  std::vector<Event> take() {
    std::lock_guard l(mu_);
    return std::exchange(events_, {});
  }
  size_t count(Kind kind) {
    std::lock_guard l(mu_);
    size_t n = 0;
    for (const Event& e : events_) n += e.kind == kind;
    return n;
  }

  std::function<void(Hva, Hva)> on_start;  // runs inside start, before the change
  std::function<void(Hva, Hva)> on_end;    // runs inside end, after the change
  bool young = false;

 private:
  void record(Kind kind, Hva start, Hva end) {
    std::lock_guard l(mu_);
    events_.push_back(Event{kind, start, end});
  }
  std::mutex mu_;
  std::vector<Event> events_;
};

// Every start has an end with the same range after it, ranges are page aligned and non-empty.
inline void expect_bracketed(const std::vector<RecordingNotifier::Event>& events) {
  using K = RecordingNotifier::Kind;
  std::vector<RecordingNotifier::Event> open;
  for (const auto& e : events) {
    if (e.kind == K::kStart) {
      EXPECT_EQ(e.start.value % kPageSize, 0u);
      EXPECT_EQ(e.end.value % kPageSize, 0u);
      EXPECT_LT(e.start, e.end);
      open.push_back(e);
    } else if (e.kind == K::kEnd) {
      ASSERT_FALSE(open.empty()) << "end without start";
      bool found = false;
      for (auto it = open.begin(); it != open.end(); ++it) {
        if (it->start == e.start && it->end == e.end) {
          open.erase(it);
          found = true;
          break;
        }
      }
      EXPECT_TRUE(found) << "end range matches no start";
    }
  }
  EXPECT_TRUE(open.empty()) << "start without end";
}

// get_user_pages_unlocked with the slow path's own flags added, as the resolver calls it.
inline long gup(SimHost& mm, Hva hva, FollFlags flags, Page* page) {
  return mm.get_user_pages_unlocked(hva, flags | kFollHwpoison | kFollHonorNumaFault, page);
}

// GUP + put: the pfn a slow GUP maps, or an error pfn with the GUP result in *ret.
inline Pfn gup_pfn(SimHost& mm, Hva hva, FollFlags flags, long* ret = nullptr) {
  Page page;
  long r = gup(mm, hva, flags, &page);
  if (ret) *ret = r;
  if (r != 1) return kPfnErrFault;
  Pfn pfn = page.pfn;
  mm.put_page(page);
  return pfn;
}

}  // namespace gfnmap::test
