// gfnmap-vmm-peer: plays the VMM side of Firecracker's Uffd memory backend against a page
// server (gfnmap serve): maps anonymous private guest-memory regions with gaps between them,
// creates a userfaultfd with UFFD_FEATURE_EVENT_REMOVE, registers the regions MISSING, connects
// to the server's socket and sends the one JSON message with the userfaultfd in SCM_RIGHTS;
// then threads touch every page in sequential or random order and check each byte against the
// memory file, and a balloon step (MADV_DONTNEED of a range) checks that it then reads zero.
//
// Exit status: 0 every check passed; 1 a byte differed; 2 bad usage or setup; 3 timed out
// (the server never served a fault: a refused handshake, a stopped server).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif

namespace {

constexpr const char* kUsage =
    R"(usage: gfnmap-vmm-peer --socket PATH --memfile PATH [options]
  --regions SIZES      comma-separated region sizes (K/M/G suffix), laid end to end in the
                       memory file and apart (a gap of one page) in memory; default 4M,8M
  --file-offset BYTES  file offset of the first region (default 0)
  --page-size 4K|2M    2M maps hugetlb memory (MAP_HUGETLB)
  --no-hugetlb         with --page-size 2M: plain anonymous memory, 2M-aligned (the server
                       still copies 2M per fault)
  --threads N          touching threads (default 2)
  --order seq|random   the order pages are touched in (default seq)
  --exit-after N       exit (status 0) after N pages were touched: a VM gone mid-restore
  --balloon            after the check, MADV_DONTNEED half of region 0; it must read zero
  --balloon-first      MADV_DONTNEED half of region 0 right after the handshake, before any
                       touch: those pages must read zero (a prefetch must not fill them)
  --delay-touch MS     wait MS milliseconds after the handshake before touching
  --remap              also enable UNMAP and REMAP events; touch the first half of region 0,
                       move region 0 (mremap), touch the rest at its new address, then
                       unmap the last region; every byte checked (one thread)
  --legacy             send the old three-field handshake (no page size)
  --split              send the JSON and the fd in two messages, 20 ms apart
  --hold               after the checks, stay connected until killed (a VM that keeps running)
  --timeout S          give up after S seconds, status 3 (default 60)
  --quiet              print nothing on success)";

struct Args {
  std::string socket, memfile;
  std::vector<uint64_t> sizes{4u << 20, 8u << 20};
  uint64_t file_offset = 0;
  uint64_t page = 4096;
  unsigned threads = 2;
  bool random = false;
  long exit_after = -1;
  bool balloon = false, legacy = false, split = false, quiet = false, hold = false;
  bool no_hugetlb = false, balloon_first = false, remap = false;
  unsigned delay_touch_ms = 0;
  unsigned timeout = 60;
};

template <class... Parts>
[[noreturn]] void die(int code, const Parts&... parts) {
  std::string msg = "gfnmap-vmm-peer: ";
  ((msg += parts), ...);
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::exit(code);
}

