// gfnmap host facts: probes of the running kernel (zero page, THP, hugetlb, userfaultfd,
// pagemap, /dev/kvm). Each probe unmaps and closes what it made before it returns.
#include "gfnmap/host_facts.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "abi.h"

namespace gfnmap {

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t k2M = uint64_t{2} << 20;

// An fd closed at scope exit.
struct ScopedFd {
  int fd = -1;
  explicit ScopedFd(int f) : fd(f) {}
  ~ScopedFd() {
    if (fd >= 0) close(fd);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
};

// A private anonymous mapping unmapped at scope exit.
struct ScopedMap {
  void* p = MAP_FAILED;
  uint64_t size = 0;
  explicit ScopedMap(uint64_t bytes) : size(bytes) {
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  ~ScopedMap() {
    if (p != MAP_FAILED) munmap(p, size);
  }
  ScopedMap(const ScopedMap&) = delete;
  ScopedMap& operator=(const ScopedMap&) = delete;
  bool ok() const { return p != MAP_FAILED; }
  uint64_t addr() const { return reinterpret_cast<uint64_t>(p); }
};

std::string read_line(const char* path) {
  std::ifstream f(path);
  std::string line;
  if (f) std::getline(f, line);
  return line;
}

uint64_t read_u64(const std::string& path) {
  const std::string s = read_line(path.c_str());
  return s.empty() ? 0 : std::strtoull(s.c_str(), nullptr, 10);
}

bool path_exists(const char* path) { return access(path, F_OK) == 0; }

// Reads `n` pagemap entries from `addr`; false if pagemap is unreadable.
bool pagemap_entries(int fd, uint64_t addr, uint64_t* out, uint64_t n) {
  const auto want = static_cast<ssize_t>(n * 8);
  return fd >= 0 && pread(fd, out, static_cast<size_t>(want),
                          static_cast<off_t>((addr / kPage) * 8)) == want;
}

// PAGEMAP_SCAN (6.7+): 1 when the page at addr maps a zero page (4K or huge), 0 when it maps
// another frame, -1 when the ioctl is missing or the page is not present.
int scan_pfnzero(int pagemap_fd, uint64_t addr) {
  linux_abi::PageRegion vec[1] = {};
  linux_abi::PmScanArg arg{};
  arg.size = sizeof arg;
  arg.start = addr;
  arg.end = addr + kPage;
  arg.vec = reinterpret_cast<uint64_t>(vec);
  arg.vec_len = 1;
  arg.return_mask = linux_abi::kPageIsPresent | linux_abi::kPageIsPfnzero;
  if (pagemap_fd < 0 || ioctl(pagemap_fd, linux_abi::kPagemapScan, &arg) < 1) return -1;
  if (!(vec[0].categories & linux_abi::kPageIsPresent)) return -1;
  return (vec[0].categories & linux_abi::kPageIsPfnzero) ? 1 : 0;
}

// Two read-faulted 4K pages: the zero page is present, mapped more than once (not exclusive),
// and the same frame for both.
void probe_zero_page(HostFacts& f, int pagemap_fd) {
  ScopedMap m(2 * kPage);
  if (!m.ok()) {
    f.zero_page_how = "unknown: mmap failed; assumed present";
    return;
  }
  madvise(m.p, m.size, MADV_NOHUGEPAGE);
  if (madvise(m.p, m.size, MADV_POPULATE_READ) != 0) {
    for (uint64_t i = 0; i < 2; ++i) (void)static_cast<volatile char*>(m.p)[i * kPage];
  }
  uint64_t e[2] = {0, 0};
  if (!pagemap_entries(pagemap_fd, m.addr(), e, 2) || !(e[0] & linux_abi::kPmPresent)) {
    f.zero_page_how = "unknown: pagemap unreadable; assumed present";
    return;
  }
  if (const int z = scan_pfnzero(pagemap_fd, m.addr()); z >= 0) {
    f.zero_page = z == 1;
    f.zero_page_how = f.zero_page ? "PAGEMAP_SCAN: a read-faulted page is PAGE_IS_PFNZERO"
                                  : "PAGEMAP_SCAN: a read-faulted page is not the zero page";
    return;
  }
  const bool exclusive = (e[0] & linux_abi::kPmExclusive) || (e[1] & linux_abi::kPmExclusive);
  const uint64_t pfn0 = e[0] & linux_abi::kPmPfnMask, pfn1 = e[1] & linux_abi::kPmPfnMask;
  if (pfn0 != 0 && pfn1 != 0) {  // physical pfns visible: the frames decide
    f.zero_page = pfn0 == pfn1;
    f.zero_page_how = f.zero_page ? "pagemap: two read-faulted pages share one frame"
                                  : "pagemap: two read-faulted pages got distinct frames";
  } else {
    f.zero_page = !exclusive;
    f.zero_page_how = f.zero_page ? "pagemap: a read-faulted page is not exclusive"
                                  : "pagemap: a read-faulted page is exclusive (a fresh page)";
  }
}

// THP mode from sysfs. The huge zero page: a read fault of an untouched, 2M-aligned
// MADV_HUGEPAGE range maps it (present, not exclusive) where the kernel uses it, and allocates
// a huge page (exclusive) or 4K pages where it does not.
void probe_thp(HostFacts& f, int pagemap_fd) {
  const std::string enabled = read_line("/sys/kernel/mm/transparent_hugepage/enabled");
  const auto open = enabled.find('['), close = enabled.find(']');
  if (open != std::string::npos && close != std::string::npos && close > open) {
    f.thp_enabled = enabled.substr(open + 1, close - open - 1);
  }
  if (f.thp_enabled.empty() || f.thp_enabled == "never") return;
  ScopedMap m(2 * k2M);
  if (!m.ok()) return;
  const uint64_t start = (m.addr() + k2M - 1) & ~(k2M - 1);
  void* p = reinterpret_cast<void*>(start);
  if (madvise(p, k2M, MADV_HUGEPAGE) != 0 || madvise(p, kPage, MADV_POPULATE_READ) != 0) return;
  if (const int z = scan_pfnzero(pagemap_fd, start); z >= 0) {
    f.thp_huge_zero_page = z == 1;
    return;
  }
  uint64_t e = 0;
  if (pagemap_entries(pagemap_fd, start, &e, 1) && (e & linux_abi::kPmPresent)) {
    f.thp_huge_zero_page = !(e & linux_abi::kPmExclusive);
  }
}

void probe_hugetlb(HostFacts& f) {
  const std::string base = "/sys/kernel/mm/hugepages/hugepages-";
  f.hugetlb_2m_total = read_u64(base + "2048kB/nr_hugepages");
  f.hugetlb_2m_free = read_u64(base + "2048kB/free_hugepages");
  f.hugetlb_1g_total = read_u64(base + "1048576kB/nr_hugepages");
  f.hugetlb_1g_free = read_u64(base + "1048576kB/free_hugepages");
}

void probe_uffd(HostFacts& f) {
  int e_sys = 0, e_dev = 0;
  ScopedFd sys(static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (sys.fd < 0) e_sys = errno;
  f.uffd_syscall = sys.fd >= 0;
  ScopedFd dev(open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (dev.fd >= 0) {
    constexpr unsigned long kUserfaultfdIocNew = _IO(0xAA, 0x00);  // USERFAULTFD_IOC_NEW
    ScopedFd u(ioctl(dev.fd, kUserfaultfdIocNew, O_CLOEXEC | O_NONBLOCK));
    if (u.fd < 0) e_dev = errno;
    f.uffd_dev = u.fd >= 0;
    if (sys.fd < 0 && u.fd >= 0) std::swap(sys.fd, u.fd);  // probe features on this one
  } else {
    e_dev = errno;
  }
  if (sys.fd >= 0) {
    uffdio_api api{UFFD_API, 0, 0};
    if (ioctl(sys.fd, UFFDIO_API, &api) == 0) f.uffd_features = api.features;
  } else {
    f.uffd_why = std::string("userfaultfd(2): ") + std::strerror(e_sys) +
                 "; /dev/userfaultfd: " + std::strerror(e_dev);
  }
}

void probe_pagemap(HostFacts& f, int pagemap_fd) {
  if (pagemap_fd < 0) return;
  ScopedMap m(kPage);
  if (!m.ok()) return;
  static_cast<volatile char*>(m.p)[0] = 1;
  uint64_t e = 0;
  if (pagemap_entries(pagemap_fd, m.addr(), &e, 1)) {
    f.pagemap_pfns = (e & linux_abi::kPmPresent) && (e & linux_abi::kPmPfnMask);
  }
  linux_abi::PageRegion vec[1];
  linux_abi::PmScanArg arg{};
  arg.size = sizeof arg;
  arg.start = m.addr();
  arg.end = m.addr() + kPage;
  arg.vec = reinterpret_cast<uint64_t>(vec);
  arg.vec_len = 1;
  arg.return_mask = linux_abi::kPageIsPresent;
  f.pagemap_scan = ioctl(pagemap_fd, linux_abi::kPagemapScan, &arg) >= 0;
}

// The last kernel log line that mentions kvm, if the log is readable (root): it says why a
// vendor module refused to bind.
std::string kvm_log_line() {
  const int len = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, nullptr, 0);
  if (len <= 0) return {};
  std::vector<char> buf(static_cast<size_t>(len));
  const int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf.data(), len);
  if (n <= 0) return {};
  std::istringstream in(std::string(buf.data(), static_cast<size_t>(n)));
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find("kvm") == std::string::npos) continue;
    // Keep the message: drop the "<6>[    0.35] " prefix.
    const auto close = line.find("] ");
    last = close == std::string::npos ? line : line.substr(close + 2);
  }
  return last;
}

void probe_kvm(HostFacts& f) {
  ScopedFd fd(open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (fd.fd >= 0) {
    constexpr unsigned long kKvmGetApiVersion = _IO(0xAE, 0x00);
    const int v = ioctl(fd.fd, kKvmGetApiVersion, 0);
    if (v == 12) {
      f.kvm = KvmStatus::kAvailable;
    } else {
      f.kvm = KvmStatus::kBroken;
      f.kvm_why = v < 0 ? std::string("/dev/kvm: KVM_GET_API_VERSION: ") + std::strerror(errno)
                        : "/dev/kvm: KVM API version " + std::to_string(v) + ", expected 12";
    }
    return;
  }
  const int e = errno;
  if (e == EACCES || e == EPERM) {
    f.kvm = KvmStatus::kPermission;
    f.kvm_why = std::string("/dev/kvm: ") + std::strerror(e) + " (not in the kvm group?)";
    return;
  }
  if (e != ENOENT) {
    f.kvm = KvmStatus::kBroken;
    f.kvm_why = std::string("/dev/kvm: ") + std::strerror(e);
    return;
  }
  std::string vendors;
  for (const char* m : {"kvm_intel", "kvm_amd", "kvm_pvm"}) {
    if (path_exists((std::string("/sys/module/") + m).c_str())) {
      vendors += vendors.empty() ? m : std::string(", ") + m;
    }
  }
  if (!path_exists("/sys/module/kvm")) {
    f.kvm = KvmStatus::kNoModule;
    f.kvm_why = "/dev/kvm: no such device node, and the kvm module is not loaded";
    return;
  }
  f.kvm = KvmStatus::kModuleRefused;
  f.kvm_why = "/dev/kvm: no such device node; kvm is loaded" +
              (vendors.empty() ? std::string(" without a vendor module")
                               : " with " + vendors + ", which did not bind");
  if (const std::string log = kvm_log_line(); !log.empty()) {
    f.kvm_why += " (kernel log: \"" + log + "\")";
  }
}

}  // namespace

std::string_view to_string(KvmStatus status) {
  switch (status) {
    case KvmStatus::kAvailable: return "available";
    case KvmStatus::kNoModule: return "no-module";
    case KvmStatus::kModuleRefused: return "module-refused";
    case KvmStatus::kNoNode: return "no-node";
    case KvmStatus::kPermission: return "permission";
    case KvmStatus::kBroken: return "broken";
  }
  return "?";
}

HostFacts probe_host_facts() {
  HostFacts f;
  utsname u{};
  if (uname(&u) == 0) f.kernel_release = u.release;
  ScopedFd pagemap(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  probe_zero_page(f, pagemap.fd);
  probe_thp(f, pagemap.fd);
  probe_hugetlb(f);
  probe_uffd(f);
  probe_pagemap(f, pagemap.fd);
  probe_kvm(f);
  return f;
}

const HostFacts& host_facts() {
  static const HostFacts facts = [] {
    HostFacts f = probe_host_facts();
    const char* force = std::getenv("GFNMAP_HOST_ZERO_PAGE");
    if (force != nullptr && std::strcmp(force, "1") == 0 && !f.zero_page) {
      f.zero_page = true;
      f.zero_page_emulated = true;
      f.zero_page_how += "; forced by GFNMAP_HOST_ZERO_PAGE=1: emulated";
    } else if (force != nullptr && std::strcmp(force, "0") == 0 && f.zero_page) {
      f.zero_page_how += "; GFNMAP_HOST_ZERO_PAGE=0 ignored: this kernel maps the zero page";
    }
    return f;
  }();
  return facts;
}

}  // namespace gfnmap
