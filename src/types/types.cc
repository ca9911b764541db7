// gfnmap types: string forms of pfns, follow flags and errnos.
// Kept out of the header so that <types.h> stays cheap to include.
#include "gfnmap/types.h"

#include <cerrno>
#include <cstdio>

namespace gfnmap {

std::string pfn_to_string(Pfn pfn) {
  if (pfn == kPfnNoslot) return "NOSLOT";
  if (pfn == kPfnErrFault) return "FAULT";
  if (pfn == kPfnErrHwpoison) return "HWPOISON";
  if (pfn == kPfnErrRoFault) return "RO_FAULT";
  if (pfn == kPfnErrSigpending) return "SIGPENDING";
  if (pfn == kPfnErrNeedsIo) return "NEEDS_IO";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s0x%llx", is_error_noslot_pfn(pfn) ? "ERR:" : "",
                static_cast<unsigned long long>(pfn.value));
  return buf;
}

std::string foll_flags_to_string(FollFlags flags) {
  static constexpr std::pair<FollFlags, const char*> kNames[] = {
      {kFollWrite, "WRITE"},       {kFollNowait, "NOWAIT"},
      {kFollInterruptible, "INTERRUPTIBLE"}, {kFollGet, "GET"},
      {kFollHwpoison, "HWPOISON"}, {kFollHonorNumaFault, "HONOR_NUMA_FAULT"},
      {kFollPin, "PIN"},
  };
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if (!(flags & bit)) continue;
    if (!out.empty()) out += '|';
    out += name;
    flags &= ~bit;
  }
  if (flags) {
    if (!out.empty()) out += '|';
    out += "0x" + [&] { char b[16]; std::snprintf(b, sizeof b, "%x", flags); return std::string(b); }();
  }
  return out.empty() ? "0" : out;
}

std::string_view errno_name(int code) {
  switch (code) {
    case 0: return "OK";
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case E2BIG: return "E2BIG";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case ERANGE: return "ERANGE";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EHWPOISON: return "EHWPOISON";
    default: return "E?";
  }
}

std::string error_to_string(const Error& e) {
  std::string out(errno_name(e.code));
  if (out == "E?") out = "errno " + std::to_string(e.code);
  if (!e.message.empty()) out += ": " + e.message;
  return out;
}

}  // namespace gfnmap
