// gfnmap tests: LinuxHost through the HostMm interface on real memory (fast/slow/remapped paths,
// host events, mapping levels, pfns, bad input), and the kernel facts it relies on.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "gfnmap/host_facts.h"
#include "gfnmap/linux_host.h"
#include "host_linux/test_util.h"

namespace gfnmap {
namespace {

using testing::hva_bytes;
using testing::RecordingNotifier;
using testing::TempFile;

constexpr uint64_t k2M = 2ull << 20;

class LinuxHostTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto h = LinuxHost::create();
    ASSERT_TRUE(h.ok()) << error_to_string(h.error());
    host = std::move(*h);
    host->register_notifier(&notifier);
  }
  void TearDown() override {
    EXPECT_EQ(host->outstanding_refs(), 0u) << "every reference handed out must be put";
    EXPECT_EQ(host->stats().bad_puts, 0u);
    host->unregister_notifier(&notifier);
  }
  RegionInfo make(RegionKind kind, uint64_t size, int prot = PROT_READ | PROT_WRITE, int fd = -1) {
    RegionSpec spec;
    spec.kind = kind;
    spec.size = size;
    spec.prot = prot;
    spec.fd = fd;
    auto r = host->create_region(spec);
    EXPECT_TRUE(r.ok()) << error_to_string(r.error());
    return r.ok() ? *r : RegionInfo{};
  }
  long gup(Hva hva, FollFlags flags, Page* page) {
    return host->get_user_pages_unlocked(hva, flags | kFollHwpoison, page);
  }
  std::unique_ptr<LinuxHost> host;
  RecordingNotifier notifier;
};

TEST_F(LinuxHostTest, Row07_SlowWriteFaultThenRow05_FastHit) {
  RegionInfo r = make(RegionKind::kAnonymous, 16 * kPageSize);
  Page page;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &page));
  ASSERT_EQ(gup(r.start, kFollWrite, &page), 1);
  EXPECT_EQ(page.mm, host.get());
  EXPECT_EQ(page.hva, r.start);
  EXPECT_FALSE(page.pinned);
  EXPECT_EQ(host->outstanding_refs(), 1u);
  Page fast;
  ASSERT_TRUE(host->get_user_page_fast_only(r.start + 100, kFollWrite, &fast));
  EXPECT_EQ(fast.pfn, page.pfn);
  EXPECT_EQ(host->outstanding_refs(), 2u);
  host->put_page(page);
  host->put_page(fast);
  // The page really is populated and writable through the hva.
  hva_bytes(r.start)[0] = 42;
  EXPECT_EQ(hva_bytes(r.start)[0], 42);
  Page pinned;
  ASSERT_TRUE(host->get_user_page_fast_only(r.start, kFollWrite | kFollPin, &pinned));
  EXPECT_TRUE(pinned.pinned);
  host->put_page(pinned);
}

// A read of untouched private anonymous memory follows the host's zero-page fact: the shared
// zero page, read-only (row 9; a write then gives a new frame), or a fresh exclusive page that
// is writable at once (row 8: the fast write lookup succeeds and must be put like any other).
TEST_F(LinuxHostTest, Row08or09_ReadOfUntouchedAnonFollowsTheZeroPageFact) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start, 0, &page), 1);
  Page up;
  const bool upgraded = host->get_user_page_fast_only(r.start, kFollWrite, &up);
  if (upgraded) host->put_page(up);
  if (!host->zero_page()) {
    EXPECT_TRUE(upgraded) << "row 8: without the zero page the read mapped a writable page";
    EXPECT_EQ(up.pfn, page.pfn);
    host->put_page(page);
    return;
  }
  EXPECT_FALSE(upgraded) << "row 9: the shared zero page must not be handed out for writing";
  // A write replaces the zero page (row 7): a new page, now writable, under an invalidation.
  const size_t before = notifier.nr_starts();
  Page w;
  ASSERT_EQ(gup(r.start, kFollWrite, &w), 1);
  EXPECT_EQ(notifier.nr_starts(), before + 1) << "replacing the zero page kills a translation";
  EXPECT_TRUE(notifier.covered(r.start.value));
  if (host->pfns_are_physical() && !host->zero_page_emulated()) {
    EXPECT_NE(w.pfn, page.pfn) << "the write gives a new frame";
  }
  ASSERT_TRUE(host->get_user_page_fast_only(r.start, kFollWrite, &up));
  host->put_page(up);
  host->put_page(w);
  host->put_page(page);
}

// A read of a MAP_PRIVATE file page maps the page-cache page read-only on every kernel (row 9);
// the write breaks CoW into a private copy, under an invalidation (row 7).
TEST_F(LinuxHostTest, Row09ThenRow07_PrivateFilePageOnEveryHost) {
  TempFile file(4 * kPageSize, 0x5a);
  ASSERT_GE(file.fd, 0);
  RegionInfo r = make(RegionKind::kFilePrivate, 4 * kPageSize, PROT_READ | PROT_WRITE, file.fd);
  Page rd;
  ASSERT_EQ(gup(r.start + kPageSize, 0, &rd), 1);
  Page up;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start + kPageSize, kFollWrite, &up))
      << "a page-cache page of a private mapping is never writable in place";
  const size_t before = notifier.nr_starts();
  Page wr;
  ASSERT_EQ(gup(r.start + kPageSize, kFollWrite, &wr), 1);
  EXPECT_EQ(notifier.nr_starts(), before + 1) << "the CoW break kills the read-only translation";
  EXPECT_TRUE(notifier.covered(r.start.value + kPageSize));
  if (host->pfns_are_physical()) {
    EXPECT_NE(wr.pfn, rd.pfn) << "CoW gives a new frame";
  }
  EXPECT_EQ(hva_bytes(r.start + kPageSize)[1], 0x5a) << "the copy holds the file's data";
  host->put_page(wr);
  host->put_page(rd);
}

