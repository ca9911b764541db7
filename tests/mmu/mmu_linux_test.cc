// gfnmap MMU tests over real memory (LinuxHost): guest accesses reach the process's pages,
// host discards and protection changes invalidate (invariant 16), THP gives 2M leaves.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/host_facts.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"

namespace gfnmap::test {
namespace {

constexpr uint64_t kGpa = uint64_t{1} << 32;

class MmuLinuxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto h = LinuxHost::create();
    if (!h) GTEST_SKIP() << "real memory unavailable: " << error_to_string(h.error());
    host_ = std::move(*h);
    dirty_ = std::make_unique<DirtyLog>(slots_);
    MmuOptions o;
    o.dirty = dirty_.get();
    mmu_ = std::make_unique<Mmu>(slots_, *host_, o);
  }
  void TearDown() override {
    vcpu_.reset();
    mmu_.reset();
    dirty_.reset();
    if (host_) {
      EXPECT_EQ(host_->outstanding_refs(), 0u);
      for (const auto& r : host_->regions()) (void)host_->unregister_region(r.start);
    }
  }
  RegionInfo region(RegionKind kind, uint64_t size) {
    RegionSpec spec;
    spec.kind = kind;
    spec.size = size;
    auto r = host_->create_region(spec);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : error_to_string(r.error()));
    return r.ok() ? *r : RegionInfo{};
  }
  void slot(uint64_t gpa, uint64_t size, Hva hva, uint32_t flags = 0) {
    UserspaceMemoryRegion r;
    r.flags = flags;
    r.guest_phys_addr = gpa;
    r.memory_size = size;
    r.userspace_addr = hva.value;
    auto res = slots_.set_memory_region(r);
    ASSERT_TRUE(res.ok()) << error_to_string(res.error());
  }
  Vcpu& vcpu() {
    if (!vcpu_) vcpu_ = std::make_unique<Vcpu>(*mmu_, 0);
    return *vcpu_;
  }
  std::byte* at(Hva hva) { return reinterpret_cast<std::byte*>(hva.value); }

  std::unique_ptr<LinuxHost> host_;
  Memslots slots_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  std::unique_ptr<Vcpu> vcpu_;
};

TEST_F(MmuLinuxTest, Real_GuestWritesReachProcessMemory) {
  RegionInfo r = region(RegionKind::kAnonymous, 16 * kPageSize);
  slot(kGpa, 16 * kPageSize, r.start);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa + 3 * kPageSize + 8), 0xfeedULL).ok());
  uint64_t x = 0;
  std::memcpy(&x, at(r.start) + 3 * kPageSize + 8, 8);
  EXPECT_EQ(x, 0xfeedULL);
  std::memcpy(at(r.start) + 5 * kPageSize, "hello", 5);
  char buf[5];
  ASSERT_TRUE(vcpu().read(Gpa(kGpa + 5 * kPageSize), {reinterpret_cast<std::byte*>(buf), 5}).ok());
  EXPECT_EQ(std::memcmp(buf, "hello", 5), 0);
  Vcpu::Translation t = vcpu().translate(Gpa(kGpa + 3 * kPageSize + 8), Access::kRead);
  ASSERT_TRUE(t.exit.ok());
  EXPECT_EQ(t.host_ptr, at(r.start) + 3 * kPageSize + 8);
}

TEST_F(MmuLinuxTest, Invariant16_RealDiscardZapsAndReadsZero) {
  RegionInfo r = region(RegionKind::kAnonymous, 8 * kPageSize);
  slot(kGpa, 8 * kPageSize, r.start);
  for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa + i * kPageSize), i + 1).ok());
  Gfn g0(kGpa >> kPageShift);
  EXPECT_EQ(mmu_->count_mapped(0, g0, g0 + 8), 8u);
  uint64_t seq = mmu_->invalidate_seq();
  ASSERT_TRUE(host_->discard(r.start + 2 * kPageSize, 2 * kPageSize).ok());
  EXPECT_EQ(mmu_->count_mapped(0, g0, g0 + 8), 6u);
  EXPECT_EQ(mmu_->invalidate_seq(), seq + 1);
  uint64_t x = 1;
  ASSERT_TRUE(vcpu().read_u64(Gpa(kGpa + 2 * kPageSize), &x).ok());
  EXPECT_EQ(x, 0u);
  ASSERT_TRUE(vcpu().read_u64(Gpa(kGpa + 4 * kPageSize), &x).ok());
  EXPECT_EQ(x, 5u);
}

TEST_F(MmuLinuxTest, Real_ProtectReadOnlyMakesWritesFaultEfault) {
  RegionInfo r = region(RegionKind::kAnonymous, 4 * kPageSize);
  slot(kGpa, 4 * kPageSize, r.start);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa), 1).ok());
  ASSERT_TRUE(host_->protect(r.start, 4 * kPageSize, PROT_READ).ok());
  EXPECT_EQ(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte, 0u);
  uint64_t x = 0;
  ASSERT_TRUE(vcpu().read_u64(Gpa(kGpa), &x).ok());
  EXPECT_EQ(x, 1u);
  EXPECT_FALSE(mmu_->lookup(0, Gfn(kGpa >> kPageShift)).spte & spte::kWritable);
  VcpuExit ex = vcpu().write_u64(Gpa(kGpa), 2);
  EXPECT_EQ(ex.reason, ExitReason::kMemoryFault);
  EXPECT_EQ(ex.error, EFAULT);
  ASSERT_TRUE(host_->protect(r.start, 4 * kPageSize, PROT_READ | PROT_WRITE).ok());
  EXPECT_TRUE(vcpu().write_u64(Gpa(kGpa), 2).ok());
}

