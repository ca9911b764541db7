// gfnmap CLI verb `serve`: the page server a VMM hands its userfaultfd to (Firecracker's `Uffd`
// memory backend): `gfnmap serve SOCKET MEMFILE`, the form Firecracker's test harness starts a
// handler with. The work is uffd::ServeServer (gfnmap/serve.h); this verb adds signals, --once,
// --connect-timeout, per-session reports and --stats (docs/serve.md).
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "gfnmap/serve.h"
#include "verb.h"

namespace {

constexpr const char* kServeHelp = R"(Listens on the Unix socket SOCKET and serves guest memory from MEMFILE to each VMM that
connects (Firecracker: mem_backend {"backend_type": "Uffd", "backend_path": SOCKET}). A
connection is one session: one message, a JSON array of regions {base_host_virt_addr, size,
offset, page_size} with the VMM's userfaultfd in SCM_RIGHTS; then every missing-page fault
of that VMM is served from MEMFILE (mapped once for all sessions): UFFDIO_COPY of the page
and, with --fault-around (default 64K), of the pages around it in its aligned block that are
not placed yet and not discarded (off: one page per fault); UFFDIO_ZEROPAGE for a page that is
all zero or that the VMM discarded (UFFD_EVENT_REMOVE: balloon, free-page reporting).
Fault-around costs the VMM up to that much resident memory per fault for pages it may never
touch. Several --threads may serve one VMM's faults at once. A bad handshake is refused (the reason names the field) and
closes that session only. A session ends when its VMM exits.

Each session is logged when it starts (peer pid from SO_PEERCRED) and reported when it ends:
handshake time, time of the last demand fault, faults served with p50/p99/max latency, pages
copied, zeroed and prefetched, removes, EAGAIN deferrals, EEXIST wakes (--json: one JSON
object per line).

Working sets: --record FILE writes the pages a restore touched first, in order (offset into
MEMFILE and time after the handshake; a versioned text file, docs/serve.md). --prefetch FILE
then copies those pages right after each handshake, in the background and in that order (runs
of contiguous pages in one UFFDIO_COPY of up to 2 MiB); --prefetch sequential fills every
region front to back. Demand faults always go first; a page the VMM discarded is never
prefetched, and no page is copied twice.
A fatal error after the handshake (the memory file unreadable, e.g. truncated; a failing
ioctl) ends that session as failed; its VMM's faults are then never served and it hangs.
--on-fatal kill-vmm SIGKILLs that VMM (its SO_PEERCRED pid) instead; the default, leave, does
not touch another process.
SIGTERM or SIGINT stops the server: sessions still running end ("server stopped"); their
VMMs' pending faults are then never served, so stop the VMMs first.
Exit status: 0 every session ended well; 1 a session failed (a refused handshake, a serving
error) or no VMM connected within --connect-timeout; 2 bad usage or an unusable MEMFILE or
SOCKET. Protocol and failure semantics: docs/serve.md.)";

struct ServeArgs {
  std::string socket;
  std::string memfile;
  unsigned threads = 2;
  int nice = 0;
  std::string fault_around = "64K";
  bool once = false;
  double connect_timeout = 0;
  std::string stats;
  bool json = false;
  std::string prefetch = "off";
  std::string record;
  std::string on_fatal = "leave";
};