// A page shared with a forked child is read-only in the parent on every kernel (row 9); the
// parent's write breaks CoW (row 7) under an invalidation, and the child keeps the old data.
TEST_F(LinuxHostTest, Row09ThenRow07_PageSharedWithAForkedChild) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  std::memset(hva_bytes(r.start), 3, 4 * kPageSize);
  testing::ForkedSharer child;
  ASSERT_TRUE(child.ok());
  Page rd;
  ASSERT_EQ(gup(r.start, 0, &rd), 1);
  Page up;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &up))
      << "a page mapped by two processes is not writable in place";
  const size_t before = notifier.nr_starts();
  Page wr;
  ASSERT_EQ(gup(r.start, kFollWrite, &wr), 1);
  EXPECT_EQ(notifier.nr_starts(), before + 1);
  EXPECT_TRUE(notifier.covered(r.start.value));
  if (host->pfns_are_physical()) {
    EXPECT_NE(wr.pfn, rd.pfn) << "CoW gives a new frame";
  }
  ASSERT_TRUE(host->get_user_page_fast_only(r.start, kFollWrite, &up));
  host->put_page(up);
  host->put_page(wr);
  host->put_page(rd);
}

// Options::zero_page: assuming the zero page on a kernel without it emulates it (untouched
// pages read read-only, pages written before stay row 8); denying it on a kernel with it is
// refused, since the shared zero page would be handed out writable.
TEST(LinuxHostZeroPage, OptionFollowsOrEmulatesTheFactAndNeverDeniesIt) {
  const HostFacts& facts = host_facts();
  const bool kernel = facts.zero_page && !facts.zero_page_emulated;
  LinuxHost::Options deny;
  deny.zero_page = false;
  auto denied = LinuxHost::create(deny);
  if (kernel) {
    EXPECT_EQ(denied.code(), EINVAL);
    EXPECT_NE(error_to_string(denied.error()).find("zero page"), std::string::npos);
  } else {
    ASSERT_TRUE(denied.ok()) << error_to_string(denied.error());
    EXPECT_FALSE((*denied)->zero_page());
  }
  LinuxHost::Options assume;
  assume.zero_page = true;
  auto h = LinuxHost::create(assume);
  ASSERT_TRUE(h.ok()) << error_to_string(h.error());
  LinuxHost& host = **h;
  EXPECT_TRUE(host.zero_page());
  EXPECT_EQ(host.zero_page_emulated(), !kernel);
  RegionSpec spec;
  spec.size = 4 * kPageSize;
  auto r = host.create_region(spec);
  ASSERT_TRUE(r.ok());
  std::memset(hva_bytes(r->start + kPageSize), 1, kPageSize);  // written behind its back
  Page p, up;
  ASSERT_EQ(host.get_user_pages_unlocked(r->start, 0, &p), 1);
  EXPECT_FALSE(host.get_user_page_fast_only(r->start, kFollWrite, &up)) << "row 9";
  host.put_page(p);
  ASSERT_EQ(host.get_user_pages_unlocked(r->start + kPageSize, 0, &p), 1);
  ASSERT_TRUE(host.get_user_page_fast_only(r->start + kPageSize, kFollWrite, &up)) << "row 8";
  host.put_page(up);
  host.put_page(p);
  EXPECT_EQ(host.outstanding_refs(), 0u);
}

TEST_F(LinuxHostTest, Row08_ReadOfWrittenAnonPageIsWritable) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  std::memset(hva_bytes(r.start), 7, kPageSize);  // written behind LinuxHost's back
  Page page;
  ASSERT_EQ(gup(r.start, 0, &page), 1);
  Page up;
  ASSERT_TRUE(host->get_user_page_fast_only(r.start, kFollWrite, &up))
      << "an exclusive, written anonymous page has a writable PTE";
  EXPECT_EQ(up.pfn, page.pfn);
  host->put_page(up);
  host->put_page(page);
}

TEST_F(LinuxHostTest, PfnComesFromPagemapWhenReadable) {
  RegionInfo r = make(RegionKind::kAnonymous, 2 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start, kFollWrite, &page), 1);
  if (host->pfns_are_physical()) {
    EXPECT_NE(page.pfn.value, r.start.value >> kPageShift);
    EXPECT_NE(page.pfn.value, 0u);
  } else {
    EXPECT_EQ(page.pfn.value, r.start.value >> kPageShift);
  }
  EXPECT_FALSE(is_error_noslot_pfn(page.pfn));
  host->put_page(page);
  auto virt = LinuxHost::create(LinuxHost::Options{PfnSource::kVirtual});
  ASSERT_TRUE(virt.ok());
  EXPECT_FALSE((*virt)->pfns_are_physical());
}

