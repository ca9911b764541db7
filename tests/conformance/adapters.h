// gfnmap conformance: one small adapter per host (SimHost, LinuxHost) that builds the same host
// states, so the typed scenarios in conformance_test.cc run unchanged on both.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "gfnmap/linux_host.h"
#include "gfnmap/sim_host.h"
#include "gfnmap/uffd.h"
#include "host_linux/test_util.h"

namespace gfnmap::conformance {

// The kinds of memory a scenario asks for.
enum class Mem {
  kAnon,         // private anonymous, untouched
  kFilePrivate,  // private mapping of a file whose pages are in the page cache
  kDevice,       // VM_IO|VM_PFNMAP device memory, PTEs present
  kUnserved,     // pages whose first access must wait (file I/O on SimHost, an unserved
                 // userfaultfd page on LinuxHost) until serve() is called
};

// ---------------------------------------------------------------------------------------------
// The model, with the host fact `zero page` on (SimAdapter) or off (SimAdapterNoZeroPage), so
// both branches of every zero-page-dependent scenario run on every machine.
template <bool kZeroPage>
class SimAdapterT {
 public:
  static constexpr const char* kName = kZeroPage ? "SimHost" : "SimHostNoZeroPage";
  SimAdapterT() = default;

  HostMm& mm() { return host_; }
  bool distinct_frames() const { return true; }
  bool zero_page() const { return kZeroPage; }
  bool zero_page_emulated() const { return false; }

  Hva map(Mem mem, uint64_t pages, int prot = PROT_READ | PROT_WRITE) {
    Prot p = Prot::kNone;
    if (prot & PROT_READ) p = p | Prot::kRead;
    if (prot & PROT_WRITE) p = p | Prot::kWrite;
    MmapOptions o;
    VmaKind kind = VmaKind::kAnonPrivate;
    switch (mem) {
      case Mem::kAnon:
        break;
      case Mem::kFilePrivate:
        kind = VmaKind::kFilePrivate;
        o.page_cache_resident = true;
        break;
      case Mem::kDevice:
        kind = VmaKind::kPfnmap;
        o.vm_io = true;
        o.ptes_present = true;
        o.ptes_writable = (prot & PROT_WRITE) != 0;
        break;
      case Mem::kUnserved:
        kind = VmaKind::kFileShared;
        o.page_cache_resident = false;
        o.writenotify = false;
        break;
    }
    auto r = host_.mmap(pages * kPageSize, p, kind, o);
    EXPECT_TRUE(r.ok()) << error_to_string(r.error());
    return r.ok() ? *r : Hva();
  }
  // The CPU wrote the page behind the host's back: present and writable, but the host's
  // lockless lookup does not know yet (LinuxHost learns it on the next slow GUP).
  void host_write(Hva hva) {
    ASSERT_TRUE(host_.populate(hva, kPageSize, true).ok());
    ASSERT_TRUE(host_.inject_fast_miss(hva, 1).ok());
  }
  void protect(Hva hva, uint64_t pages, int prot) {
    Prot p = Prot::kNone;
    if (prot & PROT_READ) p = p | Prot::kRead;
    if (prot & PROT_WRITE) p = p | Prot::kWrite;
    ASSERT_TRUE(host_.mprotect(hva, pages * kPageSize, p).ok());
  }
  void unmap(Hva hva, uint64_t pages) { ASSERT_TRUE(host_.munmap(hva, pages * kPageSize).ok()); }
  void poison(Hva hva) { ASSERT_TRUE(host_.poison(hva).ok()); }
  void serve() {}  // SimHost reads pages in synchronously
  void set_pending_signal() { host_.set_signal(SignalState::kPending); }
  void clear_pending_signal() { host_.set_signal(SignalState::kNone); }
  // Bad input: each returns the errno of the failed call (0 when it wrongly succeeded).
  int bad_unaligned() {
    MmapOptions o;
    o.fixed = Hva(0x7f1000000001);
    return host_.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate, o).code();
  }
  int bad_overlap() {
    Hva a = map(Mem::kAnon, 4);
    MmapOptions o;
    o.fixed = a + kPageSize;
    return host_.mmap(kPageSize, kProtRW, VmaKind::kAnonPrivate, o).code();
  }
  int bad_closed_file() {
    MmapOptions o;
    o.file = 4242;  // never created (the model's "closed file")
    return host_.mmap(kPageSize, kProtRW, VmaKind::kFileShared, o).code();
  }
  void check_clean() { EXPECT_EQ(host_.violations(), 0u); }

 private:
  SimHost host_{SimHostConfig{.zero_page = kZeroPage}};
};
using SimAdapter = SimAdapterT<true>;
using SimAdapterNoZeroPage = SimAdapterT<false>;