int run_serve(const ServeArgs& a) {
  std::mutex out_mu;
  FILE* stats = nullptr;
  if (!a.stats.empty()) {
    stats = std::fopen(a.stats.c_str(), "w");
    if (!stats) {
      std::fprintf(stderr, "gfnmap serve: --stats %s: cannot open for writing\n", a.stats.c_str());
      return 2;
    }
  }
  const bool tty = isatty(2) != 0 && !a.json;
  std::atomic<uint64_t> faults_total{0};
  gfnmap::uffd::ServeOptions o;
  o.socket_path = a.socket;
  o.memory_file = a.memfile;
  o.threads = a.threads;
  o.handler_nice = a.nice;
  if (a.fault_around == "off") {
    o.fault_around_bytes = 4096;
  } else {
    char* end = nullptr;
    uint64_t v = std::strtoull(a.fault_around.c_str(), &end, 10);
    if (end && (*end == 'K' || *end == 'k')) v <<= 10, ++end;
    else if (end && (*end == 'M' || *end == 'm')) v <<= 20, ++end;
    if (!end || *end || end == a.fault_around.c_str() || v < 4096 || v > (2u << 20) ||
        (v & (v - 1)) != 0) {
      std::fprintf(stderr, "gfnmap serve: --fault-around: '%s' is not off or a power of two "
                           "from 4K to 2M\n", a.fault_around.c_str());
      if (stats) std::fclose(stats);
      return 2;
    }
    o.fault_around_bytes = v;
  }
  if (a.prefetch == "sequential") {
    o.prefetch_sequential = true;
  } else if (a.prefetch != "off") {
    auto ws = gfnmap::uffd::read_working_set(a.prefetch);
    if (!ws.ok()) {
      std::fprintf(stderr, "gfnmap serve: --prefetch: %s\n", ws.error().message.c_str());
      if (stats) std::fclose(stats);
      return 2;
    }
    for (const auto& e : *ws) o.prefetch_working_set.push_back(e.offset);
  }
  o.record_working_set = !a.record.empty();
  o.kill_peer_on_fatal = a.on_fatal == "kill-vmm";
  o.on_session_start = [&](const gfnmap::uffd::SessionReport& r) {
    uint64_t bytes = 0;
    for (const auto& g : r.regions) bytes += g.size;
    std::lock_guard g(out_mu);
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (a.json) {
      std::printf("{\"event\":\"session_start\",\"session\":%llu,\"peer_pid\":%d,\"regions\":%zu,"
                  "\"bytes\":%llu,\"handshake_ns\":%llu}\n",
                  static_cast<unsigned long long>(r.id), r.peer_pid, r.regions.size(),
                  static_cast<unsigned long long>(bytes),
                  static_cast<unsigned long long>(r.handshake_ns));
    } else {
      std::printf("session %llu (pid %d): serving %zu regions, %llu MiB (page size %llu)\n",
                  static_cast<unsigned long long>(r.id), r.peer_pid, r.regions.size(),
                  static_cast<unsigned long long>(bytes >> 20),
                  static_cast<unsigned long long>(r.regions.empty() ? 0
                                                                    : r.regions[0].page_size));
    }
    std::fflush(stdout);
  };
  o.on_session_end = [&](const gfnmap::uffd::SessionReport& r) {
    faults_total.fetch_add(r.faults_served);
    const std::string j = gfnmap::uffd::to_json(r);
    std::lock_guard g(out_mu);
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (a.json) {
      std::printf("{\"event\":\"session_end\",%s\n", j.c_str() + 1);
    } else {
      std::printf("%s\n", gfnmap::uffd::to_string(r).c_str());
    }
    std::fflush(stdout);
    if (stats) {
      std::fprintf(stats, "%s\n", j.c_str());
      std::fflush(stats);
    }
    if (!a.record.empty() && r.accepted) {
      // The last session to end wins: one file holds one restore's working set.
      auto w = gfnmap::uffd::write_working_set(a.record, r.working_set);
      if (!w.ok()) {
        std::fprintf(stderr, "gfnmap serve: --record: %s\n", w.error().message.c_str());
      } else if (!a.json) {
        std::printf("session %llu: working set of %zu pages written to %s\n",
                    static_cast<unsigned long long>(r.id), r.working_set.size(),
                    a.record.c_str());
      }
    }
  };

  // SIGTERM/SIGINT are taken by this thread only (the server's threads inherit the mask).
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  auto server = gfnmap::uffd::ServeServer::create(o);
  if (!server.ok()) {
    std::fprintf(stderr, "gfnmap serve: %s\n", server.error().message.c_str());
    if (stats) std::fclose(stats);
    return 2;
  }
  if (auto s = (*server)->start(); !s.ok()) {
    std::fprintf(stderr, "gfnmap serve: %s\n", s.error().message.c_str());
    if (stats) std::fclose(stats);
    return 2;
  }
  {
    std::lock_guard g(out_mu);
    if (a.json) {
      std::printf("{\"event\":\"listening\",\"socket\":\"%s\",\"memory_file_bytes\":%llu,"
                  "\"threads\":%u}\n",
                  a.socket.c_str(), static_cast<unsigned long long>((*server)->memory_file_size()),
                  a.threads);
    } else {
      std::printf("gfnmap serve: listening on %s, memory file %s (%llu MiB), %u threads\n",
                  a.socket.c_str(), a.memfile.c_str(),
                  static_cast<unsigned long long>((*server)->memory_file_size() >> 20), a.threads);
    }
    std::fflush(stdout);
  }

  int rc = 0;
  const timespec tick{0, 100'000'000};
  double waited = 0;
  unsigned ticks = 0;
  bool nice_warned = false;
  for (;;) {
    siginfo_t info;
    int sig = sigtimedwait(&set, &info, &tick);
    if (sig == SIGTERM || sig == SIGINT) {
      std::lock_guard g(out_mu);
      if (tty) std::fprintf(stderr, "\r\033[K");
      std::fprintf(stderr, "gfnmap serve: %s, stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
      break;
    }
    waited += 0.1;
    const auto& srv = **server;
    if (a.nice != 0 && !nice_warned && srv.handler_nice_failed()) {
      nice_warned = true;
      std::lock_guard g(out_mu);
      std::fprintf(stderr, "gfnmap serve: --nice %d refused (needs CAP_SYS_NICE); the handler "
                           "threads keep the inherited nice value\n", a.nice);
    }
    if (a.once && srv.sessions_ended() > 0 && srv.active_sessions() == 0) break;
    if (a.connect_timeout > 0 && srv.sessions_started() == 0 && waited >= a.connect_timeout) {
      std::fprintf(stderr, "gfnmap serve: no VMM connected to %s within %g s\n", a.socket.c_str(),
                   a.connect_timeout);
      rc = 1;
      break;
    }
    if (tty && ++ticks % 10 == 0) {
      std::lock_guard g(out_mu);
      std::fprintf(stderr, "\r\033[Ksessions: %u active, %llu ended (%llu failed)",
                   srv.active_sessions(), static_cast<unsigned long long>(srv.sessions_ended()),
                   static_cast<unsigned long long>(srv.sessions_failed()));
    }
  }
  (*server)->stop();
  const uint64_t failed = (*server)->sessions_failed();
  const uint64_t ended = (*server)->sessions_ended();
  server->reset();
  if (stats) std::fclose(stats);
  if (a.json) {
    std::printf("{\"event\":\"exit\",\"sessions\":%llu,\"failed\":%llu,\"faults_served\":%llu}\n",
                static_cast<unsigned long long>(ended), static_cast<unsigned long long>(failed),
                static_cast<unsigned long long>(faults_total.load()));
  } else {
    std::printf("gfnmap serve: %llu sessions, %llu failed, %llu faults served\n",
                static_cast<unsigned long long>(ended), static_cast<unsigned long long>(failed),
                static_cast<unsigned long long>(faults_total.load()));
  }
  std::fflush(stdout);
  if (failed > 0) rc = 1;
  return rc;
}

GFNMAP_VERB("serve", "serve guest memory to VMMs' userfaultfds (Firecracker's Uffd backend)",
            [](CLI::App& cmd) -> std::function<int()> {
              cmd.footer(kServeHelp);
              static ServeArgs a;
              cmd.add_option("SOCKET", a.socket, "Unix socket path to listen on")->required();
              cmd.add_option("MEMFILE", a.memfile, "guest memory snapshot file")->required();
              cmd.add_option("--threads", a.threads, "handler threads shared by all sessions")
                  ->check(CLI::Range(1, 64))
                  ->default_val(2);
              cmd.add_option("--nice", a.nice,
                             "nice value of the handler threads (-20..19; below the process's "
                             "needs CAP_SYS_NICE; default: inherited)")
                  ->check(CLI::Range(-20, 19));
              cmd.add_option("--fault-around", a.fault_around,
                             "also place the free pages around a demand fault in its aligned "
                             "block of this size (4K..2M, power of two; off: one page)")
                  ->default_val("64K");
              cmd.add_flag("--once", a.once, "serve one VMM, exit when its session ends");
              cmd.add_option("--connect-timeout", a.connect_timeout,
                             "exit with status 1 if no VMM connects within S seconds")
                  ->check(CLI::PositiveNumber);
              cmd.add_option("--stats", a.stats, "write each session's report as a JSON line");
              cmd.add_flag("--json", a.json, "print events and reports as JSON lines");
              cmd.add_option("--prefetch", a.prefetch,
                             "off, sequential (every region front to back), or a working-set "
                             "FILE written by --record (its pages first, in order)")
                  ->default_val("off");
              cmd.add_option("--record", a.record,
                             "write the working set (pages in first-touch order) of each session "
                             "to FILE when it ends (the last session wins)");
              cmd.add_option("--on-fatal", a.on_fatal,
                             "leave (default) or kill-vmm: SIGKILL a VMM whose session failed "
                             "after its handshake, rather than leave it hung")
                  ->check(CLI::IsMember({"leave", "kill-vmm"}))
                  ->default_val("leave");
              return [] { return run_serve(a); };
            });

}  // namespace