TEST_F(LinuxHostTest, Row07_CowOfPrivateFilePage) {
  TempFile f(8 * kPageSize, 0x5a);
  ASSERT_GE(f.fd, 0);
  RegionInfo r = make(RegionKind::kFilePrivate, 8 * kPageSize, PROT_READ | PROT_WRITE, f.fd);
  Page rd;
  ASSERT_EQ(gup(r.start, 0, &rd), 1);
  Page up;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &up))
      << "a private file page read maps the page cache page read-only";
  Page wr;
  ASSERT_EQ(gup(r.start, kFollWrite, &wr), 1);
  if (host->pfns_are_physical()) {
    EXPECT_NE(wr.pfn, rd.pfn) << "write breaks CoW";
  }
  hva_bytes(r.start)[1] = 1;
  unsigned char b = 0;
  ASSERT_EQ(pread(f.fd, &b, 1, 1), 1);
  EXPECT_EQ(b, 0x5a) << "the file is untouched";
  host->put_page(rd);
  host->put_page(wr);
}

TEST_F(LinuxHostTest, MemfdSharedReadMapsWritable) {
  RegionInfo r = make(RegionKind::kMemfdShared, 4 * kPageSize);
  EXPECT_TRUE(r.vm_flags & kVmShared);
  Page rd;
  ASSERT_EQ(gup(r.start, 0, &rd), 1);
  Page up;
  EXPECT_TRUE(host->get_user_page_fast_only(r.start, kFollWrite, &up))
      << "shmem read faults map a writable PTE";
  host->put_page(up);
  host->put_page(rd);
}

TEST_F(LinuxHostTest, Row15_ProtReadMappingRefusesWrites) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize, PROT_READ);
  auto vma = host->vma_lookup(r.start);
  ASSERT_TRUE(vma);
  EXPECT_TRUE(vma->vm_flags & kVmRead);
  EXPECT_FALSE(vma->vm_flags & kVmWrite);
  Page page;
  EXPECT_EQ(gup(r.start, kFollWrite, &page), -EFAULT);
  ASSERT_EQ(gup(r.start, 0, &page), 1);
  host->put_page(page);
}

TEST_F(LinuxHostTest, Row15_ProtectRaisesInvalidationAndSplitsRegion) {
  RegionInfo r = make(RegionKind::kAnonymous, 8 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start + 2 * kPageSize, kFollWrite, &page), 1);
  host->put_page(page);
  ASSERT_TRUE(host->protect(r.start + 2 * kPageSize, 2 * kPageSize, PROT_READ).ok());
  EXPECT_TRUE(notifier.covered(r.start.value + 2 * kPageSize));
  EXPECT_EQ(notifier.nr_starts(), notifier.nr_ends());
  EXPECT_EQ(notifier.in_progress, 0);
  EXPECT_EQ(host->regions().size(), 3u);
  Page fast;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start + 2 * kPageSize, kFollWrite, &fast))
      << "the invalidation cleared the fast-path state";
  EXPECT_EQ(gup(r.start + 2 * kPageSize, kFollWrite, &page), -EFAULT);
  ASSERT_TRUE(host->protect(r.start + 2 * kPageSize, 2 * kPageSize, PROT_NONE).ok());
  EXPECT_EQ(gup(r.start + 2 * kPageSize, 0, &page), -EFAULT);
  auto vma = host->vma_lookup(r.start + 3 * kPageSize);
  ASSERT_TRUE(vma);
  EXPECT_EQ(vma->vm_flags & (kVmRead | kVmWrite), 0u);
  EXPECT_EQ(vma->start, r.start + 2 * kPageSize);
  EXPECT_EQ(vma->end, r.start + 4 * kPageSize);
}

TEST_F(LinuxHostTest, Row13_NoMappingIsNoVma) {
  Page page;
  Hva nowhere(0x10000);
  EXPECT_FALSE(host->vma_lookup(nowhere));
  EXPECT_EQ(gup(nowhere, 0, &page), -EFAULT);
  EXPECT_FALSE(host->get_user_page_fast_only(nowhere, kFollWrite, &page));
  EXPECT_EQ(host->page_address(Pfn(1), nowhere), nullptr);
}

TEST_F(LinuxHostTest, UnmapRaisesInvalidationAndLeavesNoVma) {
  RegionInfo r = make(RegionKind::kAnonymous, 8 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start + kPageSize, kFollWrite, &page), 1);
  host->put_page(page);
  ASSERT_TRUE(host->unmap(r.start, 4 * kPageSize).ok());
  EXPECT_TRUE(notifier.covered(r.start.value + kPageSize));
  EXPECT_EQ(notifier.in_progress, 0);
  EXPECT_FALSE(host->vma_lookup(r.start + kPageSize));
  EXPECT_EQ(gup(r.start + kPageSize, 0, &page), -EFAULT);
  ASSERT_TRUE(host->vma_lookup(r.start + 4 * kPageSize));
  ASSERT_EQ(gup(r.start + 4 * kPageSize, kFollWrite, &page), 1);
  host->put_page(page);
}

TEST_F(LinuxHostTest, PutAfterUnmapStillBalances) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start, kFollWrite, &page), 1);
  ASSERT_TRUE(host->unmap(r.start, 4 * kPageSize).ok());
  EXPECT_EQ(host->outstanding_refs(), 1u);
  host->put_page(page);
  EXPECT_EQ(host->outstanding_refs(), 0u);
}

