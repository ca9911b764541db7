// gfnmap C API: each entry point checks its pointers, calls gfnmap::Vm, and turns a Result or
// an exception into 0 / -errno plus this thread's last-error message.
#include "gfnmap/gfnmap.h"

#include <cerrno>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "gfnmap/vm.h"

// A gfnmap_vm owns its Vm. A gfnmap_vcpu is never defined: the handle is the Vcpu's own
// address (owned by the Vm, so it lives exactly as long as the Vcpu), cast back on each call.
struct gfnmap_vm {
  std::unique_ptr<gfnmap::Vm> vm;
};

namespace gfnmap {
namespace {

static_assert(sizeof(gfnmap_userspace_memory_region) == 32,
              "struct kvm_userspace_memory_region is 32 bytes");
static_assert(GFNMAP_MEM_LOG_DIRTY_PAGES == kMemLogDirtyPages &&
              GFNMAP_MEM_READONLY == kMemReadonly);
static_assert(GFNMAP_DIRTY_LOG_MANUAL_PROTECT_ENABLE == kDirtyLogManualProtectEnable &&
              GFNMAP_DIRTY_LOG_INITIALLY_SET == kDirtyLogInitiallySet);
static_assert(GFNMAP_BACKING_LAZY == static_cast<int>(Backing::kLazy) &&
              GFNMAP_BACKING_FILE_PRIVATE == static_cast<int>(Backing::kFilePrivate));
static_assert(GFNMAP_EXIT_ASYNC_PF_HALT == static_cast<int>(ExitReason::kAsyncPfHalt) &&
              GFNMAP_EXIT_MMIO == static_cast<int>(ExitReason::kMmio));

thread_local std::string t_last_error;

int fail(int code, std::string message) {
  t_last_error = std::string(errno_name(code)) + ": " + std::move(message);
  return -code;
}
int fail(const Error& e) { return fail(e.code, e.message); }

// Runs fn (returning 0 or -errno); an escaping exception becomes -ENOMEM or -EIO.
template <class Fn>
int guarded(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM, "out of memory");
  } catch (const std::exception& e) {
    return fail(EIO, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(EIO, "internal error");
  }
}

int from_exit(const VcpuExit& ex, gfnmap_exit* out) {
  *out = gfnmap_exit{};
  out->reason = static_cast<uint32_t>(ex.reason);
  out->error = ex.error;
  out->bytes_done = ex.bytes_done;
  out->gpa = ex.gpa.value;
  out->hva = ex.hva.value;
  out->token = ex.token;
  out->mmio_len = ex.mmio.len;
  out->mmio_is_write = ex.mmio.is_write ? 1 : 0;
  std::memcpy(out->mmio_data, ex.mmio.data.data(), sizeof out->mmio_data);
  switch (ex.reason) {
    case ExitReason::kMemoryFault: return fail(EFAULT, "guest access: the hva could not be resolved");
    case ExitReason::kIntr: return fail(EINTR, "guest access: interrupted by a signal");
    default: return 0;
  }
}

Vcpu& as_vcpu(gfnmap_vcpu* v) { return *reinterpret_cast<Vcpu*>(v); }

template <class Byte>
bool bad_buffer(const Byte* buf, size_t len) { return buf == nullptr && len != 0; }

#define GFNMAP_REQUIRE(ptr)                                      \
  do {                                                           \
    if ((ptr) == nullptr) return fail(EINVAL, #ptr " is NULL");  \
  } while (0)

}  // namespace
}  // namespace gfnmap

using namespace gfnmap;

extern "C" {

const char* gfnmap_version(void) { return GFNMAP_VERSION_STRING; }

const char* gfnmap_strerror(int err) {
  thread_local std::string text;
  const int code = err < 0 ? -err : err;
  text = std::string(errno_name(code)) + ": " + std::strerror(code);
  return text.c_str();
}

const char* gfnmap_last_error(void) { return t_last_error.c_str(); }

int gfnmap_vm_create(const struct gfnmap_vm_options* options, gfnmap_vm** vm) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    *vm = nullptr;
    VmOptions o;
    if (options != nullptr) {
      if (options->host > GFNMAP_HOST_MODEL) {
        return fail(EINVAL, "gfnmap_vm_options.host " + std::to_string(options->host) +
                                " is not a gfnmap_host");
      }
      if (options->flags & ~uint32_t{GFNMAP_VM_DIRTY_RING_WITH_BITMAP | GFNMAP_VM_PTE_PREFETCH}) {
        return fail(EINVAL, "gfnmap_vm_options.flags has unknown bits");
      }
      o.host = options->host == GFNMAP_HOST_MODEL ? HostKind::kModel : HostKind::kReal;
      o.nr_address_spaces = options->nr_address_spaces == 0 ? 1 : options->nr_address_spaces;
      o.manual_dirty_log_protect = options->manual_dirty_log_protect;
      o.dirty_ring_bytes = options->dirty_ring_bytes;
      o.dirty_ring_with_bitmap = options->flags & GFNMAP_VM_DIRTY_RING_WITH_BITMAP;
      o.pte_prefetch = options->flags & GFNMAP_VM_PTE_PREFETCH;
    }
    auto r = Vm::create(o);
    if (!r) return fail(r.error());
    *vm = new gfnmap_vm{std::move(*r)};
    return 0;
  });
}

void gfnmap_vm_destroy(gfnmap_vm* vm) {
  guarded([&] {
    delete vm;
    return 0;
  });
}

