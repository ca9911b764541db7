// gfnmap tests: the userfaultfd page server on real memory: sources, demand faults from any
// thread, NOWAIT, interruptible waits, poison, REMOVE/UNMAP events, EEXIST, prefetch, stats.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "gfnmap/linux_host.h"
#include "gfnmap/uffd.h"
#include "host/linux/abi.h"
#include "host_linux/test_util.h"

namespace gfnmap::uffd {
namespace {

using gfnmap::testing::hva_bytes;
using gfnmap::testing::RecordingNotifier;
using gfnmap::testing::TempFile;

// Page i holds the byte (i + 1) everywhere.
std::vector<std::byte> pattern(uint64_t pages) {
  std::vector<std::byte> v(pages * kPageSize);
  for (uint64_t i = 0; i < pages; ++i) {
    std::memset(v.data() + i * kPageSize, static_cast<int>((i + 1) & 0xff), kPageSize);
  }
  return v;
}

// Says Retry until opened: a source that is "still in flight".
class GateSource final : public PageSource {
 public:
  Fill fill(uint64_t offset, std::span<std::byte> dst) override {
    calls.fetch_add(1);
    if (!open.load()) return Fill::kRetry;
    std::memset(dst.data(), 0xab, dst.size());
    (void)offset;
    return Fill::kServed;
  }
  std::atomic<bool> open{false};
  std::atomic<int> calls{0};
};

class FailingSource final : public PageSource {
 public:
  Fill fill(uint64_t, std::span<std::byte>) override { return Fill::kFailed; }
};

template <class Pred>
bool eventually(Pred pred, int ms = 5000) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

struct Fixture {
  std::unique_ptr<LinuxHost> host;
  std::unique_ptr<PageServer> server;
  Hva base;
};

Fixture make(PageSource& source, uint64_t pages, PageServerOptions options = {},
             bool start = true) {
  Fixture f;
  auto h = LinuxHost::create();
  EXPECT_TRUE(h.ok());
  f.host = std::move(*h);
  auto s = PageServer::create(source, std::move(options));
  EXPECT_TRUE(s.ok()) << error_to_string(s.error());
  f.server = std::move(*s);
  auto b = f.server->map_lazy(f.host.get(), pages * kPageSize);
  EXPECT_TRUE(b.ok()) << error_to_string(b.error());
  f.base = *b;
  if (start) {
    EXPECT_TRUE(f.server->start().ok());
  }
  return f;
}

TEST(PageServer, ZeroSourceServesAnyThread) {
  ZeroSource zero;
  Fixture f = make(zero, 16);
  std::thread t([&] {
    for (int i = 0; i < 16; ++i) EXPECT_EQ(hva_bytes(f.base + i * kPageSize)[5], 0);
  });
  t.join();
  ASSERT_TRUE(eventually([&] { return f.server->stats().faults_served == 16; }));
  PageServerStats s = f.server->stats();
  EXPECT_EQ(s.faults, 16u);
  EXPECT_EQ(s.faults_served, 16u);
  EXPECT_EQ(s.pages_zeroed, 16u);
  EXPECT_GT(s.latency_p50_ns(), 0u);
  EXPECT_TRUE(f.server->fully_populated());
}

TEST(PageServer, MemorySourceThroughLinuxHostSlowPath) {
  auto bytes = pattern(32);
  MemorySource mem(bytes);
  Fixture f = make(mem, 32);
  auto vma = f.host->vma_lookup(f.base);
  ASSERT_TRUE(vma);
  EXPECT_EQ(f.host->regions().at(0).kind, RegionKind::kLazy);
  Page page;
  ASSERT_EQ(f.host->get_user_pages_unlocked(f.base + 3 * kPageSize, kFollWrite | kFollHwpoison,
                                            &page),
            1);
  EXPECT_EQ(hva_bytes(f.base + 3 * kPageSize)[100], 4);
  f.host->put_page(page);
  EXPECT_TRUE(eventually([&] { return f.server->stats().pages_copied == 1; }));
  EXPECT_EQ(f.host->outstanding_refs(), 0u);
}

TEST(PageServer, FileSnapshotSource) {
  TempFile file(8 * kPageSize, 0x11);
  ASSERT_GE(file.fd, 0);
  auto src = FileSource::from_fd(file.fd);
  ASSERT_TRUE(src.ok());
  Fixture f = make(**src, 10);  // two pages past the end of the file read as zero
  EXPECT_EQ(hva_bytes(f.base + 2 * kPageSize)[0], 2);
  EXPECT_EQ(hva_bytes(f.base + 2 * kPageSize)[1], 0x11);
  EXPECT_EQ(hva_bytes(f.base + 9 * kPageSize)[1], 0);
  EXPECT_TRUE(eventually([&] { return f.server->stats().pages_zeroed == 1; }));
  auto by_path = FileSource::open(file.path + "-missing");
  EXPECT_EQ(by_path.code(), ENOENT);
  EXPECT_NE(by_path.error().message.find("-missing"), std::string::npos);
}

TEST(PageServer, Row14_NowaitOnUnservedPageDoesNotBlock) {
  GateSource gate;
  Fixture f = make(gate, 4);
  Page page;
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base, kFollNowait | kFollHwpoison, &page), 0);
  EXPECT_EQ(f.host->stats().nowait_needs_io, 1u);
  // The kick asked the server for the page; it is served once the source has it.
  EXPECT_TRUE(eventually([&] { return gate.calls.load() > 0; }));
  gate.open = true;
  EXPECT_TRUE(eventually([&] { return f.server->page_ready(f.base); }));
  ASSERT_EQ(f.host->get_user_pages_unlocked(f.base, kFollNowait | kFollHwpoison, &page), 1);
  f.host->put_page(page);
}