TEST_F(LinuxHostTest, DiscardZapsContentAndFastState) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start, kFollWrite, &page), 1);
  host->put_page(page);
  hva_bytes(r.start)[0] = 9;
  ASSERT_TRUE(host->discard(r.start, kPageSize).ok());
  EXPECT_TRUE(notifier.covered(r.start.value));
  Page fast;
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &fast));
  EXPECT_EQ(hva_bytes(r.start)[0], 0) << "MADV_DONTNEED on private anon reads as zero";
}

TEST_F(LinuxHostTest, DiscardOfMemfdUsesRemove) {
  RegionInfo r = make(RegionKind::kMemfdShared, 4 * kPageSize);
  hva_bytes(r.start)[0] = 9;
  ASSERT_TRUE(host->discard(r.start, kPageSize).ok());
  EXPECT_EQ(hva_bytes(r.start)[0], 0) << "MADV_REMOVE punches the shmem page";
}

TEST_F(LinuxHostTest, RemapGivesFreshMemoryAndInvalidates) {
  RegionInfo r = make(RegionKind::kAnonymous, 4 * kPageSize);
  hva_bytes(r.start)[0] = 3;
  Page page;
  ASSERT_EQ(gup(r.start, kFollWrite, &page), 1);
  host->put_page(page);
  size_t before = notifier.nr_starts();
  ASSERT_TRUE(host->remap(r.start, 4 * kPageSize).ok());
  EXPECT_GT(notifier.nr_starts(), before);
  EXPECT_EQ(hva_bytes(r.start)[0], 0);
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &page));
}

TEST_F(LinuxHostTest, Row21_DeviceMemoryIsPfnmapAndNeverRefcounted) {
  RegionInfo r = make(RegionKind::kDevice, 4 * kPageSize);
  auto vma = host->vma_lookup(r.start);
  ASSERT_TRUE(vma);
  EXPECT_EQ(vma->vm_flags & (kVmIo | kVmPfnmap), kVmIo | kVmPfnmap);
  Page page;
  EXPECT_EQ(gup(r.start, 0, &page), -EFAULT) << "GUP refuses VM_IO|VM_PFNMAP";
  EXPECT_FALSE(host->get_user_page_fast_only(r.start, kFollWrite, &page));
  host->mmap_read_lock();
  PfnmapPte pte;
  EXPECT_EQ(host->follow_pfnmap(r.start, &pte), -ENOENT);
  bool unlocked = true;
  EXPECT_EQ(host->fixup_user_fault(r.start, true, &unlocked), 0);
  EXPECT_FALSE(unlocked);
  ASSERT_EQ(host->follow_pfnmap(r.start, &pte), 0);
  EXPECT_TRUE(pte.writable);
  EXPECT_FALSE(host->pfn_to_refcounted_page(pte.pfn, r.start));
  host->mmap_read_unlock();
  EXPECT_EQ(host->outstanding_refs(), 0u);
  // Not a PFNMAP VMA: -EINVAL.
  RegionInfo anon = make(RegionKind::kAnonymous, kPageSize);
  host->mmap_read_lock();
  EXPECT_EQ(host->follow_pfnmap(anon.start, &pte), -EINVAL);
  host->mmap_read_unlock();
}

TEST_F(LinuxHostTest, Row20_ReadOnlyDevicePte) {
  RegionInfo r = make(RegionKind::kDevice, 2 * kPageSize, PROT_READ);
  host->mmap_read_lock();
  bool unlocked = false;
  EXPECT_EQ(host->fixup_user_fault(r.start, true, &unlocked), -EFAULT);
  EXPECT_EQ(host->fixup_user_fault(r.start, false, &unlocked), 0);
  PfnmapPte pte;
  ASSERT_EQ(host->follow_pfnmap(r.start, &pte), 0);
  EXPECT_FALSE(pte.writable);
  host->mmap_read_unlock();
}

