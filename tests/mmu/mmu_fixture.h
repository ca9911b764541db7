// gfnmap MMU tests: a fixture with the host model, memslots, a dirty log and an Mmu, plus
// helpers to map host memory and create slots.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "gfnmap/dirty.h"
#include "gfnmap/memslot.h"
#include "gfnmap/mmu.h"
#include "gfnmap/sim_host.h"

namespace gfnmap::test {

inline constexpr uint64_t k2M = uint64_t{2} << 20;

class MmuTest : public ::testing::Test {
 protected:
  void SetUp() override { make_mmu({}); }

  void make_mmu(MmuOptions options, bool with_dirty = true) {
    vcpus_.clear();
    mmu_.reset();
    dirty_.reset();
    if (with_dirty) dirty_ = std::make_unique<DirtyLog>(slots_);
    options.dirty = dirty_.get();
    mmu_ = std::make_unique<Mmu>(slots_, host_, std::move(options));
  }

  // A new Mmu whose DirtyLog has per-vCPU dirty rings of ring_bytes (enabled before any vCPU).
  void make_mmu_with_dirty_ring(uint32_t ring_bytes) {
    vcpus_.clear();
    mmu_.reset();
    dirty_ = std::make_unique<DirtyLog>(slots_);
    ASSERT_TRUE(dirty_->enable_dirty_ring(ring_bytes).ok());
    MmuOptions o;
    o.dirty = dirty_.get();
    mmu_ = std::make_unique<Mmu>(slots_, host_, o);
  }

  void TearDown() override {
    vcpus_.clear();
    mmu_.reset();
    EXPECT_EQ(host_.outstanding_refs(), 0u) << "references leaked";
    EXPECT_EQ(host_.violations(), 0u) << (host_.violations() ? host_.violation_log()[0].what : "");
  }

  Hva map(uint64_t size, Prot prot = kProtRW, VmaKind kind = VmaKind::kAnonPrivate,
          MmapOptions options = {}) {
    auto r = host_.mmap(size, prot, kind, options);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : error_to_string(r.error()));
    return r.ok() ? *r : Hva(0);
  }

  void add_slot(uint16_t id, uint64_t gpa, uint64_t size, Hva hva, uint32_t flags = 0) {
    UserspaceMemoryRegion region;
    region.slot = id;
    region.flags = flags;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = hva.value;
    auto r = slots_.set_memory_region(region);
    ASSERT_TRUE(r.ok()) << error_to_string(r.error());
  }

  Result<std::optional<MemslotChange>> set_region(uint16_t id, uint64_t gpa, uint64_t size,
                                                  Hva hva, uint32_t flags = 0) {
    UserspaceMemoryRegion region;
    region.slot = id;
    region.flags = flags;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = hva.value;
    return slots_.set_memory_region(region);
  }

  Vcpu& vcpu(uint32_t id = 0, VcpuOptions options = {}) {
    vcpus_.push_back(std::make_unique<Vcpu>(*mmu_, id, options));
    return *vcpus_.back();
  }

  static std::vector<std::byte> bytes(std::initializer_list<int> v) {
    std::vector<std::byte> out;
    for (int x : v) out.push_back(static_cast<std::byte>(x));
    return out;
  }

  uint64_t balance_gap() const {
    MmuStats s = mmu_->stats();
    return s.faults - (s.installs + s.retries + s.exits + s.async_queued + s.async_halts);
  }

  SimHost host_;
  Memslots slots_;
  std::unique_ptr<DirtyLog> dirty_;
  std::unique_ptr<Mmu> mmu_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
};

}  // namespace gfnmap::test
