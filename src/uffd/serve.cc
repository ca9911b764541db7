// gfnmap serve: sessions of the page server for other processes' userfaultfds. One epoll set
// holds the listening socket, a stop eventfd and, per session, its connection and (after the
// handshake) the VMM's userfaultfd, each EPOLLONESHOT. The userfaultfd is re-armed as soon as a
// thread has read a batch, so several threads may serve one session: reads and bookkeeping
// under the session lock, UFFDIO_COPY/ZEROPAGE without it. Faults are served from the memory
// file mapped once (docs/serve.md).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <csetjmp>
#include <csignal>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "gfnmap/serve.h"

namespace gfnmap::uffd {

namespace {

constexpr uint64_t kTagListen = 0;
constexpr uint64_t kTagStop = 1;
constexpr uint64_t kKindSocket = 1;
constexpr uint64_t kKindUffd = 2;
constexpr uint64_t kKindPrefetch = 3;
constexpr uint64_t kKindHelp = 0;  // a session's tag is never 0 or 1 (ids start at 1)
constexpr size_t kMaxHandshakeBytes = 1 << 20;
constexpr int kMaxFds = 16;
constexpr uint64_t k2M = 2u << 20;
// The largest UFFDIO_COPY of a prefetch. A prefetch copy runs without the session lock, so a
// demand fault never waits for it to finish, except to read the userfaultfd (a REMOVE read
// while a prefetch copy is in flight could be zapped before the copy places its pages): that
// wait is at most one copy this big.
constexpr uint64_t kPrefetchCopyBytes = 128u << 10;

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

bool all_zero(const std::byte* p, size_t n) {
  uint64_t acc = 0;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc |= w;
    if ((i & 511) == 504 && acc) return false;
  }
  return acc == 0;
}

// Reading the memory file through the mapping raises SIGBUS where the file was truncated after
// it was mapped. The zero check is the one read the server itself does (UFFDIO_COPY reads in
// the kernel, which gives EFAULT instead); it runs under a guard that turns the SIGBUS into an
// error for that session. The handler is installed once; any other SIGBUS goes to the handler
// that was there before (a sanitizer's, the application's) or gets the default action.
thread_local sigjmp_buf t_bus_jmp;
thread_local volatile sig_atomic_t t_bus_guard = 0;
struct sigaction g_old_bus {};

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (t_bus_guard) siglongjmp(t_bus_jmp, 1);
  if (g_old_bus.sa_flags & SA_SIGINFO) {
    g_old_bus.sa_sigaction(sig, info, ctx);
  } else if (g_old_bus.sa_handler != SIG_DFL && g_old_bus.sa_handler != SIG_IGN) {
    g_old_bus.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);  // returning re-runs the access, which now kills
  }
}

void install_sigbus_guard() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

// 1: all zero, 0: not, -1: the file could not be read there (SIGBUS).
int guarded_all_zero(const std::byte* p, size_t n) {
  if (sigsetjmp(t_bus_jmp, 0) != 0) {
    t_bus_guard = 0;
    return -1;
  }
  t_bus_guard = 1;
  const bool z = all_zero(p, n);
  t_bus_guard = 0;
  return z ? 1 : 0;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// The JSON array is complete once its brackets balance (strings skipped). A message that does
// not start with '[' is complete at once (it is malformed; the parser says how).
bool json_complete(const std::string& s) {
  int depth = 0;
  bool in_string = false, started = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
      continue;
    }
    if (!started) {
      if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
      if (c != '[') return true;
      started = true;
    }
    if (c == '"') in_string = true;
    if (c == '[' || c == '{') ++depth;
    if (c == ']' || c == '}') {
      if (--depth == 0) return true;
    }
  }
  return false;
}

bool is_userfaultfd(int fd) {
  char link[64], target[128];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n <= 0) return false;
  target[n] = 0;
  return std::strstr(target, "userfaultfd") != nullptr;
}

// Half-open intervals [start, end), merged.
class RangeSet {
 public:
  void add(uint64_t s, uint64_t e) {
    if (s >= e) return;
    auto it = m_.upper_bound(s);
    if (it != m_.begin()) {
      auto prev = std::prev(it);
      if (prev->second >= s) {
        s = prev->first;
        e = std::max(e, prev->second);
        it = m_.erase(prev);
      }
    }
    while (it != m_.end() && it->first <= e) {
      e = std::max(e, it->second);
      it = m_.erase(it);
    }
    m_[s] = e;
  }
  bool contains(uint64_t a) const {
    auto it = m_.upper_bound(a);
    if (it == m_.begin()) return false;
    return std::prev(it)->second > a;
  }
  // Removes [s, e) and returns the pieces that were inside it.
  std::vector<std::pair<uint64_t, uint64_t>> cut(uint64_t s, uint64_t e) {
    std::vector<std::pair<uint64_t, uint64_t>> inside, keep;
    for (auto it = m_.begin(); it != m_.end();) {
      const uint64_t rs = it->first, re = it->second;
      if (re <= s || rs >= e) {
        ++it;
        continue;
      }
      if (rs < s) keep.emplace_back(rs, s);
      if (re > e) keep.emplace_back(e, re);
      inside.emplace_back(std::max(rs, s), std::min(re, e));
      it = m_.erase(it);
    }
    for (auto& [a, b] : keep) m_[a] = b;
    return inside;
  }

 private:
  std::map<uint64_t, uint64_t> m_;
};

enum class Phase { kHandshake, kServing };

