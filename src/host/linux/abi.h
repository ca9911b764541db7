// gfnmap linux ABI: kernel interfaces newer than Debian 12's 6.1 system headers (PAGEMAP_SCAN,
// UFFDIO_POISON, newer uffd features), defined here with static_asserts and probed at run time.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace gfnmap::linux_abi {

// /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
inline constexpr uint64_t kPmPfnMask = (uint64_t{1} << 55) - 1;
inline constexpr uint64_t kPmExclusive = uint64_t{1} << 56;  // page mapped exactly once
inline constexpr uint64_t kPmFile = uint64_t{1} << 61;       // file page or shared anon
inline constexpr uint64_t kPmSwapped = uint64_t{1} << 62;
inline constexpr uint64_t kPmPresent = uint64_t{1} << 63;

// /proc/kpageflags bits.
inline constexpr uint64_t kKpfHuge = uint64_t{1} << 17;
inline constexpr uint64_t kKpfThp = uint64_t{1} << 22;

// PAGEMAP_SCAN (Linux 6.7): struct pm_scan_arg and struct page_region.
struct PmScanArg {
  uint64_t size;
  uint64_t flags;
  uint64_t start;
  uint64_t end;
  uint64_t walk_end;
  uint64_t vec;
  uint64_t vec_len;
  uint64_t max_pages;
  uint64_t category_inverted;
  uint64_t category_mask;
  uint64_t category_anyof_mask;
  uint64_t return_mask;
};
struct PageRegion {
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};
static_assert(sizeof(PmScanArg) == 96, "struct pm_scan_arg is 96 bytes");
static_assert(sizeof(PageRegion) == 24, "struct page_region is 24 bytes");
inline constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
static_assert(kPagemapScan == 0xc0606610UL, "PAGEMAP_SCAN ioctl number");
inline constexpr uint64_t kPageIsPresent = 1u << 3;
inline constexpr uint64_t kPageIsPfnzero = 1u << 5;
inline constexpr uint64_t kPageIsHuge = 1u << 6;

// userfaultfd pieces newer than 6.1.
inline constexpr uint64_t kUffdFeaturePoison = uint64_t{1} << 14;  // UFFD_FEATURE_POISON (6.6)
inline constexpr uint64_t kUffdFeatureMove = uint64_t{1} << 16;    // UFFD_FEATURE_MOVE (6.8)
inline constexpr unsigned kUffdioPoisonNr = 0x08;                  // _UFFDIO_POISON
struct UffdioPoison {
  uffdio_range range;
  uint64_t mode;
  int64_t updated;  // bytes poisoned, or -errno
};
static_assert(sizeof(UffdioPoison) == 32, "struct uffdio_poison is 32 bytes");
inline constexpr unsigned long kUffdioPoison = _IOWR(UFFDIO, kUffdioPoisonNr, UffdioPoison);
static_assert(kUffdioPoison == 0xc020aa08UL, "UFFDIO_POISON ioctl number");
static_assert(UFFDIO_COPY == 0xc028aa03UL && UFFDIO_ZEROPAGE == 0xc020aa04UL,
              "UFFDIO_COPY / UFFDIO_ZEROPAGE numbers");
inline constexpr uint64_t kUffdioPoisonModeDontwake = 1;
// The ioctl bit UFFDIO_REGISTER reports in uffdio_register.ioctls when POISON is usable.
inline constexpr uint64_t kUffdioPoisonIoctlBit = uint64_t{1} << kUffdioPoisonNr;

}  // namespace gfnmap::linux_abi