// A vCPU-like thread: its kick signal is blocked, and a pending one interrupts waits that are
// interruptible.
struct VcpuThread {
  static void block(int sig) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }
  static void consume(int sig) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    timespec zero{0, 0};
    sigtimedwait(&set, nullptr, &zero);
  }
};

TEST(PageServer, Row10_InterruptibleWaitReturnsEintrOnSignal) {
  GateSource gate;
  Fixture f = make(gate, 4);
  std::promise<pthread_t> tid;
  std::atomic<long> result{1000};
  std::thread vcpu([&] {
    VcpuThread::block(SIGUSR1);
    tid.set_value(pthread_self());
    Page page;
    result = f.host->get_user_pages_unlocked(f.base, kFollInterruptible | kFollHwpoison, &page);
    EXPECT_TRUE(f.host->signal_pending()) << "the signal stays pending for the caller";
    VcpuThread::consume(SIGUSR1);
  });
  pthread_t t = tid.get_future().get();
  ASSERT_TRUE(eventually([&] { return gate.calls.load() > 0; }));  // it is waiting
  EXPECT_EQ(result.load(), 1000);
  pthread_kill(t, SIGUSR1);
  vcpu.join();
  EXPECT_EQ(result.load(), -EINTR);
  EXPECT_EQ(f.host->stats().interrupted, 1u);
  EXPECT_EQ(f.host->outstanding_refs(), 0u);
  gate.open = true;
}

TEST(PageServer, Row10_UninterruptibleWaitKeepsWaitingThroughSignals) {
  GateSource gate;
  Fixture f = make(gate, 4);
  std::promise<pthread_t> tid;
  std::atomic<long> result{1000};
  std::thread vcpu([&] {
    VcpuThread::block(SIGUSR1);
    tid.set_value(pthread_self());
    Page page;
    result = f.host->get_user_pages_unlocked(f.base, kFollHwpoison, &page);
    if (result == 1) f.host->put_page(page);
    VcpuThread::consume(SIGUSR1);
  });
  pthread_t t = tid.get_future().get();
  ASSERT_TRUE(eventually([&] { return gate.calls.load() > 2; }));
  pthread_kill(t, SIGUSR1);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(result.load(), 1000) << "without INTERRUPTIBLE the fault keeps waiting";
  gate.open = true;
  vcpu.join();
  EXPECT_EQ(result.load(), 1);
  EXPECT_EQ(hva_bytes(f.base)[0], 0xab);
}

// Kernel fact behind the design: MADV_POPULATE_* faults killable-only (no FOLL_INTERRUPTIBLE),
// so a non-fatal signal, even one with a handler, does not end its wait for the page server.
std::atomic<int> g_handled{0};
void on_usr1(int) { g_handled.fetch_add(1); }