TEST_F(LinuxHostTest, Row14_NowaitOnFilePageNotInPageCache) {
  TempFile f(16 * kPageSize, 1);
  ASSERT_GE(f.fd, 0);
  ASSERT_EQ(fdatasync(f.fd), 0);
  ASSERT_EQ(posix_fadvise(f.fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  RegionInfo r = make(RegionKind::kFileShared, 16 * kPageSize, PROT_READ | PROT_WRITE, f.fd);
  unsigned char v = 1;
  ASSERT_EQ(mincore(testing::hva_ptr(r.start + 5 * kPageSize), kPageSize, &v), 0);
  if (v & 1) GTEST_SKIP() << "the file page stayed in the page cache; cannot test NOWAIT";
  Page page;
  EXPECT_EQ(gup(r.start + 5 * kPageSize, kFollNowait, &page), 0)
      << "NOWAIT must not wait for file I/O";
  EXPECT_EQ(host->stats().nowait_needs_io, 1u);
  ASSERT_EQ(gup(r.start + 5 * kPageSize, 0, &page), 1) << "the synchronous retry reads it";
  EXPECT_EQ(hva_bytes(r.start + 5 * kPageSize)[0], 5);
  host->put_page(page);
  // Anonymous memory never needs I/O: NOWAIT faults it in.
  RegionInfo anon = make(RegionKind::kAnonymous, kPageSize);
  ASSERT_EQ(gup(anon.start, kFollNowait | kFollWrite, &page), 1);
  host->put_page(page);
}

TEST_F(LinuxHostTest, Row10_InterruptibleWaitForFileIo) {
  TempFile f(4 * kPageSize, 1);
  ASSERT_GE(f.fd, 0);
  ASSERT_EQ(fdatasync(f.fd), 0);
  ASSERT_EQ(posix_fadvise(f.fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  RegionInfo r = make(RegionKind::kFileShared, 4 * kPageSize, PROT_READ | PROT_WRITE, f.fd);
  unsigned char v = 1;
  ASSERT_EQ(mincore(testing::hva_ptr(r.start + 2 * kPageSize), kPageSize, &v), 0);
  if (v & 1) GTEST_SKIP() << "the file page stayed in the page cache; nothing to wait for";
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &set, &old), 0);
  pthread_kill(pthread_self(), SIGUSR2);
  Page page;
  EXPECT_EQ(gup(r.start + 2 * kPageSize, kFollInterruptible, &page), -EINTR)
      << "a pending signal ends an interruptible wait for I/O";
  EXPECT_TRUE(host->signal_pending()) << "and stays pending";
  ASSERT_EQ(gup(r.start + 2 * kPageSize, 0, &page), 1) << "without INTERRUPTIBLE it waits";
  host->put_page(page);
  timespec zero{0, 0};
  EXPECT_EQ(sigtimedwait(&set, nullptr, &zero), SIGUSR2);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

TEST_F(LinuxHostTest, FileSharedWriteReachesTheFile) {
  TempFile f(4 * kPageSize, 0);
  RegionInfo r = make(RegionKind::kFileShared, 4 * kPageSize, PROT_READ | PROT_WRITE, f.fd);
  Page page;
  ASSERT_EQ(gup(r.start + kPageSize, kFollWrite, &page), 1);
  host->page_address(page.pfn, page.hva)[7] = std::byte{0x77};
  host->set_page_dirty(page);
  host->put_page(page);
  unsigned char b = 0;
  ASSERT_EQ(pread(f.fd, &b, 1, kPageSize + 7), 1);
  EXPECT_EQ(b, 0x77);
}

TEST_F(LinuxHostTest, ThpMappingLevelIs2M) {
  const std::string& thp = host_facts().thp_enabled;
  if (thp.empty() || thp == "never") GTEST_SKIP() << "THP is " << (thp.empty() ? "not built" : thp);
  RegionInfo r = make(RegionKind::kThp, 4 * k2M);
  const Hva block((r.start.value + k2M - 1) & ~(k2M - 1));
  Page page;
  ASSERT_EQ(gup(block + 5 * kPageSize, kFollWrite, &page), 1);
  host->put_page(page);
  if (host->host_mapping_level(block) != PgLevel::k2M) {
    GTEST_SKIP() << "no THP was allocated for the 2M block (THP " << thp << ", memory fragmented)";
  }
  // The whole block is present now: a neighbour hits the fast path.
  Page fast;
  ASSERT_TRUE(host->get_user_page_fast_only(block + 300 * kPageSize, kFollWrite, &fast));
  if (host->pfns_are_physical()) {
    EXPECT_EQ(fast.pfn.value, page.pfn.value - 5 + 300);
  }
  host->put_page(fast);
  RegionInfo small = make(RegionKind::kAnonymous, 4 * k2M);
  const Hva sblock((small.start.value + k2M - 1) & ~(k2M - 1));
  ASSERT_EQ(gup(sblock, kFollWrite, &page), 1);
  host->put_page(page);
  EXPECT_EQ(host->host_mapping_level(sblock), PgLevel::k4K) << "MADV_NOHUGEPAGE region";
}

TEST_F(LinuxHostTest, HugetlbNeedsAPool) {
  RegionSpec spec;
  spec.kind = RegionKind::kHugetlb2M;
  spec.size = k2M;
  auto r = host->create_region(spec);
  if (!r.ok()) {
    EXPECT_NE(r.error().message.find("hugetlb"), std::string::npos);
    GTEST_SKIP() << "hugetlb pool is empty: " << error_to_string(r.error());
  }
  Page page;
  ASSERT_EQ(gup(r->start, kFollWrite, &page), 1);
  EXPECT_EQ(host->host_mapping_level(r->start), PgLevel::k2M);
  host->put_page(page);
}

TEST_F(LinuxHostTest, RegisterExistingMapping) {
  void* p = mmap(nullptr, 8 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  RegionSpec spec;
  spec.kind = RegionKind::kAnonymous;
  spec.addr = Hva(reinterpret_cast<uint64_t>(p));
  spec.size = 8 * kPageSize;
  auto r = host->register_region(spec);
  ASSERT_TRUE(r.ok()) << error_to_string(r.error());
  EXPECT_FALSE(r->owned);
  Page page;
  ASSERT_EQ(gup(spec.addr, kFollWrite, &page), 1);
  host->put_page(page);
  ASSERT_TRUE(host->unregister_region(spec.addr).ok());
  EXPECT_FALSE(host->vma_lookup(spec.addr));
  static_cast<char*>(p)[0] = 1;  // still mapped: LinuxHost did not own it
  munmap(p, 8 * kPageSize);
}

TEST_F(LinuxHostTest, BadInputGivesClearErrors) {
  RegionInfo r = make(RegionKind::kAnonymous, 8 * kPageSize);
  RegionSpec spec;
  spec.kind = RegionKind::kAnonymous;
  spec.addr = r.start + 1;
  spec.size = kPageSize;
  EXPECT_EQ(host->register_region(spec).code(), EINVAL) << "unaligned";
  spec.addr = r.start + kPageSize;
  auto overlap = host->register_region(spec);
  EXPECT_EQ(overlap.code(), EEXIST) << "overlapping registration";
  EXPECT_NE(overlap.error().message.find("overlaps"), std::string::npos);
  spec.size = 0;
  EXPECT_EQ(host->register_region(spec).code(), EINVAL) << "empty";
  // An unmapped range.
  void* p = mmap(nullptr, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  munmap(p, kPageSize);
  spec.addr = Hva(reinterpret_cast<uint64_t>(p));
  spec.size = kPageSize;
  EXPECT_EQ(host->register_region(spec).code(), EFAULT);
  // A closed file.
  int fd = open("/dev/null", O_RDONLY);
  close(fd);
  RegionSpec file;
  file.kind = RegionKind::kFileShared;
  file.size = kPageSize;
  file.fd = fd;
  auto closed = host->create_region(file);
  EXPECT_EQ(closed.code(), EBADF);
  file.fd = -1;
  EXPECT_EQ(host->create_region(file).code(), EBADF);
  RegionSpec zero;
  zero.size = 0;
  EXPECT_EQ(host->create_region(zero).code(), EINVAL);
  zero.size = kPageSize;
  zero.prot = 0x100;
  EXPECT_EQ(host->create_region(zero).code(), EINVAL);
  EXPECT_EQ(host->discard(r.start + 1, kPageSize).code(), EINVAL);
  EXPECT_EQ(host->discard(Hva(0x10000), kPageSize).code(), EINVAL);
  EXPECT_EQ(host->protect(r.start, 3, PROT_READ).code(), EINVAL);
  EXPECT_EQ(host->unmap(r.start, 0).code(), EINVAL);
  EXPECT_EQ(host->poison(r.start, kPageSize).code(), EINVAL) << "poison needs a lazy region";
  EXPECT_EQ(host->unregister_region(r.start + kPageSize).code(), ENOENT);
  Page page;
  EXPECT_EQ(host->get_user_pages_unlocked(r.start, kFollWrite, nullptr), -EFAULT);
  Page foreign{reinterpret_cast<HostMm*>(&spec), Pfn(1), r.start, false};
  host->put_page(foreign);
  EXPECT_EQ(host->stats().bad_puts, 1u);
  host->put_page(Page{host.get(), Pfn(1), r.start, false});  // never handed out
  EXPECT_EQ(host->stats().bad_puts, 2u);
  // Reset the counter expectation of TearDown: this test made bad puts on purpose.
  auto fresh = LinuxHost::create();
  ASSERT_TRUE(fresh.ok());
  host->unregister_notifier(&notifier);
  host = std::move(*fresh);
  host->register_notifier(&notifier);
  (void)page;
}

TEST_F(LinuxHostTest, Invariant10_SignalPendingSeesBlockedSignals) {
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &set, &old), 0);
  EXPECT_FALSE(host->signal_pending());
  pthread_kill(pthread_self(), SIGUSR2);
  EXPECT_TRUE(host->signal_pending());
  EXPECT_FALSE(host->fatal_signal_pending());
  // A pending signal does not stop a fault that need not wait (the kernel checks signals only
  // while waiting).
  RegionInfo r = make(RegionKind::kAnonymous, kPageSize);
  Page page;
  ASSERT_EQ(gup(r.start, kFollWrite | kFollInterruptible, &page), 1);
  host->put_page(page);
  timespec zero{0, 0};
  EXPECT_EQ(sigtimedwait(&set, nullptr, &zero), SIGUSR2);
  EXPECT_FALSE(host->signal_pending());
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Fault-around (LinuxHost::Options::fault_around).

std::unique_ptr<LinuxHost> host_with(FaultAround policy, uint32_t pages = 64) {
  LinuxHost::Options o;
  o.fault_around = policy;
  o.fault_around_pages = pages;
  auto h = LinuxHost::create(o);
  EXPECT_TRUE(h.ok()) << error_to_string(h.error());
  return h.ok() ? std::move(*h) : nullptr;
}

RegionInfo region_of(LinuxHost& host, uint64_t pages, RegionKind kind = RegionKind::kAnonymous) {
  RegionSpec spec;
  spec.kind = kind;
  spec.size = pages * kPageSize;
  auto r = host.create_region(spec);
  EXPECT_TRUE(r.ok()) << error_to_string(r.error());
  return r.ok() ? *r : RegionInfo{};
}

// One access as the resolver makes it: the fast path, else the slow path. Returns whether the
// slow path ran (and so whether the page had not been populated ahead).
bool touch(LinuxHost& host, Hva hva, bool write = true) {
  const FollFlags f = write ? kFollWrite : 0;
  Page p;
  if (host.get_user_page_fast_only(hva, f, &p)) {
    host.put_page(p);
    return false;
  }
  EXPECT_EQ(host.get_user_pages_unlocked(hva, f | kFollHwpoison, &p), 1) << hva.value;
  host.put_page(p);
  return true;
}

bool populated(LinuxHost& host, Hva hva, bool write = true) {
  Page p;
  if (!host.get_user_page_fast_only(hva, write ? kFollWrite : 0, &p)) return false;
  host.put_page(p);
  return true;
}

// Pages of [start, start + pages) the kernel has in memory (mincore).
uint64_t resident(Hva start, uint64_t pages) {
  std::vector<unsigned char> v(pages);
  if (mincore(reinterpret_cast<void*>(start.value), pages * kPageSize, v.data()) != 0) return ~0ull;
  uint64_t n = 0;
  for (unsigned char b : v) n += b & 1;
  return n;
}

TEST(LinuxHostFaultAround, BadOptionsAreEinval) {
  for (uint32_t pages : {0u, 1u, 3u, 48u, 1024u}) {
    LinuxHost::Options o;
    o.fault_around_pages = pages;
    auto h = LinuxHost::create(o);
    EXPECT_EQ(h.code(), EINVAL) << pages;
    EXPECT_NE(error_to_string(h.error()).find("power of two"), std::string::npos);
  }
  LinuxHost::Options o;
  o.fault_around = static_cast<FaultAround>(7);
  EXPECT_EQ(LinuxHost::create(o).code(), EINVAL);
  EXPECT_EQ(LinuxHost::Options{}.fault_around, FaultAround::kSequential) << "the default";
}

TEST(LinuxHostFaultAround, FixedPopulatesTheAlignedWindow) {
  auto host = host_with(FaultAround::kFixed, 16);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 64);
  const Hva window((r.start.value + 16 * kPageSize - 1) & ~(16 * kPageSize - 1));
  EXPECT_TRUE(touch(*host, window + 3 * kPageSize));
  for (uint64_t i = 0; i < 16; ++i) EXPECT_TRUE(populated(*host, window + i * kPageSize)) << i;
  EXPECT_FALSE(populated(*host, window + 16 * kPageSize));
  EXPECT_EQ(host->stats().populated_ahead, 15u);
  EXPECT_EQ(host->outstanding_refs(), 0u);
}

// A sequential run doubles its window from the page where the last one ended (2, 4, ... up to
// fault_around_pages), and stops at the region's end: 10 slow-path faults for 256 pages.
TEST(LinuxHostFaultAround, SequentialRunDoublesItsWindowUpToTheLimit) {
  auto host = host_with(FaultAround::kSequential, 64);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 256);
  std::vector<uint64_t> slow;
  for (uint64_t i = 0; i < 256; ++i) {
    if (touch(*host, r.start + i * kPageSize)) slow.push_back(i);
    if (i == 10) {
      // After page 10 the run's last window is [7, 15): nothing beyond is populated, nor in memory.
      EXPECT_TRUE(populated(*host, r.start + 14 * kPageSize));
      EXPECT_FALSE(populated(*host, r.start + 15 * kPageSize));
      EXPECT_EQ(resident(r.start + 15 * kPageSize, 256 - 15), 0u);
    }
  }
  EXPECT_EQ(slow, (std::vector<uint64_t>{0, 1, 3, 7, 15, 31, 63, 127, 191, 255}));
  EXPECT_EQ(host->stats().populated_ahead, 256u - slow.size());
  EXPECT_EQ(host->outstanding_refs(), 0u);
}

// Random (and strided) faults never continue a run: each populates its own page, as KVM's GUP.
TEST(LinuxHostFaultAround, NonSequentialFaultsPopulateOnlyTheirPage) {
  auto host = host_with(FaultAround::kSequential, 64);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 256);
  const uint64_t order[] = {10, 50, 30, 70, 20, 90, 12, 14, 16, 200, 100};
  for (uint64_t i : order) EXPECT_TRUE(touch(*host, r.start + i * kPageSize)) << i;
  EXPECT_EQ(host->stats().populated_ahead, 0u);
  EXPECT_EQ(resident(r.start, 256), std::size(order)) << "only the touched pages are allocated";
  EXPECT_FALSE(populated(*host, r.start + 11 * kPageSize));
}

// Two vCPUs each touching their own half of one region: both runs are followed.
TEST(LinuxHostFaultAround, InterleavedRunsRampSeparately) {
  auto host = host_with(FaultAround::kSequential, 64);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 512);
  uint64_t slow = 0;
  for (uint64_t i = 0; i < 256; ++i) {
    slow += touch(*host, r.start + i * kPageSize);
    slow += touch(*host, r.start + (256 + i) * kPageSize);
  }
  EXPECT_EQ(slow, 20u) << "10 slow-path faults per run, as for one run alone";
}

