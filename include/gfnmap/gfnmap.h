/* gfnmap C API (C11): guest memory with KVM's semantics for C VMMs, over gfnmap::Vm.
 * Every function returns 0 or a negative errno (KVM's where KVM has one); results come back
 * through out-parameters; no C++ exception or type crosses this boundary (docs/c-api.md). */
#ifndef GFNMAP_GFNMAP_H
#define GFNMAP_GFNMAP_H

#include <stddef.h>
#include <stdint.h>

#include "gfnmap/version.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gfnmap_vm gfnmap_vm;     /* a VM: host, memory, memslots, dirty log, MMU */
typedef struct gfnmap_vcpu gfnmap_vcpu; /* owned by its VM; one thread at a time */

/* Where the VM's memory lives. */
enum gfnmap_host {
  GFNMAP_HOST_REAL = 0,  /* this process's memory */
  GFNMAP_HOST_MODEL = 1  /* the deterministic host model */
};

/* The backing of a piece of guest memory (gfnmap::Backing). */
enum gfnmap_backing {
  GFNMAP_BACKING_ANON = 0,
  GFNMAP_BACKING_THP = 1,
  GFNMAP_BACKING_HUGETLB_2M = 2,
  GFNMAP_BACKING_HUGETLB_1G = 3,
  GFNMAP_BACKING_MEMFD = 4,
  GFNMAP_BACKING_FILE_SHARED = 5,
  GFNMAP_BACKING_FILE_PRIVATE = 6,
  GFNMAP_BACKING_LAZY = 7 /* filled from a snapshot file through userfaultfd */
};

/* gfnmap_vm_options.manual_dirty_log_protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). */
#define GFNMAP_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1u << 0)
#define GFNMAP_DIRTY_LOG_INITIALLY_SET (1u << 1)
/* gfnmap_vm_options.flags */
#define GFNMAP_VM_DIRTY_RING_WITH_BITMAP (1u << 0) /* KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP */
#define GFNMAP_VM_PTE_PREFETCH (1u << 1)           /* map present neighbours on faults */

/* Zero-initialised options are the defaults: real memory, one address space, bitmaps. */
struct gfnmap_vm_options {
  uint32_t host;                     /* enum gfnmap_host */
  uint32_t nr_address_spaces;        /* 1 or 2; 0 means 1 */
  uint64_t manual_dirty_log_protect; /* GFNMAP_DIRTY_LOG_* bits */
  uint32_t dirty_ring_bytes;         /* per vCPU, a power of two >= 4096; 0: no ring */
  uint32_t flags;                    /* GFNMAP_VM_* */
};

struct gfnmap_memory_options {
  const char *path; /* file backings: the file (NULL: a temporary one); lazy: the snapshot */
  uint64_t offset;  /* bytes into the file or snapshot, page aligned */
};

/* struct kvm_userspace_memory_region, field for field. */
#define GFNMAP_MEM_LOG_DIRTY_PAGES (1u << 0)
#define GFNMAP_MEM_READONLY (1u << 1)
struct gfnmap_userspace_memory_region {
  uint32_t slot; /* as_id << 16 | id */
  uint32_t flags;
  uint64_t guest_phys_addr;
  uint64_t memory_size; /* bytes; 0 deletes the slot */
  uint64_t userspace_addr;
};

/* Why a guest access stopped (gfnmap::ExitReason). */
enum gfnmap_exit_reason {
  GFNMAP_EXIT_NONE = 0,            /* the access completed */
  GFNMAP_EXIT_MMIO = 1,            /* no slot, or a write to a read-only slot */
  GFNMAP_EXIT_MEMORY_FAULT = 2,    /* the hva could not be resolved (-EFAULT) */
  GFNMAP_EXIT_HWPOISON = 3,        /* the backing page is poisoned (hva) */
  GFNMAP_EXIT_INTR = 4,            /* a signal interrupted the fault-in (-EINTR) */
  GFNMAP_EXIT_DIRTY_RING_FULL = 5, /* harvest and reset the rings, then run again */
  GFNMAP_EXIT_ASYNC_PF_NOT_PRESENT = 6,
  GFNMAP_EXIT_ASYNC_PF_HALT = 7
};

struct gfnmap_exit {
  uint32_t reason;     /* enum gfnmap_exit_reason */
  int32_t error;       /* MEMORY_FAULT: EFAULT; INTR: EINTR; else 0 */
  uint64_t bytes_done; /* bytes of the access completed before the exit */
  uint64_t gpa;        /* the first byte not done */
  uint64_t hva;        /* HWPOISON and MEMORY_FAULT: the host address */
  uint32_t token;      /* ASYNC_PF_*: the async page fault's token */
  uint32_t mmio_len;   /* MMIO: at most 8, never crossing a page */
  uint8_t mmio_is_write;
  uint8_t mmio_data[8]; /* MMIO write: the bytes the guest stores */
};