TEST(PageServer, KernelFact_MadvPopulateIgnoresNonFatalSignalsWhileUffdWaits) {
  GateSource gate;
  Fixture f = make(gate, 4);
  struct sigaction sa {};
  sa.sa_handler = on_usr1;
  struct sigaction old {};
  sigaction(SIGUSR1, &sa, &old);
  std::promise<pthread_t> tid;
  std::atomic<int> rc{1000}, err{0};
  std::thread t([&] {
    tid.set_value(pthread_self());
    int r = madvise(testing::hva_ptr(f.base), kPageSize, MADV_POPULATE_READ);
    err = errno;
    rc = r;
  });
  pthread_t th = tid.get_future().get();
  ASSERT_TRUE(eventually([&] { return gate.calls.load() > 2; }));
  int handled_before = g_handled.load();
  pthread_kill(th, SIGUSR1);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(rc.load(), 1000) << "MADV_POPULATE returned while the page was unserved";
  EXPECT_EQ(g_handled.load(), handled_before) << "the handler waits for the syscall to end";
  gate.open = true;
  t.join();
  EXPECT_EQ(rc.load(), 0) << "errno " << err.load();
  EXPECT_EQ(g_handled.load(), handled_before + 1);
  sigaction(SIGUSR1, &old, nullptr);
}

TEST(PageServer, Row12_PoisonGivesEhwpoison) {
  auto bytes = pattern(8);
  MemorySource mem(bytes);
  Fixture f = make(mem, 8);
  if (!f.server->features().poison) GTEST_SKIP() << "UFFD_FEATURE_POISON not available";
  hva_bytes(f.base + kPageSize)[0] = 1;  // served, then poisoned (discarded first)
  ASSERT_TRUE(f.host->poison(f.base + kPageSize, kPageSize).ok());
  Page page;
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base + kPageSize, kFollHwpoison, &page),
            -EHWPOISON);
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base + kPageSize, kFollWrite | kFollHwpoison,
                                            &page),
            -EHWPOISON);
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base + kPageSize, 0, &page), -EFAULT)
      << "without FOLL_HWPOISON a poisoned page is a plain fault";
  EXPECT_TRUE(eventually([&] { return f.server->stats().poisoned == 1; }));
  // Neighbours are fine.
  ASSERT_EQ(f.host->get_user_pages_unlocked(f.base, kFollHwpoison, &page), 1);
  f.host->put_page(page);
}

TEST(PageServer, FailingSourcePoisonsThePage) {
  FailingSource bad;
  Fixture f = make(bad, 2);
  if (!f.server->features().poison) GTEST_SKIP() << "UFFD_FEATURE_POISON not available";
  Page page;
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base, kFollHwpoison, &page), -EHWPOISON);
  EXPECT_TRUE(eventually([&] { return f.server->stats().source_failures == 1; }));
}

TEST(PageServer, RemoveThroughLinuxHostServesZeroAfterwards) {
  auto bytes = pattern(8);
  MemorySource mem(bytes);
  Fixture f = make(mem, 8);
  RecordingNotifier n;
  f.host->register_notifier(&n);
  EXPECT_EQ(hva_bytes(f.base + 2 * kPageSize)[0], 3);
  ASSERT_TRUE(f.host->discard(f.base + 2 * kPageSize, kPageSize).ok());
  EXPECT_TRUE(eventually([&] { return f.server->stats().removes == 1; }));
  EXPECT_EQ(hva_bytes(f.base + 2 * kPageSize)[0], 0) << "a removed page is served as zero";
  // Untouched pages discarded read as zero too.
  ASSERT_TRUE(f.host->discard(f.base + 5 * kPageSize, kPageSize).ok());
  EXPECT_EQ(hva_bytes(f.base + 5 * kPageSize)[0], 0);
  EXPECT_EQ(hva_bytes(f.base + 6 * kPageSize)[0], 7);
  EXPECT_TRUE(eventually([&] { return n.nr_starts() == n.nr_ends(); }));
  f.host->unregister_notifier(&n);
}