TEST_F(MmuLinuxTest, Real_ThpGives2MLeafWhenTheKernelBacksItHuge) {
  constexpr uint64_t k2M = uint64_t{2} << 20;
  const std::string& thp = host_facts().thp_enabled;
  if (thp.empty() || thp == "never") GTEST_SKIP() << "THP is " << (thp.empty() ? "not built" : thp);
  RegionInfo r = region(RegionKind::kThp, 2 * k2M);
  Hva aligned((r.start.value + k2M - 1) & ~(k2M - 1));
  slot(kGpa, k2M, aligned);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa), 1).ok());
  if (host_->host_mapping_level(aligned) != PgLevel::k2M) {
    GTEST_SKIP() << "the kernel did not back this range with a transparent huge page";
  }
  Mmu::Leaf leaf = mmu_->lookup(0, Gfn(kGpa >> kPageShift));
  EXPECT_EQ(leaf.level, PgLevel::k2M);
  ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa + k2M - 8), 2).ok());
  uint64_t x = 0;
  std::memcpy(&x, at(aligned) + k2M - 8, 8);
  EXPECT_EQ(x, 2u);
}

// LinuxHost's default sequential fault-around under the MMU: a sequential first touch still
// takes one MMU fault and one install per page (the table is per page), but the host populates
// ahead, so almost every fault is resolved by the NOWAIT fast path without a system call.
TEST_F(MmuLinuxTest, Real_SequentialFirstTouchFaultsEveryPageButPopulatesAhead) {
  constexpr uint64_t kPages = 1024;
  RegionInfo r = region(RegionKind::kAnonymous, kPages * kPageSize);
  slot(kGpa, kPages * kPageSize, r.start);
  for (uint64_t i = 0; i < kPages; ++i) {
    ASSERT_TRUE(vcpu().write_u64(Gpa(kGpa + i * kPageSize), i).ok()) << i;
  }
  const MmuStats st = mmu_->stats();
  EXPECT_EQ(st.faults, kPages);
  EXPECT_EQ(st.installs, kPages);
  EXPECT_EQ(st.nowait_hits, kPages);
  EXPECT_GE(host_->stats().populated_ahead, kPages - 32) << "windows of up to 64 pages";
  for (uint64_t i = 0; i < kPages; ++i) {
    uint64_t x = ~0ull;
    std::memcpy(&x, at(r.start) + i * kPageSize, 8);
    ASSERT_EQ(x, i);
  }
}

// What fault-around means for dirty logging: a page populated ahead by a write run is
// host-writable, so a later guest read maps it writable and logs it, as the kernel does for a
// read fault on any host-writable page (spec-notes G1: a VMM that pre-populates guest memory
// sees the same). Over-reporting only, bounded by one window per run; never a missed write.
// With FaultAround::kOff the read follows the host's zero-page fact: it maps the zero page and
// logs nothing where the host has one, as a real guest on untouched anonymous memory; without
// it the read maps a fresh host-writable page, which is logged like any such read (G1).
TEST(MmuLinuxFaultAround, Real_FaultAroundDecidesWhatAReadOfAnUntouchedPageLogs) {
  for (FaultAround policy : {FaultAround::kSequential, FaultAround::kOff}) {
    SCOPED_TRACE(std::string(to_string(policy)));
    LinuxHost::Options ho;
    ho.fault_around = policy;
    auto h = LinuxHost::create(ho);
    if (!h) GTEST_SKIP() << "real memory unavailable: " << error_to_string(h.error());
    LinuxHost& host = **h;
    constexpr uint64_t kPages = 64;
    RegionSpec spec;
    spec.size = kPages * kPageSize;
    auto r = host.create_region(spec);
    ASSERT_TRUE(r.ok());
    Memslots slots;
    DirtyLog dirty(slots);
    MmuOptions o;
    o.dirty = &dirty;
    Mmu mmu(slots, host, o);
    UserspaceMemoryRegion region;
    region.flags = kMemLogDirtyPages;
    region.guest_phys_addr = kGpa;
    region.memory_size = kPages * kPageSize;
    region.userspace_addr = r->start.value;
    ASSERT_TRUE(slots.set_memory_region(region).ok());
    Vcpu vcpu(mmu, 0);
    for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(vcpu.write_u64(Gpa(kGpa + i * kPageSize), 1).ok());
    uint64_t x = ~0ull;
    ASSERT_TRUE(vcpu.read_u64(Gpa(kGpa + 9 * kPageSize), &x).ok());  // never written
    EXPECT_EQ(x, 0u);
    std::vector<uint64_t> bitmap(1);
    ASSERT_TRUE(dirty.get_dirty_log(0, bitmap).ok());
    EXPECT_EQ(bitmap[0] & 0xff, 0xffu) << "every write is logged";
    const bool read_logged = (bitmap[0] >> 9) & 1;
    EXPECT_EQ(read_logged, policy == FaultAround::kSequential || !host.zero_page())
        << "page 9 is host-writable when populated ahead (window [7, 15)) by sequential "
           "fault-around, or when the read found no zero page (zero page: "
        << host.zero_page() << ")";
  }
}

}  // namespace
}  // namespace gfnmap::test