int gfnmap_vm_create_memory(gfnmap_vm* vm, uint32_t backing, uint64_t size,
                            const struct gfnmap_memory_options* options, uint64_t* hva) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    GFNMAP_REQUIRE(hva);
    if (backing > GFNMAP_BACKING_LAZY) {
      return fail(EINVAL, "backing " + std::to_string(backing) + " is not a gfnmap_backing");
    }
    MemoryOptions mo;
    if (options != nullptr) {
      if (options->path != nullptr) mo.path = options->path;
      mo.offset = options->offset;
    }
    auto r = vm->vm->create_memory(static_cast<Backing>(backing), size, mo);
    if (!r) return fail(r.error());
    *hva = r->value;
    return 0;
  });
}

int gfnmap_vm_set_user_memory_region(gfnmap_vm* vm,
                                     const struct gfnmap_userspace_memory_region* region) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    GFNMAP_REQUIRE(region);
    UserspaceMemoryRegion r;
    r.slot = region->slot;
    r.flags = region->flags;
    r.guest_phys_addr = region->guest_phys_addr;
    r.memory_size = region->memory_size;
    r.userspace_addr = region->userspace_addr;
    auto res = vm->vm->set_user_memory_region(r);
    return res ? 0 : fail(res.error());
  });
}

int gfnmap_vm_create_vcpu(gfnmap_vm* vm, uint32_t id, gfnmap_vcpu** vcpu) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    GFNMAP_REQUIRE(vcpu);
    *vcpu = nullptr;
    auto r = vm->vm->create_vcpu(id);
    if (!r) return fail(r.error());
    *vcpu = reinterpret_cast<gfnmap_vcpu*>(*r);
    return 0;
  });
}

int gfnmap_vcpu_read(gfnmap_vcpu* vcpu, uint64_t gpa, void* buf, size_t len,
                     struct gfnmap_exit* exit) {
  return guarded([&] {
    GFNMAP_REQUIRE(vcpu);
    GFNMAP_REQUIRE(exit);
    if (bad_buffer(buf, len)) return fail(EINVAL, "buf is NULL");
    return from_exit(as_vcpu(vcpu).read(Gpa(gpa), {static_cast<std::byte*>(buf), len}), exit);
  });
}

int gfnmap_vcpu_write(gfnmap_vcpu* vcpu, uint64_t gpa, const void* buf, size_t len,
                      struct gfnmap_exit* exit) {
  return guarded([&] {
    GFNMAP_REQUIRE(vcpu);
    GFNMAP_REQUIRE(exit);
    if (bad_buffer(buf, len)) return fail(EINVAL, "buf is NULL");
    return from_exit(
        as_vcpu(vcpu).write(Gpa(gpa), {static_cast<const std::byte*>(buf), len}), exit);
  });
}

int gfnmap_vm_read_guest(gfnmap_vm* vm, uint64_t gpa, void* buf, size_t len,
                         struct gfnmap_exit* exit) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    GFNMAP_REQUIRE(exit);
    if (bad_buffer(buf, len)) return fail(EINVAL, "buf is NULL");
    return from_exit(vm->vm->read_guest(Gpa(gpa), {static_cast<std::byte*>(buf), len}), exit);
  });
}

int gfnmap_vm_write_guest(gfnmap_vm* vm, uint64_t gpa, const void* buf, size_t len,
                          struct gfnmap_exit* exit) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    GFNMAP_REQUIRE(exit);
    if (bad_buffer(buf, len)) return fail(EINVAL, "buf is NULL");
    return from_exit(
        vm->vm->write_guest(Gpa(gpa), {static_cast<const std::byte*>(buf), len}), exit);
  });
}

int gfnmap_vm_get_dirty_log(gfnmap_vm* vm, uint32_t slot, uint64_t* bitmap, size_t words,
                            uint64_t* nr_dirty) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    if (bad_buffer(bitmap, words)) return fail(EFAULT, "bitmap is NULL");
    auto r = vm->vm->get_dirty_log(slot, {bitmap, words});
    if (!r) return fail(r.error());
    if (nr_dirty != nullptr) *nr_dirty = *r;
    return 0;
  });
}

int gfnmap_vm_clear_dirty_log(gfnmap_vm* vm, uint32_t slot, uint64_t first_page,
                              uint32_t num_pages, const uint64_t* bitmap, size_t words,
                              uint64_t* nr_cleared) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    if (bad_buffer(bitmap, words)) return fail(EFAULT, "bitmap is NULL");
    auto r = vm->vm->clear_dirty_log(slot, first_page, num_pages, {bitmap, words});
    if (!r) return fail(r.error());
    if (nr_cleared != nullptr) *nr_cleared = *r;
    return 0;
  });
}

int gfnmap_vcpu_harvest_dirty_ring(gfnmap_vcpu* vcpu, gfnmap_dirty_gfn_fn fn, void* ctx,
                                   uint64_t* count) {
  return guarded([&] {
    GFNMAP_REQUIRE(vcpu);
    GFNMAP_REQUIRE(fn);
    DirtyRing* ring = as_vcpu(vcpu).dirty_ring();
    if (ring == nullptr) return fail(ENXIO, "the VM has no dirty rings");
    const size_t n = ring->harvest([&](uint32_t slot, uint64_t offset) { fn(ctx, slot, offset); });
    if (count != nullptr) *count = n;
    return 0;
  });
}

int gfnmap_vm_reset_dirty_rings(gfnmap_vm* vm, uint64_t* nr_reset) {
  return guarded([&] {
    GFNMAP_REQUIRE(vm);
    auto r = vm->vm->reset_dirty_rings();
    if (!r) return fail(r.error());
    if (nr_reset != nullptr) *nr_reset = *r;
    return 0;
  });
}

}  // extern "C"
