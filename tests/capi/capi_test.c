/* gfnmap C API test (C11, -Wall -Wextra -Werror -pedantic): every entry point, its errnos and
 * exits, on the host model and on real memory; `capi_test lazy` restores from a snapshot. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gfnmap/gfnmap.h"

static int failures;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__,        \
              __LINE__, #cond, gfnmap_last_error());                                \
      ++failures;                                                                   \
    }                                                                               \
  } while (0)

enum { kPage = 4096 };
static const uint64_t kGuestBase = 0x100000000ull;

static gfnmap_vm *vm_with_ram(uint32_t host, uint64_t bytes, uint32_t slot_flags,
                              const struct gfnmap_vm_options *extra) {
  struct gfnmap_vm_options o;
  gfnmap_vm *vm = NULL;
  uint64_t hva = 0;
  struct gfnmap_userspace_memory_region r;
  if (extra != NULL) o = *extra; else memset(&o, 0, sizeof o);
  o.host = host;
  CHECK(gfnmap_vm_create(&o, &vm) == 0);
  if (vm == NULL) return NULL;
  CHECK(gfnmap_vm_create_memory(vm, GFNMAP_BACKING_ANON, bytes, NULL, &hva) == 0);
  memset(&r, 0, sizeof r);
  r.slot = 0;
  r.flags = slot_flags;
  r.guest_phys_addr = kGuestBase;
  r.memory_size = bytes;
  r.userspace_addr = hva;
  CHECK(gfnmap_vm_set_user_memory_region(vm, &r) == 0);
  return vm;
}

static void test_access_and_exits(uint32_t host) {
  gfnmap_vm *vm = vm_with_ram(host, 1 << 20, 0, NULL);
  gfnmap_vcpu *vcpu = NULL;
  struct gfnmap_exit ex;
  uint64_t v = 0x1122334455667788ull, back = 0;
  const char text[] = "crosses a page boundary";
  char got[sizeof text];
  if (vm == NULL) return;
  CHECK(gfnmap_vm_create_vcpu(vm, 0, &vcpu) == 0);
  CHECK(gfnmap_vcpu_write(vcpu, kGuestBase, &v, sizeof v, &ex) == 0);
  CHECK(ex.reason == GFNMAP_EXIT_NONE && ex.bytes_done == sizeof v);
  CHECK(gfnmap_vcpu_read(vcpu, kGuestBase, &back, sizeof back, &ex) == 0 && back == v);
  CHECK(gfnmap_vcpu_write(vcpu, kGuestBase + kPage - 5, text, sizeof text, &ex) == 0);
  CHECK(gfnmap_vcpu_read(vcpu, kGuestBase + kPage - 5, got, sizeof got, &ex) == 0);
  CHECK(memcmp(got, text, sizeof text) == 0);
  /* No slot: an MMIO exit with the guest's bytes, and 0 (the caller handles it). */
  CHECK(gfnmap_vcpu_write(vcpu, 0x1000, &v, 4, &ex) == 0);
  CHECK(ex.reason == GFNMAP_EXIT_MMIO && ex.mmio_is_write && ex.mmio_len == 4 &&
        ex.gpa == 0x1000 && memcmp(ex.mmio_data, &v, 4) == 0);
  /* Device-model access through the VM. */
  CHECK(gfnmap_vm_read_guest(vm, kGuestBase, &back, sizeof back, &ex) == 0 && back == v);
  /* KVM's errnos. */
  {
    gfnmap_vcpu *other = vcpu;
    CHECK(gfnmap_vm_create_vcpu(vm, 0, &other) == -EEXIST && other == NULL);
    CHECK(strstr(gfnmap_last_error(), "EEXIST") != NULL);
    CHECK(gfnmap_vm_create_vcpu(vm, 4096, &other) == -EINVAL);
  }
  {
    struct gfnmap_userspace_memory_region r;
    memset(&r, 0, sizeof r);
    r.slot = 1;
    r.guest_phys_addr = kGuestBase;
    r.memory_size = kPage;
    r.userspace_addr = 0x7f0000000000ull;
    CHECK(gfnmap_vm_set_user_memory_region(vm, &r) == -EEXIST);
    r.guest_phys_addr = kGuestBase + 1;
    CHECK(gfnmap_vm_set_user_memory_region(vm, &r) == -EINVAL);
  }
  CHECK(gfnmap_vcpu_read(vcpu, kGuestBase, NULL, 8, &ex) == -EINVAL);
  CHECK(gfnmap_vcpu_read(vcpu, kGuestBase, &back, 8, NULL) == -EINVAL);
  gfnmap_vm_destroy(vm);
}