TEST(LinuxHostFaultAround, OffPopulatesOnePagePerFault) {
  auto host = host_with(FaultAround::kOff);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 64);
  for (uint64_t i = 0; i < 64; ++i) EXPECT_TRUE(touch(*host, r.start + i * kPageSize)) << i;
  EXPECT_EQ(host->stats().populated_ahead, 0u);
}

// A window never leaves the piece of the region the fault is in: a PROT_NONE piece after it is
// not populated and still gives EFAULT, and a read run populates for read (the zero page where the host has it).
TEST(LinuxHostFaultAround, WindowStaysInsideItsPieceAndItsAccessKind) {
  auto host = host_with(FaultAround::kSequential, 64);
  ASSERT_TRUE(host);
  RegionInfo r = region_of(*host, 128);
  ASSERT_TRUE(host->protect(r.start + 40 * kPageSize, 88 * kPageSize, PROT_NONE).ok());
  for (uint64_t i = 0; i < 40; ++i) (void)touch(*host, r.start + i * kPageSize);
  EXPECT_EQ(resident(r.start + 40 * kPageSize, 88), 0u);
  Page p;
  EXPECT_EQ(host->get_user_pages_unlocked(r.start + 40 * kPageSize, kFollWrite, &p), -EFAULT);
  EXPECT_EQ(host->stats().populated_ahead, 40u - 6) << "slow at 0, 1, 3, 7, 15, 31 (then [31, 40))";

  RegionInfo rd = region_of(*host, 64);
  uint64_t slow = 0;
  for (uint64_t i = 0; i < 64; ++i) slow += touch(*host, rd.start + i * kPageSize, false);
  EXPECT_EQ(slow, 7u);
  EXPECT_EQ(populated(*host, rd.start + 5 * kPageSize, /*write=*/true), !host->zero_page())
      << "read-ahead maps the zero page read-only where the host has it, fresh writable pages "
         "where it does not";
  EXPECT_EQ(host->outstanding_refs(), 0u);
}

