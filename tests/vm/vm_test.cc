// gfnmap Vm tests: every backing on both hosts (or the errno the host's facts imply), KVM's
// vocabulary and errnos through the one object, dirty bitmaps and rings, device writes, teardown.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "gfnmap/host_facts.h"
#include "gfnmap/linux_host.h"
#include "gfnmap/sim_host.h"
#include "gfnmap/vm.h"

namespace gfnmap {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGuestBase = 0x100000000;

UserspaceMemoryRegion region(uint32_t slot, uint64_t gpa, uint64_t size, Hva hva,
                             uint32_t flags = 0) {
  return {.slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
          .userspace_addr = hva.value};
}

std::unique_ptr<Vm> make_vm(VmOptions o = {}) {
  auto vm = Vm::create(o);
  EXPECT_TRUE(vm.ok()) << error_to_string(vm.error());
  return vm.ok() ? std::move(*vm) : nullptr;
}

// A unique path for a file the test owns, removed at the end of the test.
class TempPath {
 public:
  TempPath() {
    char tmpl[] = "/tmp/gfnmap-vm-test-XXXXXX";
    int fd = mkstemp(tmpl);
    EXPECT_GE(fd, 0);
    close(fd);
    path_ = tmpl;
  }
  ~TempPath() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes and reads back one word on each of the first and last pages through a vCPU.
void expect_guest_memory_works(Vm& vm, Hva hva, uint64_t size, const char* what) {
  ASSERT_TRUE(vm.set_user_memory_region(region(0, kGuestBase, size, hva)).ok()) << what;
  auto vcpu = vm.create_vcpu(0);
  ASSERT_TRUE(vcpu.ok()) << what;
  for (uint64_t off : {uint64_t{0}, size - kPageSize}) {
    ASSERT_TRUE((*vcpu)->write_u64(Gpa(kGuestBase + off), 0x1234 + off).ok()) << what;
    uint64_t v = 0;
    ASSERT_TRUE((*vcpu)->read_u64(Gpa(kGuestBase + off), &v).ok()) << what;
    EXPECT_EQ(v, 0x1234 + off) << what;
  }
}

TEST(Vm, BackingNamesRoundTrip) {
  for (Backing b : {Backing::kAnonymous, Backing::kThp, Backing::kHugetlb2M, Backing::kHugetlb1G,
                    Backing::kMemfd, Backing::kFileShared, Backing::kFilePrivate,
                    Backing::kLazy}) {
    EXPECT_EQ(backing_from_string(to_string(b)), b) << to_string(b);
  }
  EXPECT_EQ(backing_from_string("hugetlb-2M"), std::nullopt);
  EXPECT_EQ(to_string(HostKind::kModel), "model");
}

TEST(Vm, Model_EveryBackingButLazyServesGuestMemory) {
  for (Backing b : {Backing::kAnonymous, Backing::kThp, Backing::kHugetlb2M, Backing::kMemfd,
                    Backing::kFileShared, Backing::kFilePrivate}) {
    auto vm = make_vm({.host = HostKind::kModel});
    ASSERT_NE(vm, nullptr);
    EXPECT_NE(vm->sim_host(), nullptr);
    EXPECT_EQ(vm->linux_host(), nullptr);
    const uint64_t size = 4 * kMiB;
    auto hva = vm->create_memory(b, size);
    ASSERT_TRUE(hva.ok()) << to_string(b) << ": " << error_to_string(hva.error());
    expect_guest_memory_works(*vm, *hva, size, std::string(to_string(b)).c_str());
  }
  auto vm = make_vm({.host = HostKind::kModel});
  EXPECT_EQ(vm->create_memory(Backing::kLazy, kMiB).code(), EOPNOTSUPP);
  EXPECT_EQ(vm->create_memory(Backing::kFileShared, kMiB, {.path = "/tmp/x"}).code(), EINVAL);
}

TEST(Vm, Real_AnonThpMemfdAndFilesServeGuestMemory) {
  for (Backing b : {Backing::kAnonymous, Backing::kThp, Backing::kMemfd, Backing::kFileShared,
                    Backing::kFilePrivate}) {
    auto vm = make_vm();
    ASSERT_NE(vm, nullptr);
    ASSERT_NE(vm->linux_host(), nullptr);
    const uint64_t size = 4 * kMiB;
    auto hva = vm->create_memory(b, size);
    ASSERT_TRUE(hva.ok()) << to_string(b) << ": " << error_to_string(hva.error());
    expect_guest_memory_works(*vm, *hva, size, std::string(to_string(b)).c_str());
  }
}

// A shared file mapping writes through to the user's file; a private one never does.
TEST(Vm, Real_FileSharedWritesTheFileFilePrivateDoesNot) {
  for (Backing b : {Backing::kFileShared, Backing::kFilePrivate}) {
    TempPath file;
    {
      auto vm = make_vm();
      auto hva = vm->create_memory(b, kMiB, {.path = file.path(), .offset = kPageSize});
      ASSERT_TRUE(hva.ok()) << error_to_string(hva.error());
      ASSERT_TRUE(vm->set_user_memory_region(region(0, kGuestBase, kMiB, *hva)).ok());
      Vcpu* vcpu = *vm->create_vcpu(0);
      ASSERT_TRUE(vcpu->write_u64(Gpa(kGuestBase + 8), 0xfeedface).ok());
    }
    int fd = open(file.path().c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    uint64_t v = 0;
    EXPECT_EQ(pread(fd, &v, 8, static_cast<off_t>(kPageSize + 8)), 8);  // grown to offset + size
    close(fd);
    EXPECT_EQ(v, b == Backing::kFileShared ? 0xfeedfaceu : 0u) << to_string(b);
  }
}

// hugetlb succeeds exactly when the pool has the pages, else the kernel's ENOMEM.
TEST(Vm, Real_Hugetlb2MFollowsThePool) {
  auto vm = make_vm();
  auto hva = vm->create_memory(Backing::kHugetlb2M, 2 * kMiB);
  if (host_facts().hugetlb_2m_free >= 1) {
    ASSERT_TRUE(hva.ok()) << error_to_string(hva.error());
    expect_guest_memory_works(*vm, *hva, 2 * kMiB, "hugetlb-2m");
  } else {
    EXPECT_EQ(hva.code(), ENOMEM) << (hva.ok() ? "mapped" : error_to_string(hva.error()));
  }
  EXPECT_EQ(vm->create_memory(Backing::kHugetlb2M, kMiB).code(), EINVAL);  // not 2M-sized
}

// Lazy restore: the guest reads the snapshot's bytes, served through userfaultfd on demand.
TEST(Vm, Real_LazyMemoryIsRestoredFromTheSnapshot) {
  if (!host_facts().uffd_available()) GTEST_SKIP() << "userfaultfd: " << host_facts().uffd_why;
  TempPath snap;
  const uint64_t size = kMiB;
  std::vector<uint64_t> words(size / 8 + kPageSize / 8);
  for (size_t i = 0; i < words.size(); ++i) words[i] = i * 0x9e3779b97f4a7c15ull;
  {
    int fd = open(snap.path().c_str(), O_WRONLY);
    ASSERT_EQ(write(fd, words.data(), words.size() * 8), static_cast<ssize_t>(words.size() * 8));
    close(fd);
  }
  auto vm = make_vm();
  auto hva = vm->create_memory(Backing::kLazy, size, {.path = snap.path(), .offset = kPageSize});
  ASSERT_TRUE(hva.ok()) << error_to_string(hva.error());
  ASSERT_TRUE(vm->set_user_memory_region(region(0, kGuestBase, size, *hva)).ok());
  Vcpu* vcpu = *vm->create_vcpu(0);
  for (uint64_t off = 0; off < size; off += 37 * kPageSize + 8) {
    uint64_t v = 0;
    ASSERT_TRUE(vcpu->read_u64(Gpa(kGuestBase + off), &v).ok());
    EXPECT_EQ(v, words[(kPageSize + off) / 8]) << "offset " << off;
  }
  // Errors name what is wrong, before any server starts.
  EXPECT_EQ(vm->create_memory(Backing::kLazy, size).code(), EINVAL);
  auto too_short = vm->create_memory(Backing::kLazy, 4 * size, {.path = snap.path()});
  EXPECT_EQ(too_short.code(), EINVAL);
  EXPECT_NE(too_short.error().message.find("fewer than offset + size"), std::string::npos);
  EXPECT_EQ(vm->create_memory(Backing::kLazy, size, {.path = "/nonexistent/snap"}).code(), ENOENT);
}

TEST(Vm, BadOptionsAndArgumentsAreRefusedWithTheFieldNamed) {
  auto bad = Vm::create({.nr_address_spaces = 3});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.code(), EINVAL);
  EXPECT_NE(bad.error().message.find("nr_address_spaces"), std::string::npos);
  auto ring = Vm::create({.host = HostKind::kModel, .dirty_ring_bytes = 1000});
  EXPECT_EQ(ring.code(), EINVAL);
  EXPECT_NE(ring.error().message.find("dirty_ring_bytes"), std::string::npos);
  EXPECT_EQ(Vm::create({.host = HostKind::kModel, .manual_dirty_log_protect = 8}).code(), EINVAL);

  auto vm = make_vm({.host = HostKind::kModel});
  EXPECT_EQ(vm->create_memory(Backing::kAnonymous, 0).code(), EINVAL);
  EXPECT_EQ(vm->create_memory(Backing::kAnonymous, kPageSize + 1).code(), EINVAL);
  auto real = make_vm();
  EXPECT_EQ(real->create_memory(Backing::kAnonymous, kMiB, {.path = "/tmp/x"}).code(), EINVAL);
  EXPECT_EQ(real->create_memory(Backing::kFileShared, kMiB, {.offset = 100}).code(), EINVAL);

  EXPECT_TRUE(vm->create_vcpu(0).ok());
  EXPECT_EQ(vm->create_vcpu(0).code(), EEXIST);
  EXPECT_EQ(vm->create_vcpu(Vm::kMaxVcpus).code(), EINVAL);
  EXPECT_NE(vm->vcpu(0), nullptr);
  EXPECT_EQ(vm->vcpu(1), nullptr);
}

// KVM's memslot errnos and exits come through unchanged.
TEST(Vm, MemslotErrnosAndExitsAreKvms) {
  auto vm = make_vm({.host = HostKind::kModel});
  Hva hva = *vm->create_memory(Backing::kAnonymous, 2 * kMiB);
  ASSERT_EQ(*vm->set_user_memory_region(region(0, kGuestBase, kMiB, hva)),
            MemslotChange::kCreate);
  EXPECT_EQ(vm->set_user_memory_region(region(1, kGuestBase, kMiB, hva + kMiB)).code(), EEXIST);
  EXPECT_EQ(vm->set_user_memory_region(region(1, kGuestBase + 1, kMiB, hva)).code(), EINVAL);
  ASSERT_TRUE(vm->set_user_memory_region(
                    region(1, kGuestBase + kMiB, kMiB, hva + kMiB, kMemReadonly))
                  .ok());
  Vcpu* vcpu = *vm->create_vcpu(0);
  VcpuExit ex = vcpu->write_u64(Gpa(kGuestBase + kMiB), 1);  // read-only slot
  EXPECT_EQ(ex.reason, ExitReason::kMmio);
  EXPECT_TRUE(ex.mmio.is_write);
  uint64_t v;
  EXPECT_EQ(vcpu->read_u64(Gpa(0x1000), &v).reason, ExitReason::kMmio);  // no slot
}

// Bitmaps: vCPU writes and device-model writes are both logged; manual protect clears.
TEST(Vm, DirtyBitmapLogsVcpuAndDeviceWritesAndClears) {
  auto vm = make_vm({.host = HostKind::kModel,
                     .manual_dirty_log_protect = kDirtyLogManualProtectEnable});
  const uint64_t pages = 256;
  Hva hva = *vm->create_memory(Backing::kAnonymous, pages * kPageSize);
  ASSERT_TRUE(vm->set_user_memory_region(
                    region(0, kGuestBase, pages * kPageSize, hva, kMemLogDirtyPages))
                  .ok());
  Vcpu* vcpu = *vm->create_vcpu(0);
  ASSERT_TRUE(vcpu->write_u64(Gpa(kGuestBase + 3 * kPageSize), 1).ok());
  const uint64_t word = 7;
  ASSERT_TRUE(vm->write_guest(Gpa(kGuestBase + 70 * kPageSize),
                              {reinterpret_cast<const std::byte*>(&word), 8})
                  .ok());
  std::vector<uint64_t> bm(dirty_bitmap_words(pages));
  EXPECT_EQ(*vm->get_dirty_log(0, bm), 2u);
  EXPECT_EQ(bm[0], uint64_t{1} << 3);
  EXPECT_EQ(bm[1], uint64_t{1} << 6);
  EXPECT_EQ(*vm->clear_dirty_log(0, 0, pages, bm), 2u);
  std::fill(bm.begin(), bm.end(), 0);
  EXPECT_EQ(*vm->get_dirty_log(0, bm), 0u);
  uint64_t back = 0;
  ASSERT_TRUE(vm->read_guest(Gpa(kGuestBase + 70 * kPageSize),
                             {reinterpret_cast<std::byte*>(&back), 8})
                  .ok());
  EXPECT_EQ(back, word);
}

TEST(Vm, DirtyRingHarvestsVcpuWritesAndResets) {
  auto vm = make_vm({.host = HostKind::kModel, .dirty_ring_bytes = 4096 * 4});
  Hva hva = *vm->create_memory(Backing::kAnonymous, kMiB);
  ASSERT_TRUE(vm->set_user_memory_region(region(2, kGuestBase, kMiB, hva, kMemLogDirtyPages))
                  .ok());
  Vcpu* vcpu = *vm->create_vcpu(5);
  ASSERT_NE(vcpu->dirty_ring(), nullptr);
  for (uint64_t p : {9u, 4u, 200u}) {
    ASSERT_TRUE(vcpu->write_u64(Gpa(kGuestBase + p * kPageSize), p).ok());
  }
  std::vector<uint64_t> offsets;
  vcpu->dirty_ring()->harvest([&](uint32_t slot, uint64_t offset) {
    EXPECT_EQ(slot, 2u);
    offsets.push_back(offset);
  });
  EXPECT_EQ(offsets, (std::vector<uint64_t>{9, 4, 200}));
  EXPECT_EQ(*vm->reset_dirty_rings(), 3u);
  std::vector<uint64_t> bm(dirty_bitmap_words(kMiB / kPageSize));
  EXPECT_EQ(vm->get_dirty_log(2, bm).code(), ENXIO);  // ring-only
}

// Teardown in KVM's order with everything alive: vCPUs mid-use, slots, lazy servers.
TEST(Vm, DestroyWithEverythingAliveReleasesEveryReference) {
  auto vm = make_vm({.host = HostKind::kModel});
  Hva hva = *vm->create_memory(Backing::kMemfd, kMiB);
  ASSERT_TRUE(vm->set_user_memory_region(region(0, kGuestBase, kMiB, hva)).ok());
  for (uint32_t id = 0; id < 4; ++id) {
    Vcpu* v = *vm->create_vcpu(id);
    ASSERT_TRUE(v->write_u64(Gpa(kGuestBase + id * kPageSize), id).ok());
  }
  SimHost* sim = vm->sim_host();
  EXPECT_EQ(sim->outstanding_refs(), 0u);  // the MMU keeps no page references
  EXPECT_EQ(sim->violations(), 0u);
  vm.reset();
}

}  // namespace
}  // namespace gfnmap