uint64_t parse_size(const char* s) {
  char* end = nullptr;
  uint64_t v = std::strtoull(s, &end, 0);
  if (end == s) die(2, "bad size '", s, "'");
  switch (*end) {
    case 'K': case 'k': v <<= 10; ++end; break;
    case 'M': case 'm': v <<= 20; ++end; break;
    case 'G': case 'g': v <<= 30; ++end; break;
    default: break;
  }
  if (*end) die(2, "bad size '", s, "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> const char* {
      if (i + 1 >= argc) die(2, k.c_str(), " needs a value");
      return argv[++i];
    };
    if (k == "--socket") a.socket = val();
    else if (k == "--memfile") a.memfile = val();
    else if (k == "--regions") {
      a.sizes.clear();
      std::string list = val();
      size_t p = 0;
      while (p <= list.size()) {
        size_t c = list.find(',', p);
        if (c == std::string::npos) c = list.size();
        a.sizes.push_back(parse_size(list.substr(p, c - p).c_str()));
        p = c + 1;
      }
    } else if (k == "--file-offset") a.file_offset = parse_size(val());
    else if (k == "--page-size") a.page = parse_size(val());
    else if (k == "--threads") a.threads = static_cast<unsigned>(std::atoi(val()));
    else if (k == "--order") {
      std::string o = val();
      if (o != "seq" && o != "random") die(2, "--order is seq or random, not '", o.c_str(), "'");
      a.random = o == "random";
    } else if (k == "--exit-after") a.exit_after = std::atol(val());
    else if (k == "--balloon") a.balloon = true;
    else if (k == "--legacy") a.legacy = true;
    else if (k == "--split") a.split = true;
    else if (k == "--quiet") a.quiet = true;
    else if (k == "--hold") a.hold = true;
    else if (k == "--no-hugetlb") a.no_hugetlb = true;
    else if (k == "--balloon-first") a.balloon_first = true;
    else if (k == "--remap") a.remap = true;
    else if (k == "--delay-touch") a.delay_touch_ms = static_cast<unsigned>(std::atoi(val()));
    else if (k == "--timeout") a.timeout = static_cast<unsigned>(std::atoi(val()));
    else if (k == "--help" || k == "-h") {
      std::puts(kUsage);
      std::exit(0);
    } else {
      die(2, "unknown option '", k.c_str(), "'\n", kUsage);
    }
  }
  if (a.socket.empty() || a.memfile.empty()) die(2, "--socket and --memfile are required\n", kUsage);
  if (a.page != 4096 && a.page != (2u << 20)) die(2, "--page-size is 4K or 2M");
  if (a.threads == 0 || a.threads > 256) die(2, "--threads is 1..256");
  for (uint64_t s : a.sizes) {
    if (s == 0 || s % a.page) die(2, "region sizes must be non-zero multiples of the page size");
  }
  return a;
}

int open_userfaultfd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return fd;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -1;
  constexpr unsigned long kUserfaultfdIocNew = _IO(0xAA, 0x00);  // USERFAULTFD_IOC_NEW
  fd = ioctl(dev, kUserfaultfdIocNew, O_CLOEXEC | O_NONBLOCK);
  close(dev);
  return fd;
}

void on_alarm(int) {
  const char msg[] = "gfnmap-vmm-peer: timed out (no page server served the faults)\n";
  ssize_t w = write(2, msg, sizeof msg - 1);
  (void)w;
  _exit(3);
}

