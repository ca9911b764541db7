// gfnmap tests: the host facts probe (gfnmap/host_facts.h): each fact agrees with what the
// kernel does when asked directly, the probe is cached, and it leaves nothing behind.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "gfnmap/host_facts.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/uffd.h"

namespace gfnmap {
namespace {

// The pagemap entry of one page of this process.
uint64_t pagemap_entry(const void* p) {
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  uint64_t e = 0;
  if (fd >= 0) {
    const auto off = static_cast<off_t>(reinterpret_cast<uint64_t>(p) / kPageSize * 8);
    if (pread(fd, &e, 8, off) != 8) e = 0;
    close(fd);
  }
  return e;
}

size_t count_entries(const char* dir) {
  size_t n = 0;
  if (DIR* d = opendir(dir)) {
    while (readdir(d) != nullptr) ++n;
    closedir(d);
  }
  return n;
}

size_t count_lines(const char* path) {
  std::ifstream in(path);
  size_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

constexpr uint64_t kPmPresent = uint64_t{1} << 63;
constexpr uint64_t kPmExclusive = uint64_t{1} << 56;

// The zero-page fact is what a read fault of fresh private anonymous memory really maps: a page
// mapped exclusively by this process (no zero page) or not (the shared zero page).
TEST(HostFacts, ZeroPageFactIsWhatAReadFaultMaps) {
  const HostFacts facts = probe_host_facts();
  EXPECT_FALSE(facts.zero_page_emulated) << "the probe itself never emulates";
  EXPECT_FALSE(facts.zero_page_how.empty());
  void* p = mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  madvise(p, kPageSize, MADV_NOHUGEPAGE);
  EXPECT_EQ(*static_cast<volatile char*>(p), 0);
  const uint64_t e = pagemap_entry(p);
  munmap(p, kPageSize);
  if (!(e & kPmPresent)) GTEST_SKIP() << "pagemap unreadable: cannot check independently";
  EXPECT_EQ(facts.zero_page, !(e & kPmExclusive))
      << "zero page " << facts.zero_page << " (" << facts.zero_page_how << "), pagemap entry "
      << std::hex << e;
}

TEST(HostFacts, CachedOnceAndEqualToAFreshProbe) {
  const HostFacts& a = host_facts();
  EXPECT_EQ(&a, &host_facts()) << "probed once";
  const HostFacts b = probe_host_facts();
  EXPECT_EQ(a.kernel_release, b.kernel_release);
  EXPECT_EQ(a.zero_page && !a.zero_page_emulated, b.zero_page);
  EXPECT_EQ(a.thp_enabled, b.thp_enabled);
  EXPECT_EQ(a.uffd_features, b.uffd_features);
  EXPECT_EQ(a.pagemap_pfns, b.pagemap_pfns);
  EXPECT_EQ(a.kvm, b.kvm);
  EXPECT_FALSE(a.kernel_release.empty());
}

// The probe maps, opens and faults in a few pages: afterwards the process has the same file
// descriptors, and 20 more probes add no mapping (the allocator may keep a region or two of its
// own after the warm-up, under a sanitizer more; a leak of the probe's 3 mappings per run would
// add 60).
TEST(HostFacts, ProbeLeavesNoMappingOrFdBehind) {
  for (int i = 0; i < 3; ++i) (void)probe_host_facts();  // warm up allocator and libc state
  const size_t maps = count_lines("/proc/self/maps");
  const size_t fds = count_entries("/proc/self/fd");
  for (int i = 0; i < 20; ++i) (void)probe_host_facts();
  EXPECT_LE(count_lines("/proc/self/maps"), maps + 10);
  EXPECT_EQ(count_entries("/proc/self/fd"), fds);
}

// The /dev/kvm fact agrees with opening it, and says why when it cannot be used.
TEST(HostFacts, KvmFactAgreesWithOpeningDevKvm) {
  const HostFacts& facts = host_facts();
  const int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  const int e = errno;
  if (fd >= 0) close(fd);
  EXPECT_EQ(facts.kvm_available(), fd >= 0) << facts.kvm_why;
  EXPECT_EQ(facts.kvm_why.empty(), facts.kvm_available());
  if (fd < 0 && e == ENOENT) {
    EXPECT_TRUE(facts.kvm == KvmStatus::kNoModule || facts.kvm == KvmStatus::kModuleRefused)
        << to_string(facts.kvm);
    EXPECT_EQ(facts.kvm == KvmStatus::kModuleRefused, access("/sys/module/kvm", F_OK) == 0);
  }
}

// The hugetlb pool fact decides whether a hugetlb region can be created.
TEST(HostFacts, HugetlbPoolFactDecidesHugetlbRegions) {
  const HostFacts& facts = host_facts();
  auto host = LinuxHost::create();
  ASSERT_TRUE(host.ok());
  RegionSpec spec;
  spec.kind = RegionKind::kHugetlb2M;
  spec.size = uint64_t{2} << 20;
  auto r = (*host)->create_region(spec);
  if (facts.hugetlb_2m_free == 0) {
    EXPECT_EQ(r.code(), ENOMEM) << "an empty 2M pool";
  } else {
    EXPECT_TRUE(r.ok()) << error_to_string(r.error());
  }
}

// The userfaultfd fact decides whether a page server can be made, and with which features.
TEST(HostFacts, UserfaultfdFactDecidesPageServers) {
  const HostFacts& facts = host_facts();
  uffd::ZeroSource zero;
  auto server = uffd::PageServer::create(zero, {});
  EXPECT_EQ(server.ok(), facts.uffd_available()) << facts.uffd_why;
  if (server.ok()) {
    EXPECT_EQ((*server)->features().features & ~facts.uffd_features, 0u)
        << "a server never enables a feature the probe did not see";
  }
}

// The pagemap fact decides what LinuxHost's pfns are.
TEST(HostFacts, PagemapFactDecidesLinuxHostPfns) {
  auto host = LinuxHost::create();
  ASSERT_TRUE(host.ok());
  EXPECT_EQ((*host)->pfns_are_physical(), host_facts().pagemap_pfns);
  EXPECT_EQ((*host)->has_pagemap_scan(), host_facts().pagemap_scan);
}

TEST(HostFacts, KvmStatusNames) {
  EXPECT_EQ(to_string(KvmStatus::kAvailable), "available");
  EXPECT_EQ(to_string(KvmStatus::kModuleRefused), "module-refused");
  EXPECT_EQ(to_string(static_cast<KvmStatus>(99)), "?");
}

}  // namespace
}  // namespace gfnmap
