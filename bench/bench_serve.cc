// gfnmap benchmark: `gfnmap serve` (uffd::ServeServer) restoring guest memory into a real other
// process. A forked child plays the VMM exactly as Firecracker does (anonymous private memory, a
// userfaultfd registered MISSING, the one JSON message with the fd in SCM_RIGHTS), then N threads
// touch every page (one read each) in sequential or random order. Restore time: handshake sent
// to the last page touched, measured in the child.
//
// Cases, all in each repetition, in an order that rotates between repetitions (same_run.h):
//   minimal   Firecracker's example handler shape: one thread, one UFFDIO_COPY per fault
//   serve     ServeServer, demand only (--threads 2, fault-around 64K unless --fault-around)
//   seq       ServeServer --prefetch sequential
//   ws        ServeServer --prefetch FILE, a working set recorded by an earlier (untimed) run
//   floors    in the child: 2 MiB UFFDIO_COPY of every page (its own userfaultfd, no faults),
//             then the touching threads' first touch of that populated memory, same order
//
//   build/release/bench/bench_serve [--mib 256[,1024]] [--threads 2,4] [--orders random]
//                                   [--reps 5] [--server-threads 2] [--fault-around 65536]
//                                   [--server-nice 0]
// The defaults (in brackets) take about 3 minutes on a 2-core VM; the full matrix is
// --threads 1,2,4 --orders seq,random (about 9 minutes at 256 MiB; 1 GiB about 4x that).
// Prints the host facts, every repetition, then medians and within-repetition ratios.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gfnmap/host_facts.h"
#include "gfnmap/serve.h"
#include "host_facts_banner.h"
#include "minimal_uffd_handler.h"

namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kPage = 4096;

double secs_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<unsigned> parse_list(const char* s) {
  std::vector<unsigned> v;
  for (const char* p = s; *p;) {
    v.push_back(static_cast<unsigned>(std::strtoul(p, const_cast<char**>(&p), 10)));
    if (*p == ',') ++p;
    else if (*p) break;
  }
  return v;
}

// The memory file: a non-zero pattern (no zero pages), in /var/tmp, kept in the page cache.
std::string make_memfile(const std::string& dir, uint64_t size) {
  const std::string path = dir + "/mem";
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  std::vector<char> buf(kMiB);
  for (uint64_t off = 0; off < size; off += kMiB) {
    for (uint64_t i = 0; i < kMiB; i += 64) buf[i] = static_cast<char>((off + i) / kPage % 251 + 1);
    if (pwrite(fd, buf.data(), kMiB, static_cast<off_t>(off)) != static_cast<ssize_t>(kMiB)) {
      std::perror("pwrite");
      std::exit(2);
    }
  }
  close(fd);
  return path;
}

int make_uffd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -1;
    fd = ioctl(dev, _IO(0xAA, 0x00), O_CLOEXEC | O_NONBLOCK);
    close(dev);
  }
  if (fd < 0) return -1;
  uffdio_api api{UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) return -1;
  return fd;
}

// Touches every page of [base, +size) once (a read) with `threads` threads, page k by thread
// k % threads, in `order`. Seconds.
double touch(const char* base, const std::vector<uint32_t>& order, unsigned threads) {
  std::atomic<unsigned> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> ts;
  std::chrono::steady_clock::time_point t0;
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      for (size_t k = t; k < order.size(); k += threads) {
        (void)*reinterpret_cast<const volatile char*>(base + uint64_t{order[k]} * kPage);
      }
    });
  }
  while (ready.load() < threads) {
  }
  t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : ts) th.join();
  return secs_since(t0);
}

struct ChildResult {
  double restore = -1;     // handshake sent -> last page touched
  double copy_floor = -1;  // floors: 2 MiB UFFDIO_COPY of everything
  double touch_floor = -1; // floors: first touch of the populated memory
};