struct Session {
  std::mutex mu;
  // UFFDIO_COPY/ZEROPAGE calls in flight without mu held (demand or prefetch; counted under mu).
  // Reading the userfaultfd and closing it wait until there are none (cv): a REMOVE read lets
  // the VMM's madvise go on to zap the range, and a copy that started before the read could
  // place its pages after that zap. cv is also signalled when claims (placed == 1) resolve.
  int inflight = 0;
  std::condition_variable_any cv;
  uint64_t id = 0;
  int sock = -1;
  int uffd = -1;
  int prefetch_fd = -1;  // an eventfd kept readable while prefetch has work left
  // An eventfd made readable to call another handler thread to the fault queue (more than one
  // fault read at once); help_called: written and not yet taken.
  int help_fd = -1;
  bool help_called = false;
  bool closed = false;
  Phase phase = Phase::kHandshake;
  std::string buf;
  std::vector<int> fds;  // received in SCM_RIGHTS during the handshake
  uint64_t t_connect = 0, t_handshake = 0, deadline = 0;
  std::vector<ServeRegion> regions;  // sorted by base after the handshake
  RangeSet removed;                  // REMOVE'd: served as zero pages from now on
  std::deque<std::pair<uint64_t, uint64_t>> pending;  // faults read: (address, read time)
  std::vector<uint64_t> latencies;
  std::vector<std::pair<uint64_t, uint64_t>> plan;  // prefetch runs: (address, length)
  size_t plan_next = 0;
  // By 4K page of the memory file: 0 not placed, 1 claimed (a copy of it is in flight), 2
  // placed. A copy claims its pages first; prefetch and fault-around take only pages at 0, so
  // no page is copied twice; a demand fault of a claimed page waits for the claim to resolve.
  // A REMOVE puts its pages back to 0 (they are gone; later faults get zero pages). Under mu.
  std::vector<uint8_t> placed;
  uint64_t prefetch_done_ns = 0;
  std::unordered_set<uint64_t> recorded;  // file offsets already in report.working_set
  SessionReport report;
};

}  // namespace

struct ServeServer::Impl {
  ServeOptions options;
  int mem_fd = -1;
  const std::byte* mem = nullptr;
  uint64_t mem_size = 0;
  std::byte* zero2m = nullptr;  // 2M of zeros (a read-only anonymous mapping) for 2M pages
  int listen_fd = -1;
  int epfd = -1;
  int stop_fd = -1;
  std::vector<std::thread> threads;
  std::atomic<bool> started{false}, stopping{false}, stopped{false};
  std::atomic<bool> nice_failed{false};
  std::mutex stop_mu;

  mutable std::mutex mu;  // sessions
  std::unordered_map<uint64_t, std::shared_ptr<Session>> sessions;
  std::atomic<uint64_t> next_id{1}, ended{0}, failed{0};
  std::atomic<uint64_t> last_sweep{0};

  ~Impl() {
    if (listen_fd >= 0) {
      close(listen_fd);
      unlink(options.socket_path.c_str());
    }
    if (epfd >= 0) close(epfd);
    if (stop_fd >= 0) close(stop_fd);
    if (mem) munmap(const_cast<std::byte*>(mem), mem_size);
    if (zero2m) munmap(zero2m, k2M);
    if (mem_fd >= 0) close(mem_fd);
  }

  void loop();
  void accept_all();
  void handle(const std::shared_ptr<Session>& s, uint64_t kind, uint32_t events);
  void handshake(Session& s, uint32_t events);
  void serve(Session& s, std::unique_lock<std::mutex>& lk, bool* rearm_uffd);
  bool read_messages(Session& s, int* err = nullptr);
  bool serve_fault(Session& s, std::unique_lock<std::mutex>& lk, uint64_t addr, uint64_t t_read);
  void serve_pending(Session& s, std::unique_lock<std::mutex>& lk);
  void clear_placed(Session& s, uint64_t start, uint64_t end);
  void build_plan(Session& s);
  bool prefetch_turn(Session& s, std::unique_lock<std::mutex>& lk);
  void mark_placed(Session& s, uint64_t off, uint64_t len, uint8_t v);
  void apply_unmap(Session& s, uint64_t start, uint64_t end);
  void apply_remap(Session& s, uint64_t from, uint64_t to, uint64_t len);
  void end(Session& s, bool failed, std::string reason);
  void sweep();
  void rearm(Session& s, int fd, uint64_t kind);
};

namespace {
uint64_t tag(uint64_t id, uint64_t kind) { return (id << 2) | kind; }
}  // namespace