TEST(PageServer, RemoveBehindGfnmapsBackRaisesInvalidation) {
  auto bytes = pattern(8);
  MemorySource mem(bytes);
  Fixture f = make(mem, 8);
  RecordingNotifier n;
  f.host->register_notifier(&n);
  Page page;
  ASSERT_EQ(f.host->get_user_pages_unlocked(f.base + kPageSize, kFollWrite | kFollHwpoison,
                                            &page),
            1);
  f.host->put_page(page);
  // Not through LinuxHost: only the userfaultfd REMOVE event tells anyone.
  ASSERT_EQ(madvise(testing::hva_ptr(f.base + kPageSize), kPageSize, MADV_DONTNEED), 0);
  EXPECT_TRUE(eventually([&] { return n.nr_ends() >= 1; }));
  EXPECT_TRUE(n.covered(f.base.value + kPageSize));
  Page fast;
  EXPECT_FALSE(f.host->get_user_page_fast_only(f.base + kPageSize, kFollWrite, &fast));
  EXPECT_EQ(hva_bytes(f.base + kPageSize)[0], 0);
  f.host->unregister_notifier(&n);
}

TEST(PageServer, UnmapBehindGfnmapsBackRemovesTheVma) {
  ZeroSource zero;
  Fixture f = make(zero, 8);
  if (!f.server->features().event_unmap) GTEST_SKIP() << "UFFD_FEATURE_EVENT_UNMAP missing";
  RecordingNotifier n;
  f.host->register_notifier(&n);
  ASSERT_EQ(munmap(testing::hva_ptr(f.base + 6 * kPageSize), 2 * kPageSize), 0);
  EXPECT_TRUE(eventually([&] { return f.server->stats().unmaps == 1; }));
  EXPECT_TRUE(eventually([&] { return !f.host->vma_lookup(f.base + 6 * kPageSize); }));
  EXPECT_TRUE(f.host->vma_lookup(f.base));
  EXPECT_TRUE(n.covered(f.base.value + 7 * kPageSize));
  f.host->unregister_notifier(&n);
}