// The VMM: forked; writes a ChildResult to `out`. floors: no server, measure the floors.
[[noreturn]] void vmm_child(const std::string& sock_path, const std::string& memfile,
                            uint64_t size, unsigned threads, bool random, bool floors, int out) {
  ChildResult res;
  std::vector<uint32_t> order(size / kPage);
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  if (random) std::shuffle(order.begin(), order.end(), std::mt19937_64(42));
  auto* mem = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  madvise(mem, size, MADV_NOHUGEPAGE);
  int uffd = make_uffd();
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(mem), size};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (mem == MAP_FAILED || uffd < 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) _exit(2);
  if (floors) {
    int mfd = open(memfile.c_str(), O_RDONLY | O_CLOEXEC);
    auto* file = static_cast<const char*>(mmap(nullptr, size, PROT_READ, MAP_SHARED, mfd, 0));
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t off = 0; off < size; off += 2 * kMiB) {
      uffdio_copy c{reinterpret_cast<uint64_t>(mem + off), reinterpret_cast<uint64_t>(file + off),
                    std::min(2 * kMiB, size - off), 0, 0};
      if (ioctl(uffd, UFFDIO_COPY, &c) != 0) _exit(2);
    }
    res.copy_floor = secs_since(t0);
    res.touch_floor = touch(mem, order, threads);
  } else {
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, sock_path.c_str(), sock_path.size() + 1);
    if (connect(sock, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) _exit(2);
    const std::string json = "[{\"base_host_virt_addr\":" +
                             std::to_string(reinterpret_cast<uint64_t>(mem)) +
                             ",\"size\":" + std::to_string(size) +
                             ",\"offset\":0,\"page_size\":4096,\"page_size_kib\":4096}]";
    iovec iov{const_cast<char*>(json.data()), json.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
    const auto t0 = std::chrono::steady_clock::now();
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(json.size())) _exit(2);
    touch(mem, order, threads);
    res.restore = secs_since(t0);
  }
  if (write(out, &res, sizeof res) != sizeof res) _exit(2);
  _exit(0);
}

struct Child {
  pid_t pid = -1;
  int rd = -1;
};

Child fork_vmm(const std::string& sock, const std::string& memfile, uint64_t size,
               unsigned threads, bool random, bool floors) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) std::exit(2);
  std::fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    vmm_child(sock, memfile, size, threads, random, floors, p[1]);
  }
  close(p[1]);
  return {pid, p[0]};
}

ChildResult finish(Child c) {
  ChildResult r;
  if (read(c.rd, &r, sizeof r) != sizeof r) r = ChildResult{};
  close(c.rd);
  int st = 0;
  waitpid(c.pid, &st, 0);
  return r;
}

// The minimal handler: accepts one connection, takes its fd, serves it from one thread.
ChildResult run_minimal(const std::string& dir, const std::string& memfile, uint64_t size,
                        unsigned threads, bool random) {
  const std::string sock = dir + "/min.sock";
  unlink(sock.c_str());
  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, sock.c_str(), sock.size() + 1);
  if (bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 || listen(ls, 1) != 0) {
    std::exit(2);
  }
  Child c = fork_vmm(sock, memfile, size, threads, random, false);
  int conn = accept4(ls, nullptr, nullptr, SOCK_CLOEXEC);
  char buf[4096];
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  iovec iov{buf, sizeof buf - 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
  int uffd = -1;
  if (n > 0 && CMSG_FIRSTHDR(&msg)) std::memcpy(&uffd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof uffd);
  buf[n > 0 ? n : 0] = 0;
  const uint64_t base = std::strtoull(std::strstr(buf, ":") + 1, nullptr, 10);
  int snap = open(memfile.c_str(), O_RDONLY | O_CLOEXEC);
  ChildResult r;
  {
    gfnmap::bench::MinimalUffdHandler h(uffd, reinterpret_cast<const char*>(base), snap);
    r = finish(c);
  }
  close(snap);
  close(uffd);
  close(conn);
  close(ls);
  return r;
}

uint64_t g_fault_around = 64u << 10;  // ServeOptions::fault_around_bytes of every served case
int g_server_nice = 0;                // ServeOptions::handler_nice of every served case

struct ServeResult {
  ChildResult child;
  gfnmap::uffd::SessionReport report;
};

