// gfnmap uffd page sources: zero fill, file snapshot (pread) and in-memory snapshot.
// Each fills whole pages and says explicitly what it did (Fill).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "gfnmap/uffd.h"

namespace gfnmap::uffd {

std::string_view to_string(Fill fill) {
  switch (fill) {
    case Fill::kServed: return "served";
    case Fill::kZero: return "zero";
    case Fill::kRetry: return "retry";
    case Fill::kFailed: return "failed";
  }
  return "?";
}

Fill ZeroSource::fill(uint64_t, std::span<std::byte>) { return Fill::kZero; }

Result<std::unique_ptr<FileSource>> FileSource::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return make_error(e, "cannot open snapshot ", path, ": ", std::strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return make_error(e, "cannot stat snapshot ", path, ": ", std::strerror(e));
  }
  return std::unique_ptr<FileSource>(new FileSource(fd, true, static_cast<uint64_t>(st.st_size)));
}

Result<std::unique_ptr<FileSource>> FileSource::from_fd(int fd) {
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) {
    return make_error(EBADF, "snapshot fd ", std::to_string(fd), " is not an open file");
  }
  return std::unique_ptr<FileSource>(
      new FileSource(fd, false, static_cast<uint64_t>(st.st_size)));
}

FileSource::~FileSource() {
  if (owned_) ::close(fd_);
}

Fill FileSource::fill(uint64_t offset, std::span<std::byte> dst) {
  if (offset >= size_) return Fill::kZero;
  size_t done = 0;
  while (done < dst.size()) {
    ssize_t n = pread(fd_, dst.data() + done, dst.size() - done,
                      static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return Fill::kRetry;
      return Fill::kFailed;
    }
    if (n == 0) break;  // end of file: the rest reads as zero
    done += static_cast<size_t>(n);
  }
  if (done < dst.size()) std::memset(dst.data() + done, 0, dst.size() - done);
  return Fill::kServed;
}

Fill MemorySource::fill(uint64_t offset, std::span<std::byte> dst) {
  if (offset >= bytes_.size()) return Fill::kZero;
  size_t n = std::min<size_t>(dst.size(), bytes_.size() - offset);
  std::memcpy(dst.data(), bytes_.data() + offset, n);
  if (n < dst.size()) std::memset(dst.data() + n, 0, dst.size() - n);
  return Fill::kServed;
}

}  // namespace gfnmap::uffd