// ---------------------------------------------------------------------------------------------
// A page source that holds pages back until opened (an unserved userfaultfd page).
class GateSource final : public uffd::PageSource {
 public:
  uffd::Fill fill(uint64_t, std::span<std::byte> dst) override {
    if (!open.load()) return uffd::Fill::kRetry;
    std::memset(dst.data(), 0x5a, dst.size());
    return uffd::Fill::kServed;
  }
  std::atomic<bool> open{false};
};

class LinuxAdapter {
 public:
  static constexpr const char* kName = "LinuxHost";
  LinuxAdapter() {
    auto h = LinuxHost::create();
    EXPECT_TRUE(h.ok());
    host_ = std::move(*h);
  }
  ~LinuxAdapter() {
    gate_.open = true;
    server_.reset();  // before the host
    clear_pending_signal();
  }

  HostMm& mm() { return *host_; }
  bool distinct_frames() const { return host_->pfns_are_physical(); }
  bool zero_page() const { return host_->zero_page(); }  // the probed host fact
  bool zero_page_emulated() const { return host_->zero_page_emulated(); }

  Hva map(Mem mem, uint64_t pages, int prot = PROT_READ | PROT_WRITE) {
    RegionSpec spec;
    spec.size = pages * kPageSize;
    spec.prot = prot;
    switch (mem) {
      case Mem::kAnon:
        spec.kind = RegionKind::kAnonymous;
        break;
      case Mem::kFilePrivate:
        file_ = std::make_unique<testing::TempFile>(pages * kPageSize, 0x33);
        spec.kind = RegionKind::kFilePrivate;
        spec.fd = file_->fd;
        break;
      case Mem::kDevice:
        spec.kind = RegionKind::kDevice;
        break;
      case Mem::kUnserved: {
        if (!server_) {
          auto s = uffd::PageServer::create(gate_, {});
          EXPECT_TRUE(s.ok()) << error_to_string(s.error());
          server_ = std::move(*s);
          EXPECT_TRUE(server_->start().ok());
        }
        auto b = server_->map_lazy(host_.get(), pages * kPageSize, 0, prot);
        EXPECT_TRUE(b.ok()) << error_to_string(b.error());
        return b.ok() ? *b : Hva();
      }
    }
    auto r = host_->create_region(spec);
    EXPECT_TRUE(r.ok()) << error_to_string(r.error());
    if (!r.ok()) return Hva();
    if (mem == Mem::kDevice) {
      // Device PTEs exist from mmap on (remap_pfn_range): fault them in now.
      host_->mmap_read_lock();
      for (uint64_t i = 0; i < pages; ++i) {
        bool unlocked = false;
        EXPECT_EQ(host_->fixup_user_fault(r->start + i * kPageSize, false, &unlocked), 0);
      }
      host_->mmap_read_unlock();
    }
    return r->start;
  }
  void host_write(Hva hva) { std::memset(testing::hva_ptr(hva), 1, kPageSize); }
  void protect(Hva hva, uint64_t pages, int prot) {
    ASSERT_TRUE(host_->protect(hva, pages * kPageSize, prot).ok());
  }
  void unmap(Hva hva, uint64_t pages) { ASSERT_TRUE(host_->unmap(hva, pages * kPageSize).ok()); }
  void poison(Hva hva) {
    gate_.open = true;  // the server must be able to read the REMOVE that poison causes
    auto r = host_->poison(hva, kPageSize);
    ASSERT_TRUE(r.ok()) << error_to_string(r.error());
  }
  void serve() { gate_.open = true; }
  // The vCPU thread's kick signal: blocked, then raised, so it stays pending.
  void set_pending_signal() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, &old_mask_);
    masked_ = true;
    pthread_kill(pthread_self(), SIGUSR1);
  }
  void clear_pending_signal() {
    if (!masked_) return;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    timespec zero{0, 0};
    while (sigtimedwait(&set, nullptr, &zero) == SIGUSR1) {
    }
    pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
    masked_ = false;
  }
  int bad_unaligned() {
    Hva a = map(Mem::kAnon, 4);
    RegionSpec spec;
    spec.addr = a + 1;
    spec.size = kPageSize;
    return host_->register_region(spec).code();
  }
  int bad_overlap() {
    Hva a = map(Mem::kAnon, 4);
    RegionSpec spec;
    spec.addr = a + kPageSize;
    spec.size = kPageSize;
    return host_->register_region(spec).code();
  }
  int bad_closed_file() {
    int fd = dup(0);
    close(fd);
    RegionSpec spec;
    spec.kind = RegionKind::kFileShared;
    spec.size = kPageSize;
    spec.fd = fd;
    return host_->create_region(spec).code();
  }
  void check_clean() { EXPECT_EQ(host_->stats().bad_puts, 0u); }

 private:
  std::unique_ptr<LinuxHost> host_;
  GateSource gate_;
  std::unique_ptr<uffd::PageServer> server_;
  std::unique_ptr<testing::TempFile> file_;
  sigset_t old_mask_{};
  bool masked_ = false;
};

}  // namespace gfnmap::conformance