ServeResult run_serve(const std::string& dir, const std::string& memfile, uint64_t size,
                      unsigned threads, bool random, unsigned server_threads, bool seq,
                      const std::vector<uint64_t>* ws, bool record) {
  gfnmap::uffd::ServeOptions o;
  o.fault_around_bytes = g_fault_around;
  o.handler_nice = g_server_nice;
  o.socket_path = dir + "/serve.sock";
  o.memory_file = memfile;
  o.threads = server_threads;
  o.prefetch_sequential = seq;
  if (ws) o.prefetch_working_set = *ws;
  o.record_working_set = record;
  std::mutex mu;
  std::condition_variable cv;
  bool ended = false;
  ServeResult res;
  o.on_session_end = [&](const gfnmap::uffd::SessionReport& r) {
    std::lock_guard g(mu);
    res.report = r;
    ended = true;
    cv.notify_all();
  };
  auto server = gfnmap::uffd::ServeServer::create(o);
  if (!server.ok() || !(*server)->start().ok()) {
    std::fprintf(stderr, "bench_serve: server: %s\n",
                 server.ok() ? "start" : server.error().message.c_str());
    std::exit(2);
  }
  Child c = fork_vmm(o.socket_path, memfile, size, threads, random, false);
  res.child = finish(c);
  std::unique_lock g(mu);
  cv.wait_for(g, std::chrono::seconds(30), [&] { return ended; });
  g.unlock();
  (*server)->stop();
  return res;
}

std::map<std::string, std::vector<double>> g_samples;
void rec(const std::string& k, double v) { g_samples[k].push_back(v); }
double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}
double med(const std::string& k) {
  auto it = g_samples.find(k);
  return it == g_samples.end() ? 0 : median(it->second);
}

}  // namespace

