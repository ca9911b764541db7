/* gfnmap C example: a VM with 2 MiB of guest RAM, one vCPU that writes and reads it, an MMIO
 * exit, and a dirty-log harvest. Build: cc -std=c11 hello_vm.c $(pkg-config --cflags --libs gfnmap) */
#include <errno.h>
#include <stdio.h>

#include "gfnmap/gfnmap.h"

#define TRY(call)                                                       \
  do {                                                                  \
    int rc_ = (call);                                                   \
    if (rc_ != 0) {                                                     \
      fprintf(stderr, "%s: %s\n", #call, gfnmap_last_error());          \
      return 1;                                                         \
    }                                                                   \
  } while (0)

int main(void) {
  const uint64_t ram_gpa = 0x100000000ull, ram_size = 2u << 20;
  struct gfnmap_vm_options options = {0}; /* real memory, one address space */
  struct gfnmap_userspace_memory_region ram = {0};
  struct gfnmap_exit exit;
  gfnmap_vm *vm;
  gfnmap_vcpu *vcpu;
  uint64_t hva, value = 0, bitmap[8] = {0}, dirty = 0;

  TRY(gfnmap_vm_create(&options, &vm));
  TRY(gfnmap_vm_create_memory(vm, GFNMAP_BACKING_ANON, ram_size, NULL, &hva));
  ram.slot = 0;
  ram.flags = GFNMAP_MEM_LOG_DIRTY_PAGES;
  ram.guest_phys_addr = ram_gpa;
  ram.memory_size = ram_size;
  ram.userspace_addr = hva;
  TRY(gfnmap_vm_set_user_memory_region(vm, &ram));
  TRY(gfnmap_vm_create_vcpu(vm, 0, &vcpu));

  value = 42;
  TRY(gfnmap_vcpu_write(vcpu, ram_gpa + 0x5000, &value, sizeof value, &exit));
  value = 0;
  TRY(gfnmap_vcpu_read(vcpu, ram_gpa + 0x5000, &value, sizeof value, &exit));
  printf("guest read back %llu\n", (unsigned long long)value);

  TRY(gfnmap_vcpu_read(vcpu, 0xfee00000, &value, 4, &exit)); /* no slot there */
  printf("access at 0xfee00000: %s exit, %u bytes\n",
         exit.reason == GFNMAP_EXIT_MMIO ? "MMIO" : "unexpected", exit.mmio_len);

  TRY(gfnmap_vm_get_dirty_log(vm, 0, bitmap, 8, &dirty));
  printf("dirty pages: %llu (bitmap[0] = %#llx)\n", (unsigned long long)dirty,
         (unsigned long long)bitmap[0]);

  gfnmap_vm_destroy(vm);
  return value == 42 && exit.reason == GFNMAP_EXIT_MMIO && dirty == 1 && bitmap[0] == 0x20
             ? 0 : 1;
}