Result<std::unique_ptr<ServeServer>> ServeServer::create(ServeOptions options) {
  if (options.threads == 0 || options.threads > 64) {
    return make_error(EINVAL, "serve: threads must be 1..64, not ", options.threads);
  }
  if (options.handler_nice < -20 || options.handler_nice > 19) {
    return make_error(EINVAL, "serve: handler nice value must be -20..19, not ",
                      options.handler_nice);
  }
  const uint64_t fa = options.fault_around_bytes;
  if (fa < 4096 || fa > k2M || (fa & (fa - 1)) != 0) {
    return make_error(EINVAL, "serve: fault-around must be a power of two from 4096 (off) to ",
                      k2M, " bytes, not ", fa);
  }
  sockaddr_un addr{};
  if (options.socket_path.empty() || options.socket_path.size() >= sizeof addr.sun_path) {
    return make_error(EINVAL, "serve: socket path '", options.socket_path,
                      "' is empty or longer than ", sizeof addr.sun_path - 1, " bytes");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  const std::string& path = impl->options.memory_file;
  impl->mem_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (impl->mem_fd < 0) {
    int e = errno;
    return make_error(e, "serve: memory file ", path, ": ", std::strerror(e));
  }
  struct stat st {};
  if (fstat(impl->mem_fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return make_error(EINVAL, "serve: memory file ", path, " is not a regular file");
  }
  impl->mem_size = static_cast<uint64_t>(st.st_size);
  if (impl->mem_size > 0) {
    void* p = mmap(nullptr, impl->mem_size, PROT_READ, MAP_SHARED, impl->mem_fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      return make_error(e, "serve: mmap of memory file ", path, ": ", std::strerror(e));
    }
    impl->mem = static_cast<const std::byte*>(p);
  }
  void* z = mmap(nullptr, k2M, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (z == MAP_FAILED) {
    int e = errno;
    return make_error(e, "serve: mmap: ", std::strerror(e));
  }
  impl->zero2m = static_cast<std::byte*>(z);
  install_sigbus_guard();

  impl->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (impl->listen_fd < 0) {
    int e = errno;
    return make_error(e, "serve: socket: ", std::strerror(e));
  }
  const std::string& sp = impl->options.socket_path;
  struct stat sst {};
  if (lstat(sp.c_str(), &sst) == 0 && S_ISSOCK(sst.st_mode)) unlink(sp.c_str());
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, sp.c_str(), sp.size() + 1);
  if (bind(impl->listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int e = errno;
    close(impl->listen_fd);
    impl->listen_fd = -1;  // not ours to unlink
    return make_error(e, "serve: bind ", sp, ": ", std::strerror(e));
  }
  if (listen(impl->listen_fd, 128) != 0) {
    int e = errno;
    return make_error(e, "serve: listen ", sp, ": ", std::strerror(e));
  }
  impl->epfd = epoll_create1(EPOLL_CLOEXEC);
  impl->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (impl->epfd < 0 || impl->stop_fd < 0) {
    int e = errno;
    return make_error(e, "serve: epoll/eventfd: ", std::strerror(e));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kTagListen;
  epoll_ctl(impl->epfd, EPOLL_CTL_ADD, impl->listen_fd, &ev);
  ev.data.u64 = kTagStop;
  epoll_ctl(impl->epfd, EPOLL_CTL_ADD, impl->stop_fd, &ev);
  return std::unique_ptr<ServeServer>(new ServeServer(std::move(impl)));
}

ServeServer::ServeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ServeServer::~ServeServer() { stop(); }

Result<void> ServeServer::start() {
  if (impl_->started.exchange(true)) return make_error(EINVAL, "serve: already started");
  for (unsigned i = 0; i < impl_->options.threads; ++i) {
    impl_->threads.emplace_back([this] { impl_->loop(); });
  }
  return {};
}

void ServeServer::stop() {
  std::lock_guard lk(impl_->stop_mu);
  if (impl_->stopped.exchange(true)) return;
  impl_->stopping.store(true);
  uint64_t one = 1;
  ssize_t w = write(impl_->stop_fd, &one, sizeof one);
  (void)w;
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  std::vector<std::shared_ptr<Session>> all;
  {
    std::lock_guard g(impl_->mu);
    for (auto& [id, s] : impl_->sessions) all.push_back(s);
  }
  std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a->id < b->id; });
  for (auto& s : all) {
    std::lock_guard g(s->mu);
    if (!s->closed) {
      impl_->end(*s, s->phase == Phase::kHandshake, s->phase == Phase::kHandshake
                                                        ? "server stopped during the handshake"
                                                        : "server stopped");
    }
  }
}

uint64_t ServeServer::memory_file_size() const { return impl_->mem_size; }
const std::string& ServeServer::socket_path() const { return impl_->options.socket_path; }
unsigned ServeServer::active_sessions() const {
  std::lock_guard g(impl_->mu);
  return static_cast<unsigned>(impl_->sessions.size());
}
uint64_t ServeServer::sessions_started() const { return impl_->next_id.load() - 1; }
uint64_t ServeServer::sessions_ended() const { return impl_->ended.load(); }
uint64_t ServeServer::sessions_failed() const { return impl_->failed.load(); }
bool ServeServer::handler_nice_failed() const { return impl_->nice_failed.load(); }

// ---------------------------------------------------------------------------------------------
// The handler threads.

void ServeServer::Impl::loop() {
  if (options.handler_nice != 0 &&
      setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), options.handler_nice) != 0) {
    nice_failed.store(true);
  }
  epoll_event evs[16];
  while (!stopping.load(std::memory_order_acquire)) {
    int n = epoll_wait(epfd, evs, 16, 100);
    for (int i = 0; i < n && !stopping.load(std::memory_order_acquire); ++i) {
      const uint64_t t = evs[i].data.u64;
      if (t == kTagStop) break;
      if (t == kTagListen) {
        accept_all();
        continue;
      }
      std::shared_ptr<Session> s;
      {
        std::lock_guard g(mu);
        auto it = sessions.find(t >> 2);
        if (it != sessions.end()) s = it->second;
      }
      if (s) handle(s, t & 3, evs[i].events);
    }
    sweep();
  }
}

void ServeServer::Impl::accept_all() {
  for (;;) {
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN (another thread took it) or a transient error
    auto s = std::make_shared<Session>();
    s->id = next_id.fetch_add(1);
    s->sock = fd;
    s->t_connect = now_ns();
    s->deadline = s->t_connect + uint64_t{options.handshake_timeout_ms} * 1000000;
    s->report.id = s->id;
    ucred cred{};
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) s->report.peer_pid = cred.pid;
    std::lock_guard sg(s->mu);  // the session is not served before it is armed
    {
      std::lock_guard g(mu);
      sessions[s->id] = s;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT;
    ev.data.u64 = tag(s->id, kKindSocket);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      end(*s, true, std::string("epoll_ctl: ") + std::strerror(errno));
    }
  }
}