int main(int argc, char** argv) {
  // The default run (about 3 minutes on a 2-core VM): 256 MiB, 2 and 4 threads, random order.
  std::vector<unsigned> mibs{256}, threads{2, 4};
  std::vector<std::string> orders{"random"};
  unsigned reps = 5, server_threads = 2;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (k == "--mib") mibs = parse_list(v), ++i;
    else if (k == "--threads") threads = parse_list(v), ++i;
    else if (k == "--reps") reps = static_cast<unsigned>(std::atoi(v)), ++i;
    else if (k == "--server-threads") server_threads = static_cast<unsigned>(std::atoi(v)), ++i;
    else if (k == "--fault-around") g_fault_around = std::strtoull(v, nullptr, 10), ++i;
    else if (k == "--server-nice") g_server_nice = std::atoi(v), ++i;
    else if (k == "--orders") {
      orders.clear();
      for (std::string s = v; !s.empty();) {
        const size_t c = s.find(',');
        orders.push_back(s.substr(0, c));
        s = c == std::string::npos ? "" : s.substr(c + 1);
      }
      ++i;
    } else {
      std::fprintf(stderr,
                   "usage: bench_serve [--mib 256,1024] [--threads 1,2,4] [--orders seq,random] "
                   "[--reps 5] [--server-threads 2] [--fault-around BYTES] [--server-nice N]\n");
      return 2;
    }
  }
  const gfnmap::HostFacts& f = gfnmap::host_facts();
  std::printf("host: %s\nhost kind: %s\n", gfnmap::bench::host_summary(f).c_str(),
              gfnmap::bench::host_kind(f).c_str());
  std::printf("cpus: %u, server threads: %u (nice %d), fault-around: %llu bytes, "
              "repetitions: %u\n",
              std::thread::hardware_concurrency(), server_threads, g_server_nice,
              static_cast<unsigned long long>(g_fault_around), reps);
  if (!f.uffd_available()) {
    std::printf("userfaultfd unavailable: %s\n", f.uffd_why.c_str());
    return 0;
  }
  char tmpl[] = "/var/tmp/gfnmap-bench-serve-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const char* cases[] = {"minimal", "serve", "seq", "ws", "floors"};
  std::vector<std::string> keys;
  for (unsigned mib : mibs) {
    const uint64_t size = uint64_t{mib} * kMiB;
    const std::string memfile = make_memfile(dir, size);
    for (const std::string& ord : orders) {
      const bool random = ord == "random";
      for (unsigned t : threads) {
        const std::string cfg = std::to_string(mib) + " MiB, " + std::to_string(t) + " thr, " + ord;
        keys.push_back(cfg);
        // The working set: recorded by an earlier run of the same restore (untimed).
        std::vector<uint64_t> ws;
        for (auto& e : run_serve(dir, memfile, size, t, random, server_threads, false, nullptr, true)
                           .report.working_set) {
          ws.push_back(e.offset);
        }
        for (unsigned rep = 0; rep < reps; ++rep) {
          std::map<std::string, double> secs;
          for (unsigned k = 0; k < 5; ++k) {
            const std::string c = cases[(rep + k) % 5];
            if (c == "minimal") {
              secs[c] = run_minimal(dir, memfile, size, t, random).restore;
            } else if (c == "floors") {
              ChildResult r = finish(fork_vmm("", memfile, size, t, random, true));
              secs["copy floor"] = r.copy_floor;
              secs["touch floor"] = r.touch_floor;
            } else {
              ServeResult r = run_serve(dir, memfile, size, t, random, server_threads, c == "seq",
                                        c == "ws" ? &ws : nullptr, false);
              secs[c] = r.child.restore;
              rec(cfg + " | " + c + " p50 us", r.report.latency_p50_ns / 1e3);
              rec(cfg + " | " + c + " p99 us", r.report.latency_p99_ns / 1e3);
              if (r.report.latency_p50_ns > 0) {
                rec(cfg + " | " + c + " p99 / p50",
                    static_cast<double>(r.report.latency_p99_ns) / r.report.latency_p50_ns);
              }
              rec(cfg + " | " + c + " demand faults", static_cast<double>(r.report.faults));
              rec(cfg + " | " + c + " max copies in flight",
                  static_cast<double>(r.report.max_copies_in_flight));
            }
          }
          const double floor = std::max(secs["copy floor"], secs["touch floor"]);
          for (auto& [c, s] : secs) rec(cfg + " | " + c + " ms", s * 1e3);
          rec(cfg + " | serve / minimal", secs["serve"] / secs["minimal"]);
          rec(cfg + " | seq / floor", secs["seq"] / floor);
          rec(cfg + " | ws / floor", secs["ws"] / floor);
          rec(cfg + " | serve / floor", secs["serve"] / floor);
          rec(cfg + " | minimal / floor", secs["minimal"] / floor);
          // What any restore that copies everything can reach on this many CPUs: the copy
          // floor's CPU time and the touching threads' (the touch floor on min(threads, cpus)
          // CPUs) shared by the cpus, or the larger floor. Over the floor: the ws goal's limit.
          const double cpus = std::max(1u, std::thread::hardware_concurrency());
          const double busy = std::min<double>(t, cpus);
          rec(cfg + " | cpu bound / floor",
              std::max(floor, (secs["copy floor"] + secs["touch floor"] * busy) / cpus) / floor);
        }
        std::printf("done: %s\n", cfg.c_str());
        std::fflush(stdout);
      }
    }
  }
  std::printf("\nEvery repetition:\n");
  for (auto& [k, v] : g_samples) {
    std::printf("  %-52s", k.c_str());
    for (double x : v) std::printf(" %.2f", x);
    std::printf("\n");
  }
  std::printf(
      "\nMedians (ms; ratios are medians of within-repetition ratios; floor = max(2M-copy, "
      "touch)):\n");
  std::printf("| config | minimal | serve | seq | ws | copy floor | touch floor | serve/minimal | "
              "ws/floor | cpu bound/floor | seq/floor | serve p50/p99 us | seq p50/p99 us | ws p50/p99 us | serve "
              "demand faults | ws demand faults |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& c : keys) {
    auto m = [&](const char* s) { return med(c + " | " + s); };
    std::printf("| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.2fx | %.2fx | %.2fx | %.2fx | %.0f / %.0f "
                "| %.0f / %.0f | %.0f / %.0f | %.0f | %.0f |\n",
                c.c_str(), m("minimal ms"), m("serve ms"), m("seq ms"), m("ws ms"),
                m("copy floor ms"), m("touch floor ms"), m("serve / minimal"), m("ws / floor"),
                m("cpu bound / floor"), m("seq / floor"), m("serve p50 us"), m("serve p99 us"), m("seq p50 us"),
                m("seq p99 us"), m("ws p50 us"), m("ws p99 us"), m("serve demand faults"),
                m("ws demand faults"));
  }
  std::string rm = "rm -rf '" + dir + "'";
  int rc = std::system(rm.c_str());
  (void)rc;
  return 0;
}