/* Version of the library linked in; the GFNMAP_VERSION_* macros give the headers'. */
const char *gfnmap_version(void);

/* "EINVAL: Invalid argument" for -EINVAL or EINVAL; never NULL. */
const char *gfnmap_strerror(int err);
/* What the last failing call on this thread said, with the field or value named; "" when no
 * call on this thread has failed. Valid until the next gfnmap call on this thread. */
const char *gfnmap_last_error(void);

/* options may be NULL (the defaults). -EINVAL bad options; the host's errno otherwise. */
int gfnmap_vm_create(const struct gfnmap_vm_options *options, gfnmap_vm **vm);
/* Destroys the VM, its vCPUs and its memory. NULL is a no-op. */
void gfnmap_vm_destroy(gfnmap_vm *vm);

/* size bytes of new memory of `backing` (enum gfnmap_backing); *hva receives its address.
 * options may be NULL. -EINVAL bad size or options; -EOPNOTSUPP lazy on the model. */
int gfnmap_vm_create_memory(gfnmap_vm *vm, uint32_t backing, uint64_t size,
                            const struct gfnmap_memory_options *options, uint64_t *hva);

/* KVM_SET_USER_MEMORY_REGION, with KVM's checks and errnos (-EINVAL, -EEXIST, ...). */
int gfnmap_vm_set_user_memory_region(gfnmap_vm *vm,
                                     const struct gfnmap_userspace_memory_region *region);

/* KVM_CREATE_VCPU: -EEXIST for an id in use, -EINVAL for an id >= 4096. */
int gfnmap_vm_create_vcpu(gfnmap_vm *vm, uint32_t id, gfnmap_vcpu **vcpu);

/* A guest access of len bytes at gpa (across pages and slots), faulting memory in as KVM
 * does. exit (required) is filled in every case. Returns 0 when the access completed or
 * stopped at an exit the caller handles (MMIO, HWPOISON, DIRTY_RING_FULL, ASYNC_PF_*);
 * -EFAULT for MEMORY_FAULT and -EINTR for INTR, as KVM_RUN does. */
int gfnmap_vcpu_read(gfnmap_vcpu *vcpu, uint64_t gpa, void *buf, size_t len,
                     struct gfnmap_exit *exit);
int gfnmap_vcpu_write(gfnmap_vcpu *vcpu, uint64_t gpa, const void *buf, size_t len,
                      struct gfnmap_exit *exit);

/* kvm_read_guest / kvm_write_guest for device models; writes are marked dirty. Same returns
 * as the vCPU accesses. */
int gfnmap_vm_read_guest(gfnmap_vm *vm, uint64_t gpa, void *buf, size_t len,
                         struct gfnmap_exit *exit);
int gfnmap_vm_write_guest(gfnmap_vm *vm, uint64_t gpa, const void *buf, size_t len,
                          struct gfnmap_exit *exit);

/* KVM_GET_DIRTY_LOG: bitmap has `words` 64-bit words (bit i = page i of the slot).
 * *nr_dirty (may be NULL) receives the dirty pages reported. -ENOENT slot absent or not
 * logging; -EFAULT bitmap too small; -ENXIO ring-only. */
int gfnmap_vm_get_dirty_log(gfnmap_vm *vm, uint32_t slot, uint64_t *bitmap, size_t words,
                            uint64_t *nr_dirty);
/* KVM_CLEAR_DIRTY_LOG (needs manual protect): bit i of bitmap is page first_page + i. */
int gfnmap_vm_clear_dirty_log(gfnmap_vm *vm, uint32_t slot, uint64_t first_page,
                              uint32_t num_pages, const uint64_t *bitmap, size_t words,
                              uint64_t *nr_cleared);

/* The vCPU's dirty ring: calls fn(ctx, slot, offset) for each harvested entry, in push
 * order, and marks it for reset. -ENXIO when the VM has no rings. */
typedef void (*gfnmap_dirty_gfn_fn)(void *ctx, uint32_t slot, uint64_t offset);
int gfnmap_vcpu_harvest_dirty_ring(gfnmap_vcpu *vcpu, gfnmap_dirty_gfn_fn fn, void *ctx,
                                   uint64_t *count);
/* KVM_RESET_DIRTY_RINGS: -EINVAL without rings. */
int gfnmap_vm_reset_dirty_rings(gfnmap_vm *vm, uint64_t *nr_reset);

#ifdef __cplusplus
}
#endif

#endif /* GFNMAP_GFNMAP_H */
