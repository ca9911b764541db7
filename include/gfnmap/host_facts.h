// gfnmap host facts: what the running kernel does where kernels differ (the shared zero page,
// THP, hugetlb pools, userfaultfd, pagemap, /dev/kvm), probed once and reported (docs/spec.md 12).
#pragma once

#include <cstdint>
#include <string>

namespace gfnmap {

// Why /dev/kvm can or cannot be used.
enum class KvmStatus : uint8_t {
  kAvailable,      // opened read-write, KVM_GET_API_VERSION is 12
  kNoModule,       // no /dev/kvm and no kvm module loaded
  kModuleRefused,  // the kvm module is loaded but no vendor module bound (no device node)
  kNoNode,         // no /dev/kvm, module state unknown
  kPermission,     // EACCES / EPERM opening it
  kBroken,         // it opened but did not behave as KVM (another errno, wrong API version)
};
std::string_view to_string(KvmStatus status);

// Every fact a behaviour or a test depends on. A value, so tests can build the other branch.
struct HostFacts {
  std::string kernel_release;  // uname -r

  // A read fault of untouched private anonymous memory maps the shared zero page (read-only;
  // decision-table row 9, and a later write replaces it under an invalidation). False on
  // kernels that map a fresh exclusive page instead, writable at once (row 8): those booted
  // with pvm_no_zero_page=1, s390, some hardened configs.
  bool zero_page = true;
  // zero_page was forced to true (GFNMAP_HOST_ZERO_PAGE=1) on a kernel without the zero page:
  // LinuxHost emulates it (LinuxHost::Options::zero_page).
  bool zero_page_emulated = false;
  std::string zero_page_how;  // how the probe decided ("pagemap: ...")

  // Transparent huge pages: "always", "madvise", "never", or "" when THP is not built in.
  std::string thp_enabled;
  // /sys/kernel/mm/transparent_hugepage/use_zero_page: a read fault of an untouched THP-eligible
  // range maps the huge zero page rather than allocating a huge page.
  bool thp_huge_zero_page = false;

  // The hugetlb pools (pages configured, pages free) for 2M and 1G pages.
  uint64_t hugetlb_2m_total = 0, hugetlb_2m_free = 0;
  uint64_t hugetlb_1g_total = 0, hugetlb_1g_free = 0;

  // userfaultfd: the syscall works, /dev/userfaultfd works (USERFAULTFD_IOC_NEW), and the
  // features UFFDIO_API reports (UFFD_FEATURE_* bits); uffd_why says why neither works.
  bool uffd_syscall = false;
  bool uffd_dev = false;
  uint64_t uffd_features = 0;
  std::string uffd_why;
  bool uffd_available() const { return uffd_syscall || uffd_dev; }

  // /proc/self/pagemap shows physical frame numbers (needs CAP_SYS_ADMIN); otherwise gfnmap's
  // pfns on real memory are host virtual page numbers.
  bool pagemap_pfns = false;
  // PAGEMAP_SCAN (Linux 6.7) is available.
  bool pagemap_scan = false;

  // /dev/kvm.
  KvmStatus kvm = KvmStatus::kNoNode;
  std::string kvm_why;  // empty when available; otherwise the reason, with the kernel's words
  bool kvm_available() const { return kvm == KvmStatus::kAvailable; }
};

// Probes every fact now (about a millisecond; maps and unmaps a few pages, at most one 2M THP
// range, and leaves nothing behind). Thread-safe.
HostFacts probe_host_facts();

// The facts of this host, probed on first use and cached for the life of the process.
//
// GFNMAP_HOST_ZERO_PAGE=0|1 in the environment overrides the zero-page fact in the cache (not
// in probe_host_facts): LinuxHost then treats read faults of untouched private anonymous memory
// as the forced fact says (LinuxHost::Options::zero_page). Forcing 1 on a kernel without the
// zero page sets zero_page_emulated (safe: a writable page is treated as read-only); forcing 0
// on a kernel with it is ignored, and zero_page_how says so (the shared zero page would be
// handed out as writable).
const HostFacts& host_facts();

}  // namespace gfnmap