// A write window stops at a page known present read-only (here one shared with a forked child,
// read-only on every kernel): populating it for write would replace that page under its
// translations unannounced. The write that reaches it breaks it the announced way (an
// invalidation covering the page).
TEST(LinuxHostFaultAround, WriteWindowStopsAtAReadOnlyPage) {
  for (FaultAround policy : {FaultAround::kSequential, FaultAround::kFixed}) {
    SCOPED_TRACE(std::string(to_string(policy)));
    auto host = host_with(policy, 16);
    ASSERT_TRUE(host);
    RecordingNotifier notifier;
    host->register_notifier(&notifier);
    RegionInfo r = region_of(*host, 64);
    const Hva window((r.start.value + 16 * kPageSize - 1) & ~(16 * kPageSize - 1));
    hva_bytes(window + 5 * kPageSize)[0] = 1;  // present before the fork: shared with the child
    testing::ForkedSharer child;
    ASSERT_TRUE(child.ok());
    EXPECT_TRUE(touch(*host, window + 5 * kPageSize, /*write=*/false));
    // Read-only now: page 5 (sequential: a new run populates its page alone), and with a fixed
    // window the other pages of it too where the read mapped the zero page.
    std::vector<bool> read_only(16);
    for (uint64_t i = 0; i < 16; ++i) {
      const Hva h = window + i * kPageSize;
      read_only[i] = populated(*host, h, false) && !populated(*host, h, true);
    }
    EXPECT_TRUE(read_only[5]);
    EXPECT_EQ(read_only[4], policy == FaultAround::kFixed && host->zero_page());
    for (uint64_t i = 0; i < 16; ++i) (void)touch(*host, window + i * kPageSize);
    for (uint64_t i = 0; i < 16; ++i) {
      EXPECT_EQ(notifier.covered(window.value + i * kPageSize), read_only[i])
          << "page " << i << ": a read-only translation must die with an invalidation, and"
          << " only such a page needs one";
      EXPECT_TRUE(populated(*host, window + i * kPageSize, true)) << i;
    }
    EXPECT_EQ(notifier.in_progress, 0);
    host->unregister_notifier(&notifier);
    EXPECT_EQ(host->outstanding_refs(), 0u);
  }
}

