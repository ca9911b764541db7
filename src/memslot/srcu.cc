// gfnmap memslots: the SRCU read side (per-thread counters in two epochs), the reader-slot
// registry, the membarrier probe, and the grace-period wait. Correctness and progress are argued
// next to synchronize().
#include "srcu.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "sched/sched_hooks.h"

namespace gfnmap::detail {
namespace {

// The reader-slot registry: bit i set while some thread owns slot i. A thread claims the lowest
// free slot at its first read section and frees it when it exits. Claims are seq_cst (at least
// acquire) and frees release, so a slot's next owner sees the last counter values its previous
// owner wrote; synchronize() reads the registry to skip the membarrier when no other thread
// holds a slot.
static_assert(Srcu::kReaderSlots == 64, "the registry is one 64-bit word");
constinit std::atomic<uint64_t> g_slots_in_use{0};
// One past the highest slot ever claimed (only grows, with seq_cst RMWs): slots from here on
// have never been used, so all their counts are 0 and the scan stops here.
constinit std::atomic<unsigned> g_slots_high{0};

struct SlotRelease {
  unsigned slot = Srcu::kReaderSlots;
  ~SlotRelease() {
    if (slot >= Srcu::kReaderSlots) return;
    // Sections a thread_local destructor opens after this one use the shared counters.
    tls_srcu_slot = Srcu::kShared;
    g_slots_in_use.fetch_and(~(uint64_t{1} << slot), std::memory_order_release);
  }
};

long sys_membarrier(int cmd) { return ::syscall(__NR_membarrier, cmd, 0, 0); }

bool probe_membarrier() {
#ifdef GFNMAP_SRCU_NO_MEMBARRIER
  return false;
#else
  const long cmds = sys_membarrier(MEMBARRIER_CMD_QUERY);
  if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) ||
      !(cmds & MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)) {
    return false;  // ENOSYS (no CONFIG_MEMBARRIER), seccomp, or a kernel before 4.14
  }
  return sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
#endif
}

// Every running thread of the process executes a full memory barrier before this returns
// (threads that are not running pass one when they are switched in). A child of fork() is not
// registered (EPERM): it registers, and the global command is the last resort.
void membarrier_all_threads() {
  if (sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return;
  if (sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 &&
      sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) {
    return;
  }
  if (sys_membarrier(MEMBARRIER_CMD_GLOBAL) == 0) return;
  // Readers of this Srcu run without fences, so there is no safe way on.
  std::fprintf(stderr,
               "gfnmap: membarrier failed (errno %d) after a successful probe (a seccomp filter "
               "installed since?); a process that denies membarrier must create its Memslots "
               "with MemslotsConfig::membarrier = false\n", errno);
  std::abort();
}

}  // namespace

bool Srcu::membarrier_available() {
  static const bool available = probe_membarrier();
  return available;
}

unsigned Srcu::this_thread_slot() { return tls_srcu_slot; }

Srcu::Srcu(Mode mode) : membarrier_(mode == Mode::kAuto && membarrier_available()) {}

unsigned Srcu::claim_thread_slot() noexcept {
  uint64_t used = g_slots_in_use.load(std::memory_order_relaxed);
  while (used != ~uint64_t{0}) {
    const auto slot = static_cast<unsigned>(__builtin_ctzll(~used));
    if (g_slots_in_use.compare_exchange_weak(used, used | (uint64_t{1} << slot),
                                             std::memory_order_seq_cst,
                                             std::memory_order_relaxed)) {
      static thread_local SlotRelease release;  // frees the slot when this thread exits
      release.slot = slot;
      // Raised before the slot's first count (U of active_readers: the raise, or the seq_cst
      // load that finds the bound high enough, which reads a raise that precedes it in S).
      unsigned high = g_slots_high.load(std::memory_order_seq_cst);
      while (high < slot + 1 &&
             !g_slots_high.compare_exchange_weak(high, slot + 1, std::memory_order_seq_cst)) {
      }
      return slot;
    }
  }
  return kShared;
}

unsigned Srcu::read_lock_slow() noexcept {
  if (tls_srcu_slot == kUnassigned) {
    tls_srcu_slot = claim_thread_slot();
    if (tls_srcu_slot < kReaderSlots) return read_lock();
  }
  // No slot of its own: the shared count, with an atomic RMW (several threads write it). A
  // seq_cst RMW is I of both protocols.
  const unsigned epoch = epoch_.load(std::memory_order_relaxed) & 1;
  shared_.locks[epoch].fetch_add(1, std::memory_order_seq_cst);
  return epoch;
}

void Srcu::read_unlock_slow(unsigned token) noexcept {
  if (tls_srcu_slot == kUnassigned) {
    tls_srcu_slot = claim_thread_slot();
    if (tls_srcu_slot < kReaderSlots) return read_unlock(token);
  }
  shared_.unlocks[token & 1].fetch_add(1, std::memory_order_release);
}

