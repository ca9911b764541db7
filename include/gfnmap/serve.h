// gfnmap serve: the page server a VMM hands its userfaultfd to (Firecracker's `Uffd` memory
// backend). A ServeServer listens on a Unix stream socket; each connection is one session: one
// handshake message (a JSON array of guest-memory regions with the VMM's userfaultfd in
// SCM_RIGHTS), then missing-page faults of that VMM served from one memory file mapped once for
// every session. Protocol and failure semantics: docs/serve.md.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gfnmap/types.h"

namespace gfnmap::uffd {

// One guest-memory region of a handshake: [base_host_virt_addr, +size) of the VMM's address
// space is backed by [offset, +size) of the memory file, in page_size pages (4K or 2M).
struct ServeRegion {
  uint64_t base_host_virt_addr = 0;
  uint64_t size = 0;
  uint64_t offset = 0;
  uint64_t page_size = 4096;
};

// Parses a handshake message: a JSON array of region objects. page_size is read from
// "page_size", else from "page_size_kib" (which holds bytes despite its name), else 4096 (the
// old three-field form). EINVAL with the field and the region index in the message for
// malformed JSON, a missing or non-integer field. Unknown fields are ignored.
Result<std::vector<ServeRegion>> parse_handshake(std::string_view json);

// Checks regions against each other and the memory file: not empty, page size 4K or 2M, base,
// size and offset aligned to it, no two regions overlapping in the VMM's address space, none
// reaching past file_size. EINVAL (ERANGE for past the end) naming the region and field.
Result<void> validate_regions(const std::vector<ServeRegion>& regions, uint64_t file_size);

// A working set: the pages a restore touched first, in order. offset is the page's byte offset
// in the memory file; time_ns the time of its first demand fault after the handshake.
struct WorkingSetEntry {
  uint64_t offset = 0;
  uint64_t time_ns = 0;
  friend bool operator==(const WorkingSetEntry&, const WorkingSetEntry&) = default;
};

// The working-set file, version 1 (docs/serve.md): a first line "gfnmap-working-set 1", then
// one "OFFSET TIME_NS" line per page (decimal; OFFSET 4K-aligned); '#' lines are comments.
// read_working_set: ENOENT/EACCES with the path; EINVAL naming the line for anything else.
Result<std::vector<WorkingSetEntry>> read_working_set(const std::string& path);
Result<void> write_working_set(const std::string& path, const std::vector<WorkingSetEntry>& set);

// What a session did. Times are nanoseconds.
struct SessionReport {
  uint64_t id = 0;         // 1, 2, ... in accept order
  int peer_pid = -1;       // SO_PEERCRED of the connection
  bool accepted = false;   // the handshake was valid
  bool failed = false;     // refused handshake or a serving error (not a normal hangup)
  bool peer_killed = false;  // ServeOptions::kill_peer_on_fatal killed the VMM
  std::string end_reason;  // "peer hung up", "server stopped", or the error
  std::vector<ServeRegion> regions;
  uint64_t handshake_ns = 0;    // connect -> handshake accepted
  uint64_t last_fault_ns = 0;   // handshake -> the last demand fault served
  uint64_t duration_ns = 0;     // connect -> end
  uint64_t faults = 0;          // demand faults read
  uint64_t faults_served = 0;   // served by a copy, a zero page or a wake
  uint64_t pages_copied = 0;    // UFFDIO_COPY
  uint64_t pages_zeroed = 0;    // UFFDIO_ZEROPAGE (or a copy of zeros for 2M pages)
  uint64_t removes = 0;         // UFFD_EVENT_REMOVE
  uint64_t unmaps = 0;          // UFFD_EVENT_UNMAP
  uint64_t remaps = 0;          // UFFD_EVENT_REMAP
  uint64_t eagain_deferrals = 0;  // EAGAIN: events read first, then the fault retried
  uint64_t eexist_wakes = 0;      // EEXIST: the page was there, the faulter woken
  uint64_t pages_prefetched = 0;  // placed by prefetch (working set or sequential)
  // The most UFFDIO_COPY/ZEROPAGE calls of this session in flight at once (handler threads
  // serving its demand faults and its prefetch concurrently).
  uint64_t max_copies_in_flight = 0;
  uint64_t faults_during_prefetch = 0;  // demand faults read while the prefetch had work left
  uint64_t prefetch_done_ns = 0;        // handshake -> prefetch plan done (0: none, unfinished)
  // With ServeOptions::record_working_set: the pages of demand faults, first touch first.
  std::vector<WorkingSetEntry> working_set;
  uint64_t latency_p50_ns = 0, latency_p99_ns = 0, latency_max_ns = 0;  // read -> placed
};

struct ServeOptions {
  std::string socket_path;  // bound and listened on; an existing socket file is replaced
  std::string memory_file;  // the guest memory snapshot, mapped read-only once
  unsigned threads = 2;     // handler threads shared by all sessions (1..64)
  // The nice value of the handler threads (-20..19; 0: left as inherited). A VMM's vCPUs wait
  // for these threads, and on a host with fewer cores than runnable threads the CPU's fair
  // share sets both the fault tail and how far prefetch gets ahead of the guest. Lowering it
  // below the process's needs CAP_SYS_NICE; if the kernel refuses, the threads keep theirs
  // (handler_nice_failed() says so).
  int handler_nice = 0;
  // A connection that has not completed its handshake after this long is refused.
  unsigned handshake_timeout_ms = 5000;
  // Prefetch, right after each handshake, interleaved with demand faults (which go first):
  // the working set's pages in its order (contiguous runs in one UFFDIO_COPY of up to 2 MiB),
  // then, with prefetch_sequential, every region front to back. Pages the VMM discarded
  // (REMOVE) are never prefetched; a page already present is never copied again.
  std::vector<uint64_t> prefetch_working_set;  // memory-file offsets (WorkingSetEntry::offset)
  bool prefetch_sequential = false;
  // Demand fault-around: a demand fault of a 4K page also places the pages around it that are
  // neither placed, claimed nor removed, within its fault_around_bytes-aligned block and its
  // region, in the same UFFDIO_COPY (contiguous with the faulting page). A power of two,
  // 4096 (off: one page per fault) to 2 MiB. It costs the VMM up to fault_around_bytes - 4K of
  // resident memory per demand fault for pages the guest may never touch; zero pages of the file
  // among them are copied (a private page each), not mapped as zero pages.
  uint64_t fault_around_bytes = 64u << 10;
  // With record_working_set: fill SessionReport::working_set. With fault-around, a demand fault
  // records its faulting page, then the pages placed around it, at the fault's time.
  bool record_working_set = false;
  // A serving error after the handshake (the memory file unreadable, an ioctl failing) leaves
  // the VMM with faults nobody serves: it hangs. With this, the server SIGKILLs the peer (its
  // SO_PEERCRED pid) instead. Off by default: a VMM is not the server's to kill.
  bool kill_peer_on_fatal = false;
  // Called on a handler thread when a session ends (refused, peer gone, server stopped).
  std::function<void(const SessionReport&)> on_session_end;
  // Called on a handler thread when a session's handshake was accepted.
  std::function<void(const SessionReport&)> on_session_start;
};

// A one-line human summary of a report; and the report as a compact JSON object.
std::string to_string(const SessionReport& report);
std::string to_json(const SessionReport& report);

// The server. create() maps the memory file and binds the socket; start() starts the handler
// threads, which accept connections and serve every session (epoll). Several threads may serve
// one session's faults at once (each copies with the session unlocked); a slow or dead VMM
// holds a thread for at most one fault (one UFFDIO_COPY) before it goes back to epoll.
class ServeServer {
 public:
  static Result<std::unique_ptr<ServeServer>> create(ServeOptions options);
  ~ServeServer();  // stop(), then unlinks the socket and unmaps the file
  ServeServer(const ServeServer&) = delete;
  ServeServer& operator=(const ServeServer&) = delete;

  Result<void> start();
  // Stops accepting, ends every session ("server stopped"; their VMMs' pending faults stay
  // unserved) and joins the threads. Idempotent, callable from any thread but a handler.
  void stop();

  uint64_t memory_file_size() const;
  const std::string& socket_path() const;
  // Sessions connected (handshake accepted or not) and not yet ended.
  unsigned active_sessions() const;
  uint64_t sessions_started() const;  // connections accepted
  uint64_t sessions_ended() const;
  uint64_t sessions_failed() const;
  // A handler thread could not set ServeOptions::handler_nice (EACCES/EPERM).
  bool handler_nice_failed() const;

  struct Impl;

 private:
  explicit ServeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gfnmap::uffd
