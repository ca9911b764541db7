// gfnmap tests: helpers for the serve suite: a scratch directory, a memory file with a known
// pattern, running the VMM peer (tools/uffd_vmm_peer) or the CLI as a real child process, a raw
// handshake client, and a server whose session reports the test can wait for.
#pragma once

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "gfnmap/host_facts.h"
#include "gfnmap/serve.h"

namespace gfnmap::serve_test {

#define GFNMAP_SKIP_WITHOUT_UFFD()                                                \
  do {                                                                            \
    if (!::gfnmap::host_facts().uffd_available()) {                               \
      GTEST_SKIP() << "userfaultfd unavailable: " << ::gfnmap::host_facts().uffd_why; \
    }                                                                             \
  } while (0)

// A scratch directory under /tmp, removed with everything in it.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/gfnmap-serve-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::string cmd = "rm -rf '" + path + "'";
    int rc = std::system(cmd.c_str());
    (void)rc;
  }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// Byte b of 4K page p: a pattern that differs per page and per byte; every fifth page is all
// zero (served as a zero page).
inline uint8_t pattern_byte(uint64_t offset) {
  const uint64_t page = offset / 4096;
  if (page % 5 == 3) return 0;
  return static_cast<uint8_t>((offset * 131 + page * 7 + 1) % 251 + 1);
}

inline void write_memfile(const std::string& path, uint64_t size) {
  std::vector<uint8_t> buf(1 << 20);
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  for (uint64_t off = 0; off < size; off += buf.size()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), size - off);
    for (uint64_t i = 0; i < n; ++i) buf[i] = pattern_byte(off + i);
    ASSERT_EQ(write(fd, buf.data(), n), static_cast<ssize_t>(n));
  }
  close(fd);
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A child process (fork + exec) with stdout and stderr in a file.
struct Child {
  pid_t pid = -1;
  std::string out_path;
  int status = -1;

  static Child spawn(const std::vector<std::string>& argv, const std::string& out_path) {
    Child c;
    c.out_path = out_path;
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    c.pid = fork();
    if (c.pid == 0) {
      int fd = open(out_path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execv(args[0], args.data());
      _exit(127);
    }
    return c;
  }
  // Waits up to timeout; true when it exited (status holds the wait status).
  bool wait(std::chrono::milliseconds timeout) {
    if (pid < 0) return true;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      int st = 0;
      pid_t r = waitpid(pid, &st, WNOHANG);
      if (r == pid) {
        status = st;
        pid = -1;
        return true;
      }
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  int exit_code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }
  void kill_now() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      wait(std::chrono::seconds(10));
    }
  }
  std::string output() const { return read_file(out_path); }
  ~Child() { kill_now(); }
  Child() = default;
  Child(Child&& o) noexcept : pid(o.pid), out_path(std::move(o.out_path)), status(o.status) {
    o.pid = -1;
  }
  Child& operator=(Child&&) = delete;
};

inline std::string peer_path() { return GFNMAP_VMM_PEER; }

inline Child spawn_peer(const TempDir& dir, const std::string& socket, const std::string& memfile,
                        std::vector<std::string> extra, const std::string& name = "peer") {
  std::vector<std::string> argv{peer_path(), "--socket", socket, "--memfile", memfile};
  for (auto& e : extra) argv.push_back(std::move(e));
  return Child::spawn(argv, dir / (name + ".out"));
}

// A userfaultfd of this process with UFFDIO_API done (for raw handshakes).
inline int make_uffd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -1;
    fd = ioctl(dev, _IO(0xAA, 0x00), O_CLOEXEC | O_NONBLOCK);
    close(dev);
  }
  if (fd < 0) return -1;
  uffdio_api api{UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

inline int connect_to(const std::string& socket) {
  int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, socket.c_str(), socket.size() + 1);
  if (connect(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    close(s);
    return -1;
  }
  return s;
}

// Sends data with fds in SCM_RIGHTS (none when empty).
inline bool send_with_fds(int sock, const std::string& data, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()) + sizeof(cmsghdr));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
}

// True when the server closed the connection (EOF) within the timeout.
inline bool closed_by_server(int sock, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    char b;
    ssize_t n = recv(sock, &b, 1, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// A ServeServer whose session reports are collected.
struct ServerHarness {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uffd::SessionReport> reports;
  std::vector<uffd::SessionReport> started;
  std::unique_ptr<uffd::ServeServer> server;

  Result<void> start(const std::string& socket, const std::string& memfile, unsigned threads = 2,
                     unsigned handshake_timeout_ms = 5000,
                     const std::function<void(uffd::ServeOptions&)>& configure = {}) {
    uffd::ServeOptions o;
    if (configure) configure(o);
    o.socket_path = socket;
    o.memory_file = memfile;
    o.threads = threads;
    o.handshake_timeout_ms = handshake_timeout_ms;
    o.on_session_end = [this](const uffd::SessionReport& r) {
      std::lock_guard g(mu);
      reports.push_back(r);
      cv.notify_all();
    };
    o.on_session_start = [this](const uffd::SessionReport& r) {
      std::lock_guard g(mu);
      started.push_back(r);
      cv.notify_all();
    };
    auto s = uffd::ServeServer::create(o);
    if (!s.ok()) return s.error();
    server = std::move(*s);
    return server->start();
  }
  // Waits until n sessions ended; returns a copy of the reports.
  std::vector<uffd::SessionReport> wait_reports(size_t n,
                                                std::chrono::milliseconds t = std::chrono::seconds(20)) {
    std::unique_lock g(mu);
    cv.wait_for(g, t, [&] { return reports.size() >= n; });
    return reports;
  }
  bool wait_started(size_t n, std::chrono::milliseconds t = std::chrono::seconds(20)) {
    std::unique_lock g(mu);
    return cv.wait_for(g, t, [&] { return started.size() >= n; });
  }
};

}  // namespace gfnmap::serve_test