// Sections of `epoch` still counted: all unlock counts first, then all lock counts. A section
// whose unlock is seen was locked before (its lock count happens before its unlock count, on
// one thread or through the hand-over of the lock to another), so the later read of its lock
// count sees it: every section adds 0 or 1, and 1 while its lock is seen and its unlock is not.
//
// Only slots below g_slots_high are read, the bound re-read between the passes. An unlock on
// a slot claimed after the first read is skipped, which only overcounts. A lock must not be
// skipped when its unlock was counted, nor when its section loaded the old set: in both cases
// the raise of the bound for its slot (U, before its first count) precedes the second read
// (through the counted unlock, or U precedes L, L precedes W, W precedes this read in S).
long Srcu::active_readers(unsigned epoch) const noexcept {
  const unsigned unlock_high = std::min(g_slots_high.load(std::memory_order_seq_cst),
                                        kReaderSlots);
  long unlocks = shared_.unlocks[epoch].load(std::memory_order_seq_cst);
  for (unsigned i = 0; i < unlock_high; ++i) {
    unlocks += slots_[i].unlocks[epoch].load(std::memory_order_seq_cst);
  }
  const unsigned lock_high = std::min(g_slots_high.load(std::memory_order_seq_cst),
                                      kReaderSlots);
  long locks = shared_.locks[epoch].load(std::memory_order_seq_cst);
  for (unsigned i = 0; i < lock_high; ++i) {
    locks += slots_[i].locks[epoch].load(std::memory_order_seq_cst);
  }
  return locks - unlocks;
}

// Why this is enough. A writer publishes a new set pointer (W, a seq_cst store) and then calls
// synchronize(), which reads, for both epochs, every unlock count and then every lock count
// (seq_cst loads, Z) and returns once their difference is 0. A reader R adds to a lock count
// (I), loads the set pointer (L, seq_cst), reads the set, and adds to an unlock count (D, a
// release store or RMW). We need: if L returned the old pointer, a zero difference proves that
// D came first.
//
// Step 1: if L returned the old pointer, every Z of R's lock count sees I (or a later value).
// - seq_cst protocol (I a seq_cst RMW): L reads a value before W, so L precedes W in the single
//   total order S of seq_cst operations; I is sequenced before L and W before Z, so I precedes
//   Z in S, and a seq_cst load cannot read a value from before a seq_cst write that precedes
//   it in S. (This is the protocol TSan checks.)
// - membarrier protocol (I a plain store, then a compiler barrier): the writer's membarrier
//   runs a full barrier on R's CPU at some point P of R's execution, after the writer's own
//   barrier that follows W and before the syscall returns (if R is not running, its last
//   context switch is P). If P comes before L in R's program order, L sees W: R loads the new
//   set. Otherwise P comes after I, so I is visible to all before the syscall returns, hence to
//   every Z. This is user-space RCU's membarrier flavour; C++ has no term for membarrier.
//
// Step 2: a zero difference means R's section was closed. Every count only grows, and every
// section adds 0 or 1 to the difference (see active_readers), R 1 while its I is seen and its
// D is not. Every count store is a release and every Z an acquire, so R's reads of the set
// happen before the load that saw D, hence before the old set is freed. (No second membarrier
// is needed: D's release already orders R's loads before it.)
//
// The membarrier is skipped when no thread but the caller holds a reader slot (one thread
// updating slots that nobody reads concurrently, as in tools and benchmarks): a thread's first
// section claims its slot (C, a seq_cst RMW on the registry) before its I and L. If L returned
// the old pointer, L precedes W in S, so C does too, and the registry load G, which follows W,
// sees C (unless the thread has exited since, outside any section). Threads without a slot use
// the shared counts, whose I is a seq_cst RMW in both protocols.
//
// The epoch flips exist for progress only: after the flip to e^1, new readers count on e^1,
// so the wait on epoch e needs only the finitely many sections that read e before the flip;
// the second flip does the same for e^1. Without flips a steady stream of readers could keep
// the difference above zero for ever.
void Srcu::synchronize() {
  if (membarrier_) {  // never under TSan
    const unsigned own = tls_srcu_slot;
    const uint64_t own_bit = own < kReaderSlots ? uint64_t{1} << own : 0;
    if ((g_slots_in_use.load(std::memory_order_seq_cst) & ~own_bit) != 0) {  // G
      membarrier_all_threads();
    }
  }
  for (int phase = 0; phase < 2; ++phase) {
    const unsigned old_epoch = epoch_.load(std::memory_order_relaxed) & 1;
    epoch_.store(old_epoch ^ 1, std::memory_order_seq_cst);
    unsigned spins = 0;
    while (active_readers(old_epoch) != 0) {
      GFNMAP_BLOCK_UNTIL(phase == 0 ? "srcu.synchronize.0" : "srcu.synchronize.1",
                         [&] { return active_readers(old_epoch) == 0; });
      // Read sections are short: spin briefly, then yield, then sleep.
      if (++spins < 64) continue;
      if (spins < 256) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  }
}

}  // namespace gfnmap::detail