// A window whose populate fails (here it crosses the end of the memfd: SIGBUS there) falls back
// to the faulting page alone; every page before the end is still served, the first one past it
// gives EFAULT, and nothing past it was populated.
TEST(LinuxHostFaultAround, FailedWindowFallsBackToThePage) {
  auto host = host_with(FaultAround::kSequential, 64);
  ASSERT_TRUE(host);
  const int fd = memfd_create("gfnmap-fault-around", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 20 * kPageSize), 0);
  RegionSpec spec;
  spec.kind = RegionKind::kMemfdShared;
  spec.size = 64 * kPageSize;
  spec.fd = fd;
  auto r = host->create_region(spec);
  ASSERT_TRUE(r.ok()) << error_to_string(r.error());
  for (uint64_t i = 0; i < 20; ++i) (void)touch(*host, r->start + i * kPageSize);
  Page p;
  EXPECT_EQ(host->get_user_pages_unlocked(r->start + 20 * kPageSize, kFollWrite, &p), -EFAULT);
  EXPECT_LT(host->stats().populated_ahead, 20u);
  EXPECT_EQ(host->outstanding_refs(), 0u);
  (void)host->unregister_region(r->start);
  close(fd);
}

// The errnos MADV_POPULATE_* gives (Linux 5.14 and later), which the slow path classifies.
TEST(LinuxKernelFacts, MadvPopulateErrnos) {
  void* ro = mmap(nullptr, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(ro, MAP_FAILED);
  EXPECT_EQ(madvise(ro, kPageSize, MADV_POPULATE_WRITE), -1);
  EXPECT_EQ(errno, EINVAL) << "write to PROT_READ";
  EXPECT_EQ(madvise(ro, kPageSize, MADV_POPULATE_READ), 0);
  mprotect(ro, kPageSize, PROT_NONE);
  EXPECT_EQ(madvise(ro, kPageSize, MADV_POPULATE_READ), -1);
  EXPECT_EQ(errno, EINVAL) << "PROT_NONE";
  munmap(ro, kPageSize);
  EXPECT_EQ(madvise(ro, kPageSize, MADV_POPULATE_READ), -1);
  EXPECT_EQ(errno, ENOMEM) << "unmapped";
}

}  // namespace
}  // namespace gfnmap