TEST(PageServer, RemapMovesTheRangeAndTheRegion) {
  auto bytes = pattern(8);
  MemorySource mem(bytes);
  Fixture f = make(mem, 8);
  if (!f.server->features().event_remap) GTEST_SKIP() << "UFFD_FEATURE_EVENT_REMAP missing";
  EXPECT_EQ(hva_bytes(f.base)[0], 1);  // page 0 served before the move
  void* target = mmap(nullptr, 4 * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(target, MAP_FAILED);
  void* moved = mremap(testing::hva_ptr(f.base), 4 * kPageSize, 4 * kPageSize,
                       MREMAP_MAYMOVE | MREMAP_FIXED, target);
  ASSERT_EQ(moved, target);
  const Hva to(reinterpret_cast<uint64_t>(moved));
  EXPECT_TRUE(eventually([&] { return f.server->stats().remaps == 1; }));
  EXPECT_TRUE(eventually([&] { return f.host->vma_lookup(to).has_value(); }));
  EXPECT_FALSE(f.host->vma_lookup(f.base));
  EXPECT_EQ(hva_bytes(to)[0], 1) << "the served page moved with the mapping";
  EXPECT_EQ(hva_bytes(to + 2 * kPageSize)[0], 3) << "a missing page is served from its offset";
  EXPECT_EQ(hva_bytes(f.base + 5 * kPageSize)[0], 6) << "the rest stays where it was";
  f.server.reset();
  munmap(moved, 4 * kPageSize);
}

TEST(PageServer, EexistWakesTheFaulter) {
  auto bytes = pattern(4);
  MemorySource mem(bytes);
  Fixture f = make(mem, 4);
  // Place the page behind the server's back; the server still thinks it missing.
  uffdio_zeropage z{};
  z.range = {f.base.value, kPageSize};
  ASSERT_EQ(ioctl(f.server->fd(), UFFDIO_ZEROPAGE, &z), 0);
  f.server->request(f.base);
  EXPECT_TRUE(eventually([&] { return f.server->stats().eexist_wakes == 1; }));
  EXPECT_TRUE(f.server->page_ready(f.base));
}

TEST(PageServer, SequentialPrefetchFillsEverything) {
  auto bytes = pattern(300);
  MemorySource mem(bytes);
  PageServerOptions o;
  o.prefetch = PrefetchMode::kSequential;
  o.prefetch_chunk_pages = 64;
  Fixture f = make(mem, 300, o);
  EXPECT_EQ(hva_bytes(f.base + 299 * kPageSize)[0], 300 & 0xff);  // a demand fault meanwhile
  ASSERT_TRUE(eventually([&] { return f.server->fully_populated(); }));
  for (int i = 0; i < 300; ++i) ASSERT_EQ(hva_bytes(f.base + i * kPageSize)[9], (i + 1) & 0xff);
  ASSERT_TRUE(eventually([&] { return f.server->stats().pages_copied == 300; }));
  PageServerStats s = f.server->stats();
  EXPECT_EQ(s.pages_copied, 300u);
  EXPECT_GE(s.prefetched, 299u - s.faults);
}

TEST(PageServer, HotSetIsRecordedAndReplayed) {
  auto bytes = pattern(32);
  MemorySource mem(bytes);
  std::vector<uint64_t> hot;
  {
    PageServerOptions o;
    o.record_hot_set = true;
    Fixture f = make(mem, 32, o);
    for (int i : {5, 3, 9, 3}) {
      (void)*reinterpret_cast<volatile unsigned char*>(hva_bytes(f.base + i * kPageSize));
    }
    hot = f.server->recorded_hot_set();
  }
  ASSERT_EQ(hot, (std::vector<uint64_t>{5 * kPageSize, 3 * kPageSize, 9 * kPageSize}));
  PageServerOptions o;
  o.prefetch = PrefetchMode::kHotSet;
  o.hot_set = hot;
  Fixture f = make(mem, 32, o);
  ASSERT_TRUE(eventually([&] { return f.server->stats().prefetched == 3; }));
  EXPECT_TRUE(f.server->page_ready(f.base + 9 * kPageSize));
  EXPECT_FALSE(f.server->page_ready(f.base + 4 * kPageSize));
  EXPECT_EQ(f.server->stats().faults, 0u);
}

TEST(PageServer, BadInputGivesClearErrors) {
  ZeroSource zero;
  PageServerOptions bad;
  bad.handler_threads = 0;
  EXPECT_EQ(PageServer::create(zero, bad).code(), EINVAL);
  PageServerOptions hot;
  hot.hot_set = {123};
  EXPECT_EQ(PageServer::create(zero, hot).code(), EINVAL);
  Fixture f = make(zero, 4);
  EXPECT_EQ(f.server->start().code(), EINVAL) << "already started";
  EXPECT_EQ(f.server->add_range(f.base + 1, kPageSize, 0).code(), EINVAL);
  EXPECT_EQ(f.server->add_range(f.base, kPageSize, 0).code(), EEXIST);
  void* p = mmap(nullptr, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  munmap(p, kPageSize);
  auto unmapped = f.server->add_range(Hva(reinterpret_cast<uint64_t>(p)), kPageSize, 0);
  EXPECT_FALSE(unmapped.ok());
  int fd = open("/dev/null", O_RDONLY);
  close(fd);
  EXPECT_EQ(FileSource::from_fd(fd).code(), EBADF);
  EXPECT_EQ(f.server->map_lazy(nullptr, 100).code(), EINVAL);
  EXPECT_EQ(f.server->poison(f.base + 1, f.base + kPageSize), -EINVAL);
}

TEST(PageServer, StopIsCleanAndIdempotent) {
  ZeroSource zero;
  Fixture f = make(zero, 4);
  EXPECT_EQ(hva_bytes(f.base)[0], 0);
  f.server->stop();
  f.server->stop();
  Page page;
  // With the server stopped an interruptible wait cannot complete: a clear failure, no hang.
  EXPECT_EQ(f.host->get_user_pages_unlocked(f.base + kPageSize, kFollInterruptible | kFollHwpoison,
                                            &page),
            -EFAULT);
  EXPECT_TRUE(f.server->start().ok());
  EXPECT_EQ(hva_bytes(f.base + kPageSize)[0], 0);
}

TEST(PageServer, AbiConstants) {
  EXPECT_EQ(linux_abi::kUffdioPoison, 0xc020aa08UL);
  EXPECT_EQ(sizeof(linux_abi::UffdioPoison), 32u);
  EXPECT_EQ(sizeof(linux_abi::PmScanArg), 96u);
}

}  // namespace
}  // namespace gfnmap::uffd