static void test_bad_arguments(void) {
  gfnmap_vm *vm = NULL;
  struct gfnmap_vm_options o;
  uint64_t hva;
  memset(&o, 0, sizeof o);
  o.host = 9;
  CHECK(gfnmap_vm_create(&o, &vm) == -EINVAL && vm == NULL);
  CHECK(strstr(gfnmap_last_error(), "gfnmap_vm_options.host") != NULL);
  o.host = GFNMAP_HOST_MODEL;
  o.nr_address_spaces = 3;
  CHECK(gfnmap_vm_create(&o, &vm) == -EINVAL);
  CHECK(strstr(gfnmap_last_error(), "nr_address_spaces") != NULL);
  o.nr_address_spaces = 0;
  o.flags = 1u << 7;
  CHECK(gfnmap_vm_create(&o, &vm) == -EINVAL);
  CHECK(gfnmap_vm_create(NULL, NULL) == -EINVAL);
  o.flags = 0;
  CHECK(gfnmap_vm_create(&o, &vm) == 0);
  CHECK(gfnmap_vm_create_memory(vm, 42, 1 << 20, NULL, &hva) == -EINVAL);
  CHECK(gfnmap_vm_create_memory(vm, GFNMAP_BACKING_ANON, 100, NULL, &hva) == -EINVAL);
  CHECK(gfnmap_vm_create_memory(vm, GFNMAP_BACKING_LAZY, 1 << 20, NULL, &hva) == -EOPNOTSUPP);
  CHECK(strncmp(gfnmap_strerror(-EOPNOTSUPP), "EOPNOTSUPP: ", 12) == 0);
  gfnmap_vm_destroy(vm);
  gfnmap_vm_destroy(NULL);
}

static void test_dirty_bitmap(uint32_t host) {
  struct gfnmap_vm_options o;
  gfnmap_vm *vm;
  gfnmap_vcpu *vcpu = NULL;
  struct gfnmap_exit ex;
  uint64_t bitmap[4] = {0}, n = 0, one = 1;
  memset(&o, 0, sizeof o);
  o.manual_dirty_log_protect = GFNMAP_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
  vm = vm_with_ram(host, 256 * kPage, GFNMAP_MEM_LOG_DIRTY_PAGES, &o);
  if (vm == NULL) return;
  CHECK(gfnmap_vm_create_vcpu(vm, 0, &vcpu) == 0);
  CHECK(gfnmap_vcpu_write(vcpu, kGuestBase + 3 * kPage, &one, 8, &ex) == 0);
  CHECK(gfnmap_vm_write_guest(vm, kGuestBase + 130 * kPage, &one, 8, &ex) == 0);
  CHECK(gfnmap_vm_get_dirty_log(vm, 0, bitmap, 4, &n) == 0 && n == 2);
  CHECK(bitmap[0] == (1ull << 3) && bitmap[2] == (1ull << 2));
  CHECK(gfnmap_vm_clear_dirty_log(vm, 0, 0, 256, bitmap, 4, &n) == 0 && n == 2);
  CHECK(gfnmap_vm_get_dirty_log(vm, 0, bitmap, 4, &n) == 0 && n == 0);
  CHECK(gfnmap_vm_get_dirty_log(vm, 0, bitmap, 1, &n) == -EFAULT); /* too small */
  CHECK(gfnmap_vm_get_dirty_log(vm, 7, bitmap, 4, &n) == -ENOENT);
  CHECK(gfnmap_vm_reset_dirty_rings(vm, &n) == -EINVAL);               /* no rings */
  CHECK(gfnmap_vcpu_harvest_dirty_ring(vcpu, NULL, NULL, &n) == -EINVAL);
  gfnmap_vm_destroy(vm);
}

struct harvest {
  uint64_t offsets[8];
  unsigned n;
};
static void on_dirty(void *ctx, uint32_t slot, uint64_t offset) {
  struct harvest *h = ctx;
  if (slot == 0 && h->n < 8) h->offsets[h->n++] = offset;
}