void ServeServer::Impl::rearm(Session& s, int fd, uint64_t kind) {
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLONESHOT | (kind == kKindSocket ? uint32_t{EPOLLRDHUP} : 0u);
  ev.data.u64 = tag(s.id, kind);
  epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

void ServeServer::Impl::handle(const std::shared_ptr<Session>& sp, uint64_t kind,
                               uint32_t events) {
  Session& s = *sp;
  std::unique_lock g(s.mu);
  if (s.closed) return;
  if (kind == kKindSocket) {
    if (s.phase == Phase::kHandshake) {
      handshake(s, events);
    } else {
      // The VMM never closes the socket while it lives: EOF or an error is its exit.
      char sink[256];
      ssize_t n = recv(s.sock, sink, sizeof sink, MSG_DONTWAIT);
      if (n == 0 || (events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) ||
          (n < 0 && errno != EAGAIN && errno != EINTR)) {
        end(s, false, "peer hung up");
      }
    }
    if (!s.closed) rearm(s, s.sock, kKindSocket);
    return;
  }
  if (kind == kKindHelp) {
    uint64_t v;
    ssize_t r = read(s.help_fd, &v, sizeof v);  // not readable again until the next call
    (void)r;
    s.help_called = false;
    serve_pending(s, g);
    if (!s.closed) rearm(s, s.help_fd, kKindHelp);
    return;
  }
  if (kind == kKindPrefetch) {
    serve(s, g, nullptr);  // demand faults first
    const bool done = s.closed || prefetch_turn(s, g);
    serve_pending(s, g);  // faults read while prefetching
    if (s.closed) return;
    if (done) {
      epoll_ctl(epfd, EPOLL_CTL_DEL, s.prefetch_fd, nullptr);
      close(s.prefetch_fd);
      s.prefetch_fd = -1;
    } else {
      rearm(s, s.prefetch_fd, kKindPrefetch);
    }
    return;
  }
  if (events & (EPOLLERR | EPOLLHUP)) {
    end(s, true, "the userfaultfd reported an error (EPOLLERR/EPOLLHUP)");
    return;
  }
  bool rearm_uffd = true;
  serve(s, g, &rearm_uffd);
  // Re-armed already after the first read (and whoever took that arm re-arms in turn): only a
  // turn that read nothing re-arms here.
  if (!s.closed && rearm_uffd) rearm(s, s.uffd, kKindUffd);
}

void ServeServer::Impl::handshake(Session& s, uint32_t events) {
  // Reads what is there; the JSON and its fd may come in pieces.
  for (int attempt = 0;; ++attempt) {
    char data[65536];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    iovec iov{data, sizeof data};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(s.sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n >= 0) {  // on an error the control buffer is untouched: nothing to read
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          s.fds.push_back(fd);
        }
      }
      if (msg.msg_flags & MSG_CTRUNC) {
        end(s, true, "handshake: more than one file descriptor in SCM_RIGHTS (expected exactly "
                     "one, the userfaultfd; the extras were closed)");
        return;
      }
    }
    if (n > 0) {
      s.buf.append(data, static_cast<size_t>(n));
      if (s.buf.size() > kMaxHandshakeBytes) {
        end(s, true, "handshake: message longer than 1 MiB");
        return;
      }
      continue;  // read everything that is there
    }
    if (n == 0) {
      if (!json_complete(s.buf)) {
        end(s, true, s.buf.empty() ? "handshake: the peer closed the connection without a message"
                                   : "handshake: the peer closed the connection in the middle "
                                     "of the message (malformed JSON: incomplete array)");
        return;
      }
      break;  // a complete message, then EOF: judge it (the session ends after)
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN) {
      end(s, true, std::string("handshake: recvmsg: ") + std::strerror(errno));
      return;
    }
    if (!json_complete(s.buf)) {
      if (events & (EPOLLHUP | EPOLLERR)) {
        end(s, true, "handshake: the connection failed before the message was complete");
      }
      return;  // wait for the rest
    }
    if (!s.fds.empty() || attempt >= 5) break;
    // The message is complete but its fd not here yet: wait a little for it.
    pollfd p{s.sock, POLLIN, 0};
    poll(&p, 1, 20);
  }
  if (s.fds.empty()) {
    end(s, true, "handshake: no file descriptor in SCM_RIGHTS (expected exactly one, the "
                 "userfaultfd)");
    return;
  }
  if (s.fds.size() > 1) {
    end(s, true, "handshake: " + std::to_string(s.fds.size()) +
                     " file descriptors in SCM_RIGHTS (expected exactly one, the userfaultfd; "
                     "the extras were closed)");
    return;
  }
  auto regions = parse_handshake(s.buf);
  if (!regions.ok()) {
    end(s, true, regions.error().message);
    return;
  }
  // Against the file as it is now (it may have shrunk since it was mapped) and the mapping.
  uint64_t file_size = mem_size;
  struct stat st {};
  if (fstat(mem_fd, &st) == 0) file_size = std::min(file_size, static_cast<uint64_t>(st.st_size));
  if (auto v = validate_regions(*regions, file_size); !v.ok()) {
    s.report.regions = *regions;
    end(s, true, v.error().message);
    return;
  }
  const int fd = s.fds[0];
  if (!is_userfaultfd(fd)) {
    end(s, true, "handshake: the file descriptor is not a userfaultfd");
    return;
  }
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, 0) == 1 && (p.revents & POLLERR)) {
    end(s, true, "handshake: the userfaultfd is not initialised (the VMM did not call UFFDIO_API)");
    return;
  }
  s.fds.clear();
  s.uffd = fd;
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0 && !(fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  s.regions = std::move(*regions);
  std::sort(s.regions.begin(), s.regions.end(), [](const ServeRegion& a, const ServeRegion& b) {
    return a.base_host_virt_addr < b.base_host_virt_addr;
  });
  s.report.regions = s.regions;
  s.report.accepted = true;
  s.phase = Phase::kServing;
  s.t_handshake = now_ns();
  s.report.handshake_ns = s.t_handshake - s.t_connect;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.u64 = tag(s.id, kKindUffd);
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, s.uffd, &ev) != 0) {
    end(s, true, std::string("epoll_ctl of the userfaultfd: ") + std::strerror(errno));
    return;
  }
  if (options.threads > 1) {
    s.help_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u64 = tag(s.id, kKindHelp);
    if (s.help_fd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, s.help_fd, &ev) != 0) {
      end(s, true, std::string("eventfd: ") + std::strerror(errno));
      return;
    }
  }
  s.placed.assign((mem_size + 4095) / 4096, 0);
  build_plan(s);
  if (!s.plan.empty()) {
    s.prefetch_fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);  // readable until prefetch is done
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u64 = tag(s.id, kKindPrefetch);
    if (s.prefetch_fd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, s.prefetch_fd, &ev) != 0) {
      end(s, true, std::string("prefetch eventfd: ") + std::strerror(errno));
      return;
    }
  }
  if (options.on_session_start) options.on_session_start(s.report);
}

