// gfnmap concurrency tests (run under TSan): many threads faulting through LinuxHost and the
// page server at once, with prefetch, discards and fast-path lookups racing invalidations.
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "gfnmap/linux_host.h"
#include "gfnmap/uffd.h"
#include "host_linux/test_util.h"

namespace gfnmap {
namespace {

using testing::hva_bytes;

constexpr uint64_t kPages = 512;

std::vector<std::byte> pattern() {
  std::vector<std::byte> v(kPages * kPageSize);
  for (uint64_t i = 0; i < kPages; ++i) {
    std::memset(v.data() + i * kPageSize, static_cast<int>((i * 7 + 1) & 0xff), kPageSize);
  }
  return v;
}

TEST(UffdConcurrency, ManyFaultersManyHandlersWithPrefetch) {
  auto bytes = pattern();
  uffd::MemorySource mem(bytes);
  auto host = LinuxHost::create();
  ASSERT_TRUE(host.ok());
  uffd::PageServerOptions o;
  o.handler_threads = 3;
  o.prefetch = uffd::PrefetchMode::kSequential;
  o.prefetch_threads = 2;
  o.prefetch_chunk_pages = 16;
  auto server = uffd::PageServer::create(mem, o);
  ASSERT_TRUE(server.ok());
  auto base = (*server)->map_lazy(host->get(), kPages * kPageSize);
  ASSERT_TRUE(base.ok());
  ASSERT_TRUE((*server)->start().ok());
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t k = 0; k < kPages; ++k) {
        uint64_t i = (k * 13 + static_cast<uint64_t>(t) * 101) % kPages;
        Hva h = *base + i * kPageSize;
        if (t % 2 == 0) {
          Page page;
          long r = (*host)->get_user_pages_unlocked(h, kFollHwpoison | (k % 3 ? 0 : kFollWrite),
                                                    &page);
          if (r != 1) {
            bad.fetch_add(1);
            continue;
          }
          if (hva_bytes(h)[17] != static_cast<unsigned char>((i * 7 + 1) & 0xff) &&
              !(k % 3 == 0)) {
            bad.fetch_add(1);
          }
          (*host)->put_page(page);
        } else {
          // Plain CPU access: the kernel raises the fault.
          if (*reinterpret_cast<volatile unsigned char*>(hva_bytes(h) + 5) !=
              static_cast<unsigned char>((i * 7 + 1) & 0xff)) {
            bad.fetch_add(1);
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ((*host)->outstanding_refs(), 0u);
  uffd::PageServerStats s = (*server)->stats();
  EXPECT_EQ(s.pages_copied + s.pages_zeroed, kPages) << "every page placed exactly once";
  server->reset();
}

TEST(UffdConcurrency, DiscardsRaceFaultsAndStayConsistent) {
  auto bytes = pattern();
  uffd::MemorySource mem(bytes);
  auto host = LinuxHost::create();
  ASSERT_TRUE(host.ok());
  testing::RecordingNotifier n;
  (*host)->register_notifier(&n);
  uffd::PageServerOptions o;
  o.handler_threads = 2;
  auto server = uffd::PageServer::create(mem, o);
  ASSERT_TRUE(server.ok());
  auto base = (*server)->map_lazy(host->get(), 64 * kPageSize);
  ASSERT_TRUE(base.ok());
  ASSERT_TRUE((*server)->start().ok());
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread faulter([&] {
    while (!stop.load()) {
      for (uint64_t i = 0; i < 64; ++i) {
        unsigned char v = *reinterpret_cast<volatile unsigned char*>(hva_bytes(*base + i * kPageSize));
        // Either the snapshot content or zero (after a REMOVE): never anything else.
        if (v != 0 && v != static_cast<unsigned char>((i * 7 + 1) & 0xff)) bad.fetch_add(1);
      }
    }
  });
  std::thread fast([&] {
    while (!stop.load()) {
      for (uint64_t i = 0; i < 64; ++i) {
        Page p;
        if ((*host)->get_user_page_fast_only(*base + i * kPageSize, kFollWrite, &p)) {
          (*host)->put_page(p);
        }
      }
    }
  });
  for (int round = 0; round < 20; ++round) {
    ASSERT_TRUE((*host)->discard(*base + (round % 8) * 8 * kPageSize, 8 * kPageSize).ok());
  }
  stop = true;
  faulter.join();
  fast.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ((*host)->outstanding_refs(), 0u);
  server->reset();
  (*host)->unregister_notifier(&n);
  std::lock_guard lk(n.mu);
  EXPECT_EQ(n.starts.size(), n.ends.size());
  EXPECT_EQ(n.in_progress, 0);
}

}  // namespace
}  // namespace gfnmap