static void test_dirty_ring(void) {
  struct gfnmap_vm_options o;
  gfnmap_vm *vm;
  gfnmap_vcpu *vcpu = NULL;
  struct gfnmap_exit ex;
  struct harvest h = {{0}, 0};
  uint64_t n = 0, one = 1, bitmap[1];
  memset(&o, 0, sizeof o);
  o.dirty_ring_bytes = 4 * kPage;
  vm = vm_with_ram(GFNMAP_HOST_MODEL, 64 * kPage, GFNMAP_MEM_LOG_DIRTY_PAGES, &o);
  if (vm == NULL) return;
  CHECK(gfnmap_vm_create_vcpu(vm, 1, &vcpu) == 0);
  CHECK(gfnmap_vcpu_write(vcpu, kGuestBase + 9 * kPage, &one, 8, &ex) == 0);
  CHECK(gfnmap_vcpu_write(vcpu, kGuestBase + 2 * kPage, &one, 8, &ex) == 0);
  CHECK(gfnmap_vcpu_harvest_dirty_ring(vcpu, on_dirty, &h, &n) == 0 && n == 2);
  CHECK(h.n == 2 && h.offsets[0] == 9 && h.offsets[1] == 2);
  CHECK(gfnmap_vm_reset_dirty_rings(vm, &n) == 0 && n == 2);
  CHECK(gfnmap_vm_get_dirty_log(vm, 0, bitmap, 1, &n) == -ENXIO); /* ring only */
  gfnmap_vm_destroy(vm);
}

/* Lazy restore: exit 77 (skipped) when this host has no userfaultfd. */
static int test_lazy(void) {
  char path[] = "/tmp/gfnmap-capi-snap-XXXXXX";
  int fd = mkstemp(path);
  static uint64_t words[(1 << 20) / 8];
  gfnmap_vm *vm = NULL;
  gfnmap_vcpu *vcpu = NULL;
  struct gfnmap_memory_options mo;
  struct gfnmap_userspace_memory_region r;
  struct gfnmap_exit ex;
  uint64_t hva = 0, v = 0;
  size_t i;
  int rc;
  CHECK(fd >= 0);
  for (i = 0; i < sizeof words / 8; ++i) words[i] = i * 3 + 1;
  CHECK(write(fd, words, sizeof words) == (ssize_t)sizeof words);
  close(fd);
  CHECK(gfnmap_vm_create(NULL, &vm) == 0);
  mo.path = path;
  mo.offset = 0;
  rc = gfnmap_vm_create_memory(vm, GFNMAP_BACKING_LAZY, sizeof words, &mo, &hva);
  if (rc == -ENOSYS || rc == -EPERM || rc == -EACCES) {
    printf("skipped: no userfaultfd here (%s)\n", gfnmap_last_error());
    gfnmap_vm_destroy(vm);
    unlink(path);
    return 77;
  }
  CHECK(rc == 0);
  memset(&r, 0, sizeof r);
  r.guest_phys_addr = kGuestBase;
  r.memory_size = sizeof words;
  r.userspace_addr = hva;
  CHECK(gfnmap_vm_set_user_memory_region(vm, &r) == 0);
  CHECK(gfnmap_vm_create_vcpu(vm, 0, &vcpu) == 0);
  for (i = 0; i < sizeof words / 8 && vcpu != NULL; i += 4099) {
    CHECK(gfnmap_vcpu_read(vcpu, kGuestBase + i * 8, &v, 8, &ex) == 0 && v == words[i]);
  }
  gfnmap_vm_destroy(vm);
  unlink(path);
  return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
  printf("gfnmap %s (headers %d.%d.%d)\n", gfnmap_version(), GFNMAP_VERSION_MAJOR,
         GFNMAP_VERSION_MINOR, GFNMAP_VERSION_PATCH);
  CHECK(strcmp(gfnmap_version(), GFNMAP_VERSION_STRING) == 0);
  if (argc > 1 && strcmp(argv[1], "lazy") == 0) return test_lazy();
  CHECK(gfnmap_last_error()[0] == '\0');
  test_access_and_exits(GFNMAP_HOST_MODEL);
  test_access_and_exits(GFNMAP_HOST_REAL);
  test_bad_arguments();
  test_dirty_bitmap(GFNMAP_HOST_MODEL);
  test_dirty_bitmap(GFNMAP_HOST_REAL);
  test_dirty_ring();
  printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures == 0 ? 0 : 1;
}