// Reads one batch of messages: events are applied at once (so a fault read after a REMOVE of
// its page, and any fault retried after it, gets a zero page), faults are queued. False when
// nothing was read.
bool ServeServer::Impl::read_messages(Session& s, int* err) {
  // A REMOVE read now lets the VMM's madvise go on to zap the range; a copy still in flight
  // could place pages after that zap. So no read while one is (each at most one small copy).
  s.cv.wait(s.mu, [&s] { return s.inflight == 0; });
  if (err) *err = EAGAIN;
  if (s.uffd < 0) return false;
  uffd_msg msgs[64];
  ssize_t n = read(s.uffd, msgs, sizeof msgs);
  if (n <= 0) {
    if (err && n < 0) *err = errno;
    return false;
  }
  const uint64_t t = now_ns();
  const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
  for (size_t i = 0; i < count; ++i) {
    const uffd_msg& m = msgs[i];
    switch (m.event) {
      case UFFD_EVENT_PAGEFAULT:
        ++s.report.faults;
        if (s.plan_next < s.plan.size()) ++s.report.faults_during_prefetch;
        s.pending.emplace_back(m.arg.pagefault.address, t);
        break;
      case UFFD_EVENT_REMOVE:
        ++s.report.removes;
        s.removed.add(m.arg.remove.start, m.arg.remove.end);
        clear_placed(s, m.arg.remove.start, m.arg.remove.end);
        break;
      case UFFD_EVENT_UNMAP:
        ++s.report.unmaps;
        clear_placed(s, m.arg.remove.start, m.arg.remove.end);
        apply_unmap(s, m.arg.remove.start, m.arg.remove.end);
        break;
      case UFFD_EVENT_REMAP:
        ++s.report.remaps;
        apply_remap(s, m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
        break;
      case UFFD_EVENT_FORK:
        // The VMM enabled fork events: the child's userfaultfd is not ours to serve.
        close(static_cast<int>(m.arg.fork.ufd));
        break;
      default:
        break;
    }
  }
  return true;
}

// Serves the faults read so far, front first. Other threads may take from the same queue while
// this one copies (the lock is released around each copy).
void ServeServer::Impl::serve_pending(Session& s, std::unique_lock<std::mutex>& lk) {
  while (!s.pending.empty() && !s.closed) {
    auto [addr, t] = s.pending.front();
    s.pending.pop_front();
    if (!serve_fault(s, lk, addr, t)) return;
  }
}

// The pages of [start, end) in the VMM are gone (REMOVE, UNMAP): not placed any more.
void ServeServer::Impl::clear_placed(Session& s, uint64_t start, uint64_t end_addr) {
  for (const ServeRegion& g : s.regions) {
    const uint64_t gs = g.base_host_virt_addr, ge = gs + g.size;
    const uint64_t cs = std::max(gs, start), ce = std::min(ge, end_addr);
    if (cs < ce) mark_placed(s, g.offset + (cs - gs), ce - cs, 0);
  }
}

// The prefetch runs of a session: the working set's pages in order (contiguous pages merged
// into runs of up to 2 MiB), then every region front to back in 2 MiB runs.
void ServeServer::Impl::build_plan(Session& s) {
  auto add = [&s](uint64_t addr, uint64_t len) {
    if (!s.plan.empty()) {
      auto& back = s.plan.back();
      if (back.first + back.second == addr && back.second + len <= k2M) {
        back.second += len;
        return;
      }
    }
    s.plan.emplace_back(addr, len);
  };
  // The working set in the order of first touch, by 2 MiB block of the file: at a block's first
  // page, every page of the set in that block, front to back (contiguous ones in one run). A set
  // recorded in random order replays in 2 MiB copies instead of single pages.
  const uint64_t file_pages = (mem_size + 4095) / 4096;
  std::vector<uint8_t> in_set(options.prefetch_working_set.empty() ? 0 : file_pages);
  for (uint64_t off : options.prefetch_working_set) {
    if (off / 4096 < file_pages) in_set[off / 4096] = 1;
  }
  auto add_page = [&](uint64_t off) {
    for (const ServeRegion& g : s.regions) {
      if (off >= g.offset && off < g.offset + g.size) {
        add(g.base_host_virt_addr + ((off - g.offset) & ~(g.page_size - 1)), g.page_size);
        break;
      }
    }
  };
  for (uint64_t off : options.prefetch_working_set) {
    const uint64_t block = off & ~(k2M - 1);
    if (off / 4096 >= file_pages || !in_set[off / 4096]) continue;  // its block went already
    const uint64_t block_end = std::min(block + k2M, file_pages * 4096);
    for (uint64_t o = block; o < block_end; o += 4096) {
      if (!in_set[o / 4096]) continue;
      in_set[o / 4096] = 0;
      add_page(o);
    }
  }
  if (options.prefetch_sequential) {
    for (const ServeRegion& g : s.regions) {
      const uint64_t chunk = std::max(k2M, g.page_size);
      for (uint64_t a = 0; a < g.size; a += chunk) {
        s.plan.emplace_back(g.base_host_virt_addr + a, std::min(chunk, g.size - a));
      }
    }
  }
}

// One turn of prefetch (about 2 ms): copies the next runs in copies of at most
// kPrefetchCopyBytes, skipping pages the VMM discarded and pages already placed or claimed.
// Each copy runs without the session lock, so the session's demand faults are read and served
// (on another handler thread, or here between two copies) while it is in flight: a demand fault
// waits for at most one small copy, never for a batch. A page already present (EEXIST: a demand
// fault placed it first) is stepped over. True when the plan is done (or the session ended).
bool ServeServer::Impl::prefetch_turn(Session& s, std::unique_lock<std::mutex>& lk) {
  const uint64_t t_end = now_ns() + 2'000'000;
  while (s.plan_next < s.plan.size()) {
    if (s.closed) return true;
    if (stopping.load(std::memory_order_relaxed)) return false;
    pollfd p{s.uffd, POLLIN, 0};
    if (poll(&p, 1, 0) == 1) {  // demand first: read and serve it before the next copy
      serve(s, lk, nullptr);
      if (s.closed) return true;
    }
    if (now_ns() > t_end) return false;
    auto [addr, len] = s.plan[s.plan_next];
    const ServeRegion* r = nullptr;
    for (const ServeRegion& g : s.regions) {
      if (addr >= g.base_host_virt_addr && addr < g.base_host_virt_addr + g.size) r = &g;
    }
    if (!r) {  // unmapped or moved since
      ++s.plan_next;
      continue;
    }
    const uint64_t ps = r->page_size;
    const uint64_t end_addr = std::min(addr + len, r->base_host_virt_addr + r->size);
    const uint64_t r_off = r->offset, r_base = r->base_host_virt_addr;  // r may go when unlocked
    auto file_off = [r_off, r_base](uint64_t va) { return r_off + (va - r_base); };
    auto free_page = [&](uint64_t va) {
      return !s.removed.contains(va) && !s.placed[file_off(va) / 4096];
    };
    uint64_t a = addr;
    while (a < end_addr && !free_page(a)) a += ps;
    if (a >= end_addr) {
      ++s.plan_next;
      continue;
    }
    const uint64_t max_len = std::max(kPrefetchCopyBytes, ps);
    uint64_t b = a + ps;
    while (b < end_addr && b - a < max_len && free_page(b)) b += ps;
    // Claim [a, b), then copy it with the session unlocked.
    mark_placed(s, file_off(a), b - a, 1);
    uffdio_copy c{};
    c.dst = a;
    c.src = reinterpret_cast<uint64_t>(mem + file_off(a));
    c.len = b - a;
    const int uffd = s.uffd;
    ++s.inflight;
    s.report.max_copies_in_flight =
        std::max<uint64_t>(s.report.max_copies_in_flight, static_cast<uint64_t>(s.inflight));
    lk.unlock();
    const int rc = ioctl(uffd, UFFDIO_COPY, &c);
    const int e = errno;
    lk.lock();
    --s.inflight;
    s.cv.notify_all();
    if (rc == 0) {
      mark_placed(s, file_off(a), b - a, 2);
      s.report.pages_prefetched += (b - a) / ps;
      s.plan[s.plan_next] = {b, end_addr - b};
      continue;
    }
    const uint64_t done = c.copy > 0 ? static_cast<uint64_t>(c.copy) : 0;
    mark_placed(s, file_off(a), done, 2);
    s.report.pages_prefetched += done / ps;
    if (e == EEXIST) {
      // The page after the copied ones is there (placed before this session knew of it):
      // step over it and release the claim of the rest.
      const uint64_t next = a + done + ps;
      mark_placed(s, file_off(a + done), std::min(ps, b - (a + done)), 2);
      if (next < b) mark_placed(s, file_off(next), b - next, 0);
      s.plan[s.plan_next] = {next, end_addr > next ? end_addr - next : 0};
      continue;
    }
    mark_placed(s, file_off(a + done), b - (a + done), 0);  // not placed: release
    if (e == EAGAIN) {
      // An event is pending: read it (and serve the faults read with it), then go on from
      // here, past any range it removed.
      ++s.report.eagain_deferrals;
      s.plan[s.plan_next] = {a + done, end_addr - (a + done)};
      if (!s.closed) read_messages(s);
      serve_pending(s, lk);
      return s.closed;
    }
    if (e == ESRCH) {
      end(s, false, "peer hung up (its mm is gone)");
      return true;
    }
    if (s.closed) return true;
    ++s.plan_next;  // ENOENT (the range went away) or another error: drop this run
  }
  if (!s.prefetch_done_ns && s.t_handshake) {
    s.prefetch_done_ns = now_ns() - s.t_handshake;
    s.report.prefetch_done_ns = s.prefetch_done_ns;
  }
  return true;
}

// Marks the memory-file pages [off, off + len) placed (1) or not (0), for prefetch.
void ServeServer::Impl::mark_placed(Session& s, uint64_t off, uint64_t len, uint8_t v) {
  const uint64_t first = off / 4096, last = std::min<uint64_t>((off + len + 4095) / 4096, s.placed.size());
  for (uint64_t i = first; i < last; ++i) s.placed[i] = v;
}

// A few batches per turn, then back to epoll so other sessions get the thread. With
// rearm_uffd, the userfaultfd is re-armed after the first read: faults that come in while this
// thread copies wake another handler thread, which serves the queue or reads the next batch.
void ServeServer::Impl::serve(Session& s, std::unique_lock<std::mutex>& lk, bool* rearm_uffd) {
  for (int batch = 0; batch < 8 && !s.closed; ++batch) {
    if (s.pending.empty()) {
      int e = 0;
      if (!read_messages(s, &e)) {
        if (s.pending.empty()) {
          if (e != EAGAIN && e != EINTR && !s.closed) {
            end(s, true, std::string("read of the userfaultfd: ") + std::strerror(e));
          }
          return;
        }
      }
    }
    if (rearm_uffd && *rearm_uffd && !s.closed) {
      rearm(s, s.uffd, kKindUffd);
      *rearm_uffd = false;
    }
    if (s.pending.size() >= 2 && s.help_fd >= 0 && !s.help_called) {
      // More than one fault to serve: another thread takes from the queue while this one copies.
      s.help_called = true;
      const uint64_t one = 1;
      ssize_t w = write(s.help_fd, &one, sizeof one);
      (void)w;
    }
    serve_pending(s, lk);
  }
}

// Serves one demand fault: mu held, released around the ioctl. With fault-around, the free
// pages next to the faulting one in its aligned block (and its region) go in the same copy.
// False when the session ended or must end.
bool ServeServer::Impl::serve_fault(Session& s, std::unique_lock<std::mutex>& lk, uint64_t addr,
                                    uint64_t t_read) {
  uint64_t ps = 0;      // the size placed: the region's page size, or 4K inside a partial 2M page
  bool single = false;  // a fault-around copy failed: the faulting page alone now
  for (;;) {
    if (s.closed) return false;
    // Looked up again on every try: events read below may have moved or cut the region.
    const ServeRegion* r = nullptr;
    auto it = std::upper_bound(
        s.regions.begin(), s.regions.end(), addr,
        [](uint64_t a, const ServeRegion& g) { return a < g.base_host_virt_addr; });
    if (it != s.regions.begin()) {
      const ServeRegion& g = *std::prev(it);
      if (addr < g.base_host_virt_addr + g.size) r = &g;
    }
    if (!r) {
      // Not in a region (a stale fault after an unmap): wake the faulter so it retries.
      uffdio_range wr{addr & ~uint64_t{4095}, 4096};
      ioctl(s.uffd, UFFDIO_WAKE, &wr);
      return true;
    }
    const uint64_t base = r->base_host_virt_addr, rend = base + r->size, roff = r->offset;
    const uint64_t rps = r->page_size;
    if (ps == 0 || ps > rps) ps = rps;
    const uint64_t page = addr & ~(ps - 1);
    const uint64_t off = roff + (page - base);
    const uint8_t state = s.placed[off / 4096];
    if (state == 1) {
      // Another thread's copy holds it: that copy places it (and wakes the faulter) or gives
      // the claim back. Then look again.
      s.cv.wait(lk, [&] { return s.closed || s.placed[off / 4096] != 1; });
      continue;
    }
    const bool removed = s.removed.contains(page);
    bool zero = removed;
    if (!zero && ps == 4096) {
      const int z = guarded_all_zero(mem + off, 4096);
      if (z < 0) {
        end(s, true, "the memory file cannot be read at offset " + std::to_string(off) +
                         " (SIGBUS: truncated after it was mapped?)");
        return false;
      }
      zero = z == 1;
    }
    // The run [a, b): the faulting page, and with fault-around the pages next to it that are
    // not placed, not claimed and not removed, within its aligned block and its region.
    uint64_t a = page, b = page + ps;
    const uint64_t fa = options.fault_around_bytes;
    if (!zero && !single && state == 0 && ps == 4096 && fa > 4096) {
      const uint64_t lo = std::max(page & ~(fa - 1), base);
      const uint64_t hi = std::min((page & ~(fa - 1)) + fa, rend);
      auto is_free = [&](uint64_t va) {
        return s.placed[(roff + (va - base)) / 4096] == 0 && !s.removed.contains(va);
      };
      while (a > lo && is_free(a - 4096)) a -= 4096;
      while (b < hi && is_free(b)) b += 4096;
    }
    const uint64_t a_off = roff + (a - base);
    mark_placed(s, a_off, b - a, 1);
    const bool use_zeropage = zero && ps == 4096;
    uffdio_copy c{};
    uffdio_zeropage z{};
    int rc;
    const int uffd = s.uffd;
    ++s.inflight;
    s.report.max_copies_in_flight =
        std::max<uint64_t>(s.report.max_copies_in_flight, static_cast<uint64_t>(s.inflight));
    lk.unlock();
    if (use_zeropage) {
      z.range.start = page;
      z.range.len = ps;
      rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
    } else {
      // hugetlbfs has no UFFDIO_ZEROPAGE: a removed 2M page is a copy of zeros.
      c.dst = a;
      c.src = reinterpret_cast<uint64_t>(zero ? zero2m : mem + a_off);
      c.len = b - a;
      rc = ioctl(uffd, UFFDIO_COPY, &c);
    }
    const int e = errno;
    lk.lock();
    --s.inflight;
    s.cv.notify_all();  // with the claims below resolved before the lock is released
    // Placed: everything on success, else the first c.copy bytes (a partial copy).
    const uint64_t done =
        rc == 0 ? b - a : (!use_zeropage && c.copy > 0 ? static_cast<uint64_t>(c.copy) : 0);
    mark_placed(s, a_off, done, 2);
    mark_placed(s, a_off + done, (b - a) - done, 0);
    if (zero) {
      s.report.pages_zeroed += done / ps;
    } else {
      s.report.pages_copied += done / ps;
    }
    if (done > 0 && options.record_working_set && !removed) {
      auto record = [&](uint64_t o) {
        if (s.recorded.insert(o).second) {
          s.report.working_set.push_back({o, now_ns() - s.t_handshake});
        }
      };
      const uint64_t fault_off = roff + ((addr & ~(rps - 1)) - base);
      if (page < a + done) record(fault_off);
      if (ps == rps) {
        for (uint64_t o = a_off; o < a_off + done; o += ps) record(o);
      }
    }
    if (page < a + done) break;  // the faulting page is placed (and its faulter woken)
    if (b - a > ps) {
      single = true;  // the run failed before the faulting page: try that page alone
      continue;
    }
    if (e == EEXIST && ps != 4096) {
      // Part of the 2M page is there already (2M regions of 4K-page memory, after a REMOVE of
      // part of it): place the faulting 4K page alone. hugetlbfs refuses that (EINVAL), and
      // there a partly present huge page cannot be: the wake below is then right.
      ps = 4096;
      continue;
    }
    if (e == EINVAL && ps == 4096 && rps != 4096) {
      uffdio_range wr{addr & ~(rps - 1), rps};
      ioctl(s.uffd, UFFDIO_WAKE, &wr);
      ++s.report.eexist_wakes;
      break;
    }
    if (e == EEXIST) {
      mark_placed(s, off, ps, 2);  // it is there
      uffdio_range wr{page, ps};
      ioctl(s.uffd, UFFDIO_WAKE, &wr);
      ++s.report.eexist_wakes;
      break;
    }
    if (e == EAGAIN) {
      // The mm is changing (a REMOVE/UNMAP/REMAP is pending): read the events, then retry.
      ++s.report.eagain_deferrals;
      if (stopping.load(std::memory_order_relaxed)) return false;  // stop() ends the session
      if (!read_messages(s)) {
        lk.unlock();
        std::this_thread::yield();
        lk.lock();
      }
      continue;
    }
    if (e == ESRCH) {
      end(s, false, "peer hung up (its mm is gone)");
      return false;
    }
    if (e == ENOENT) {
      // The range went away under us (an unmap whose event is still unread).
      read_messages(s);
      break;
    }
    end(s, true, std::string(use_zeropage ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY") + " at " +
                     hex(page) + ": " + std::strerror(e));
    return false;
  }
  const uint64_t done = now_ns();
  ++s.report.faults_served;
  s.latencies.push_back(done - t_read);
  s.report.last_fault_ns = done - s.t_handshake;
  return true;
}

void ServeServer::Impl::apply_unmap(Session& s, uint64_t start, uint64_t end_addr) {
  std::vector<ServeRegion> keep;
  for (const ServeRegion& g : s.regions) {
    const uint64_t gs = g.base_host_virt_addr, ge = gs + g.size;
    if (ge <= start || gs >= end_addr) {
      keep.push_back(g);
      continue;
    }
    if (gs < start) keep.push_back({gs, start - gs, g.offset, g.page_size});
    if (ge > end_addr) {
      keep.push_back({end_addr, ge - end_addr, g.offset + (end_addr - gs), g.page_size});
    }
  }
  s.regions = std::move(keep);
  s.removed.cut(start, end_addr);
}

void ServeServer::Impl::apply_remap(Session& s, uint64_t from, uint64_t to, uint64_t len) {
  std::vector<ServeRegion> keep, moved;
  for (const ServeRegion& g : s.regions) {
    const uint64_t gs = g.base_host_virt_addr, ge = gs + g.size;
    if (ge <= from || gs >= from + len) {
      keep.push_back(g);
      continue;
    }
    if (gs < from) keep.push_back({gs, from - gs, g.offset, g.page_size});
    if (ge > from + len) {
      keep.push_back({from + len, ge - from - len, g.offset + (from + len - gs), g.page_size});
    }
    const uint64_t cs = std::max(gs, from), ce = std::min(ge, from + len);
    moved.push_back({cs - from + to, ce - cs, g.offset + (cs - gs), g.page_size});
  }
  for (auto& [a, b] : s.removed.cut(from, from + len)) s.removed.add(a - from + to, b - from + to);
  s.removed.cut(to, to + len);  // whatever was at the destination before is gone
  for (auto& g : moved) keep.push_back(g);
  std::sort(keep.begin(), keep.end(), [](const ServeRegion& a, const ServeRegion& b) {
    return a.base_host_virt_addr < b.base_host_virt_addr;
  });
  s.regions = std::move(keep);
}

// Ends a session (its lock held): closes its fds, reports it, forgets it.
void ServeServer::Impl::end(Session& s, bool is_failure, std::string reason) {
  if (s.closed) return;
  s.closed = true;
  s.cv.notify_all();  // threads waiting for a claim see the end
  s.cv.wait(s.mu, [&s] { return s.inflight == 0; });  // the copies use s.uffd
  if (s.sock >= 0) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s.sock, nullptr);
    close(s.sock);
    s.sock = -1;
  }
  if (s.uffd >= 0) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s.uffd, nullptr);
    close(s.uffd);
    s.uffd = -1;
  }
  if (s.prefetch_fd >= 0) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s.prefetch_fd, nullptr);
    close(s.prefetch_fd);
    s.prefetch_fd = -1;
  }
  if (s.help_fd >= 0) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s.help_fd, nullptr);
    close(s.help_fd);
    s.help_fd = -1;
  }
  for (int fd : s.fds) close(fd);
  s.fds.clear();
  SessionReport& r = s.report;
  r.failed = is_failure;
  r.end_reason = std::move(reason);
  if (is_failure && r.accepted && options.kill_peer_on_fatal && r.peer_pid > 0 &&
      !stopping.load()) {
    // Its faults will never be served: a VMM left like that hangs. Kill it instead.
    r.peer_killed = ::kill(r.peer_pid, SIGKILL) == 0;
  }
  r.duration_ns = now_ns() - s.t_connect;
  if (!s.latencies.empty()) {
    auto& v = s.latencies;
    std::sort(v.begin(), v.end());
    r.latency_p50_ns = v[(v.size() - 1) / 2];
    r.latency_p99_ns = v[(v.size() - 1) * 99 / 100];
    r.latency_max_ns = v.back();
    std::vector<uint64_t>().swap(v);
  }
  s.pending.clear();
  if (is_failure) failed.fetch_add(1);
  if (options.on_session_end) options.on_session_end(r);
  ended.fetch_add(1);
  std::lock_guard g(mu);
  sessions.erase(s.id);
}

// Refuses handshakes that did not complete in time (a peer that connected and said nothing, or
// sent half a message). At most every 50 ms, by whichever thread gets there.
void ServeServer::Impl::sweep() {
  const uint64_t t = now_ns();
  uint64_t last = last_sweep.load(std::memory_order_relaxed);
  if (t - last < 50'000'000 || !last_sweep.compare_exchange_strong(last, t)) return;
  std::vector<std::shared_ptr<Session>> late;
  {
    std::lock_guard g(mu);
    for (auto& [id, s] : sessions) {
      if (s->deadline < t) late.push_back(s);
    }
  }
  for (auto& s : late) {
    std::unique_lock g(s->mu, std::try_to_lock);
    if (!g.owns_lock() || s->closed || s->phase != Phase::kHandshake) continue;
    end(*s, true, "handshake: no complete message within " +
                      std::to_string(options.handshake_timeout_ms) + " ms");
  }
}

}  // namespace gfnmap::uffd