struct Region {
  uint8_t* addr;
  uint64_t size;
  uint64_t offset;
};

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  signal(SIGALRM, on_alarm);
  alarm(a.timeout);
  const auto t0 = std::chrono::steady_clock::now();

  int mfd = open(a.memfile.c_str(), O_RDONLY | O_CLOEXEC);
  if (mfd < 0) die(2, "memory file ", a.memfile.c_str(), ": ", std::strerror(errno));
  struct stat st {};
  fstat(mfd, &st);
  const auto file_size = static_cast<uint64_t>(st.st_size);
  const auto* file = static_cast<const uint8_t*>(
      file_size ? mmap(nullptr, file_size, PROT_READ, MAP_SHARED, mfd, 0) : nullptr);
  if (file == MAP_FAILED) die(2, "mmap of the memory file: ", std::strerror(errno));

  // Guest memory: one reservation, each region mapped inside it one page apart.
  uint64_t total = 0;
  for (uint64_t s : a.sizes) total += s;
  const uint64_t reserve = total + (a.sizes.size() + 2) * a.page;
  auto* res = static_cast<uint8_t*>(
      mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (res == MAP_FAILED) die(2, "mmap: ", std::strerror(errno));
  uint64_t cursor = (reinterpret_cast<uint64_t>(res) + a.page - 1) & ~(a.page - 1);
  std::vector<Region> regions;
  uint64_t file_off = a.file_offset;
  for (uint64_t s : a.sizes) {
    cursor += a.page;  // the gap
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE;
    if (a.page != 4096 && !a.no_hugetlb) flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_HUGETLB | MAP_HUGE_2MB;
    void* p = mmap(reinterpret_cast<void*>(cursor), s, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) die(2, "mmap of a region: ", std::strerror(errno));
    regions.push_back({static_cast<uint8_t*>(p), s, file_off});
    file_off += s;
    cursor += s;
  }

  int uffd = open_userfaultfd();
  if (uffd < 0) die(2, "userfaultfd: ", std::strerror(errno));
  uint64_t features = UFFD_FEATURE_EVENT_REMOVE;
  if (a.remap) features |= UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
  uffdio_api api{UFFD_API, features, 0};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) die(2, "UFFDIO_API: ", std::strerror(errno));
  for (const Region& r : regions) {
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uint64_t>(r.addr);
    reg.range.len = r.size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
      die(2, "UFFDIO_REGISTER: ", std::strerror(errno));
    }
  }

  std::string json = "[";
  for (const Region& r : regions) {
    if (json.size() > 1) json += ",";
    json += "{\"base_host_virt_addr\":" + std::to_string(reinterpret_cast<uint64_t>(r.addr)) +
            ",\"size\":" + std::to_string(r.size) + ",\"offset\":" + std::to_string(r.offset);
    if (!a.legacy) {
      json += ",\"page_size\":" + std::to_string(a.page) +
              ",\"page_size_kib\":" + std::to_string(a.page);
    }
    json += "}";
  }
  json += "]";

  int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (a.socket.size() >= sizeof sa.sun_path) die(2, "socket path too long");
  std::memcpy(sa.sun_path, a.socket.c_str(), a.socket.size() + 1);
  if (connect(sock, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    die(2, "connect ", a.socket.c_str(), ": ", std::strerror(errno));
  }
  auto send_part = [&](const char* data, size_t len, bool with_fd) {
    iovec iov{const_cast<char*>(data), len};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    if (with_fd) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(len)) {
      die(2, "sendmsg: ", std::strerror(errno));
    }
  };
  if (a.split) {
    // The JSON first; the fd rides on its last byte, 20 ms later.
    send_part(json.data(), json.size() - 1, false);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    send_part(json.data() + json.size() - 1, 1, true);
  } else {
    send_part(json.data(), json.size(), true);
  }

  if (a.remap) {
    // Pages of region 0 at `base`, from page `from` to `to`, checked against the file.
    auto check = [&](const uint8_t* base, uint64_t from, uint64_t to, const char* where) {
      for (uint64_t off = from * a.page; off < to * a.page; off += a.page) {
        if (std::memcmp(base + off, file + regions[0].offset + off, a.page) != 0) {
          std::fprintf(stderr, "gfnmap-vmm-peer: remap: page at byte %llu of region 0 (%s) "
                       "differs from the memory file\n",
                       static_cast<unsigned long long>(off), where);
          std::exit(1);
        }
      }
    };
    const uint64_t n = regions[0].size / a.page;
    check(regions[0].addr, 0, n / 2, "before the move");
    void* dst = mmap(nullptr, regions[0].size, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (dst == MAP_FAILED) die(2, "mmap: ", std::strerror(errno));
    void* moved = mremap(regions[0].addr, regions[0].size, regions[0].size,
                         MREMAP_MAYMOVE | MREMAP_FIXED, dst);
    if (moved == MAP_FAILED) die(2, "mremap: ", std::strerror(errno));
    const auto* base = static_cast<const uint8_t*>(moved);
    check(base, n / 2, n, "faulted after the move");
    check(base, 0, n / 2, "placed before the move");
    if (regions.size() > 1 && munmap(regions.back().addr, regions.back().size) != 0) {
      die(2, "munmap: ", std::strerror(errno));
    }
    if (!a.quiet) std::printf("gfnmap-vmm-peer: ok: remap and unmap\n");
    close(sock);
    return 0;
  }

  // The balloon range: the middle half of region 0.
  const uint64_t b_pages = regions[0].size / a.page;
  const uint64_t b_from = b_pages / 4 * a.page;
  const uint64_t b_len = std::max<uint64_t>(b_pages / 2, 1) * a.page;
  if (a.balloon_first && madvise(regions[0].addr + b_from, b_len, MADV_DONTNEED) != 0) {
    die(2, "madvise(MADV_DONTNEED): ", std::strerror(errno));
  }
  if (a.delay_touch_ms) std::this_thread::sleep_for(std::chrono::milliseconds(a.delay_touch_ms));

  // Touch: every page of every region, split round-robin over the threads.
  std::vector<std::pair<uint32_t, uint64_t>> pages;  // (region, page index)
  for (uint32_t r = 0; r < regions.size(); ++r) {
    for (uint64_t i = 0; i < regions[r].size / a.page; ++i) pages.emplace_back(r, i);
  }
  if (a.random) std::shuffle(pages.begin(), pages.end(), std::mt19937_64(42));
  std::atomic<long> touched{0};
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < a.threads; ++t) {
    threads.emplace_back([&, t] {
      for (size_t k = t; k < pages.size() && !bad.load(); k += a.threads) {
        const Region& r = regions[pages[k].first];
        const uint64_t off = pages[k].second * a.page;
        if (a.exit_after >= 0 && touched.fetch_add(1) >= a.exit_after) {
          std::fprintf(stderr, "gfnmap-vmm-peer: exiting after %ld pages (mid-restore)\n",
                       a.exit_after);
          std::fflush(stderr);
          _exit(0);
        }
        const volatile uint8_t* mem = r.addr + off;
        const uint8_t first = mem[0];  // the fault
        (void)first;
        if (a.balloon_first && pages[k].first == 0 && off >= b_from && off < b_from + b_len) {
          for (uint64_t b = 0; b < a.page; ++b) {
            if (r.addr[off + b] != 0) {
              std::fprintf(stderr,
                           "gfnmap-vmm-peer: balloon-first: byte %llu of region 0 is %u, not 0 "
                           "(filled after MADV_DONTNEED)\n",
                           static_cast<unsigned long long>(off + b), r.addr[off + b]);
              bad.store(true);
              break;
            }
          }
          if (a.exit_after < 0) touched.fetch_add(1);
          continue;
        }
        if (std::memcmp(r.addr + off, file + r.offset + off, a.page) != 0) {
          for (uint64_t b = 0; b < a.page; ++b) {
            if (r.addr[off + b] != file[r.offset + off + b]) {
              std::fprintf(stderr,
                           "gfnmap-vmm-peer: byte %llu of region %u (file offset %llu) is %u, "
                           "the memory file has %u\n",
                           static_cast<unsigned long long>(off + b), pages[k].first,
                           static_cast<unsigned long long>(r.offset + off + b), r.addr[off + b],
                           file[r.offset + off + b]);
              break;
            }
          }
          bad.store(true);
        }
        if (a.exit_after < 0) touched.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  if (bad.load()) return 1;

  bool balloon_ok = true;
  if (a.balloon) {
    const Region& r = regions[0];
    const uint64_t from = b_from, len = b_len;
    if (madvise(r.addr + from, len, MADV_DONTNEED) != 0) {
      die(2, "madvise(MADV_DONTNEED): ", std::strerror(errno));
    }
    for (uint64_t b = 0; b < len; ++b) {
      if (r.addr[from + b] != 0) {
        std::fprintf(stderr,
                     "gfnmap-vmm-peer: balloon: byte %llu of region 0 is %u after "
                     "MADV_DONTNEED, not 0\n",
                     static_cast<unsigned long long>(from + b), r.addr[from + b]);
        balloon_ok = false;
        break;
      }
    }
    // The rest of the region still holds the snapshot.
    if (balloon_ok && std::memcmp(r.addr, file + r.offset, from) != 0) balloon_ok = false;
  }
  if (!balloon_ok) return 1;
  if (!a.quiet) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("gfnmap-vmm-peer: ok: %zu pages in %zu regions (%llu MiB) checked in %.3f s%s\n",
                pages.size(), regions.size(), static_cast<unsigned long long>(total >> 20), s,
                a.balloon ? "; balloon reads zero" : "");
  }
  if (a.hold) {
    std::fflush(stdout);
    alarm(0);
    for (;;) pause();
  }
  close(sock);
  return 0;
}
