// gfnmap async page faults (spec 9): per-vCPU queues of background fault-ins, a bounded worker
// pool running the slow path, tokens, "page not present" / "page ready" events.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "gfnmap/host.h"
#include "gfnmap/types.h"

namespace gfnmap {

inline constexpr uint32_t kAsyncPfPerVcpu = 64;  // ASYNC_PF_PER_VCPU (x86)
// The token "page ready" carries for a wakeup_all completion (x86 sets ~0).
inline constexpr uint32_t kAsyncPfWakeupAllToken = ~uint32_t{0};

// One async fault (struct kvm_async_pf + x86's kvm_arch_async_pf). Immutable once queued,
// except gup_result, which the worker writes before the item reaches the done list.
struct AsyncPfWork {
  uint32_t token = 0;      // (id << 12) | vcpu_id, never 0; kAsyncPfWakeupAllToken for wakeup_all
  Gfn gfn;                 // the faulting gfn
  Gpa cr2_or_gpa;          // the faulting address as the vCPU saw it
  Hva hva;                 // where the worker faults in
  uint64_t error_code = 0;  // opaque to this layer (the MMU's fault flags)
  bool wakeup_all = false;  // synthetic completion from wakeup_all()
  bool notpresent_injected = false;  // page_not_present() returned true
  // get_user_pages_unlocked's return (1 on success, a negative errno, 0), or -ECANCELED when
  // the pool shut down first. Completions are delivered whatever its value.
  long gup_result = 0;
};

// The arch / MMU side of a vCPU's async faults (kvm_arch_async_page_*). Default methods do
// nothing. All calls but page_present_queued come on the vCPU's thread.
class AsyncPfClient {
 public:
  virtual ~AsyncPfClient() = default;
  // kvm_arch_async_page_not_present: tell the guest (PV #PF with the token). Return true if
  // it was injected; false means the vCPU should halt until the page is ready.
  virtual bool page_not_present(const AsyncPfWork& work);
  // kvm_arch_can_dequeue_async_page_present: false leaves the rest of the done list queued.
  virtual bool can_dequeue_page_present();
  // kvm_arch_async_page_ready: re-run the fault for work.cr2_or_gpa as a prefetch. Not called
  // for wakeup_all items.
  virtual void page_ready(const AsyncPfWork& work);
  // kvm_arch_async_page_present: deliver "page ready" with work.token.
  virtual void page_present(const AsyncPfWork& work);
  // kvm_arch_async_page_present_queued: the done list became non-empty. Called on a worker
  // thread (or in wakeup_all) without locks held; must be thread safe and must not call back
  // into the queue.
  virtual void page_present_queued();
};

// What the vCPU's user (the VMM) sees, in order.
struct AsyncPfEvent {
  enum class Kind : uint8_t {
    kPageNotPresent,
    kPageReady,
    kNotPresent = kPageNotPresent,  // short aliases
    kReady = kPageReady,
  };
  Kind kind = Kind::kPageNotPresent;
  uint32_t token = 0;
  Gfn gfn;
  Gpa gpa;
  bool wakeup_all = false;
  long gup_result = 0;  // kPageReady only
  friend bool operator==(const AsyncPfEvent&, const AsyncPfEvent&) = default;
};

// A bounded pool of std::threads that run the slow path (the kernel's async_pf workqueue).
// Shared by any number of vCPU queues; the queues may outlive the pool object (its state is
// shared): items not started when the pool is destroyed complete with gup_result -ECANCELED,
// and later setups fail.
class AsyncPfWorkerPool {
 public:
  // nr_threads is clamped to [1, 64]. `mm` must outlive every worker, i.e. the pool and all
  // of its queues.
  explicit AsyncPfWorkerPool(HostMm& mm, unsigned nr_threads = 2);
  ~AsyncPfWorkerPool();
  AsyncPfWorkerPool(const AsyncPfWorkerPool&) = delete;
  AsyncPfWorkerPool& operator=(const AsyncPfWorkerPool&) = delete;

  unsigned nr_threads() const;
  uint64_t completed() const;  // items the workers ran (success or failure)

  struct Impl;

 private:
  friend class AsyncPfQueue;
  std::shared_ptr<Impl> impl_;
};

// One vCPU's async faults (vcpu->async_pf + vcpu->arch.apf). Every method is for the vCPU's own
// thread, except has_completions() and wait_for_completion() semantics described below.
class AsyncPfQueue {
 public:
  // `client` may be nullptr (events only); it must outlive the queue.
  AsyncPfQueue(AsyncPfWorkerPool& pool, uint32_t vcpu_id, AsyncPfClient* client = nullptr);
  // Cancels and frees everything (clear_completion_queue); waits for a running worker.
  ~AsyncPfQueue();
  AsyncPfQueue(const AsyncPfQueue&) = delete;
  AsyncPfQueue& operator=(const AsyncPfQueue&) = delete;

  uint32_t vcpu_id() const { return vcpu_id_; }

  // kvm_arch_setup_async_pf + kvm_setup_async_pf. Allocates a token (always, as x86 does),
  // then fails (returns 0) when queued() >= kAsyncPfPerVcpu, when hva is an error hva, or
  // when the pool is gone. Else queues the work, queued()++, records gfn as outstanding,
  // calls page_not_present, records a kPageNotPresent event, schedules the worker and
  // returns the token.
  [[nodiscard]] uint32_t setup_async_pf(Gpa cr2_or_gpa, Gfn gfn, Hva hva,
                                        uint64_t error_code = 0);

  // kvm_find_async_pf_gfn: true while a (non-wakeup_all) item for gfn is queued and its
  // "page ready" not delivered. The MMU then halts + retries instead of queueing again.
  bool find_gfn(Gfn gfn) const;

  // kvm_check_async_pf_completion: for each done item while can_dequeue_page_present():
  // page_ready (not for wakeup_all), page_present, a kPageReady event, gfn no longer
  // outstanding, queued()--, free. Returns how many were delivered.
  unsigned check_completion();

  // kvm_clear_async_pf_completion_queue + hash reset: cancels work not yet started, waits for
  // running work, frees everything queued or done without delivering it; queued() = 0.
  void clear_completion_queue();

  // kvm_async_pf_wakeup_all: if the done list is empty, adds a synthetic wakeup_all item
  // (queued()++, page_present_queued when it made the list non-empty). Returns 0.
  int wakeup_all();

  uint32_t queued() const { return queued_; }  // outstanding items (ASYNC_PF_PER_VCPU bound)
  // Done items waiting for check_completion. Any thread.
  bool has_completions() const;
  // The vCPU's halt: blocks until has_completions() or `timeout_ms` passed (< 0: forever).
  // Returns has_completions(). Any thread; a worker's completion wakes it.
  bool wait_for_completion(long timeout_ms = -1) const;

  // Events since the last call, oldest first.
  std::vector<AsyncPfEvent> take_events();

  // apf.id: the next token's id. For tests of the wraparound rule.
  void set_next_id(uint32_t id) { next_id_ = id; }
  // alloc_apf_token: (id++ << 12) | vcpu_id, id reset to 1 when id << 12 would be 0.
  uint32_t alloc_token();

  struct Shared;  // state the workers touch

 private:
  std::shared_ptr<AsyncPfWorkerPool::Impl> pool_;
  std::shared_ptr<Shared> shared_;
  uint32_t vcpu_id_;
  AsyncPfClient* client_;
  uint32_t next_id_ = 1;
  uint32_t queued_ = 0;
  std::vector<AsyncPfEvent> events_;
  struct Local;
  std::unique_ptr<Local> local_;  // the queue list and gfn set (vCPU thread only)
};

// The VM's async PF state: one worker pool and one queue per vCPU (what the MMU holds).
// vcpu_queue / remove_vcpu are thread safe; each queue is then used by its vCPU's thread.
class AsyncPf {
 public:
  // `mm` must outlive this object.
  explicit AsyncPf(HostMm& mm, unsigned nr_threads = 2) : pool_(mm, nr_threads) {}
  AsyncPf(const AsyncPf&) = delete;
  AsyncPf& operator=(const AsyncPf&) = delete;

  AsyncPfWorkerPool& pool() { return pool_; }
  // The vCPU's queue (stable address), created on first use with `client`; later calls
  // ignore `client`.
  AsyncPfQueue& vcpu_queue(uint32_t vcpu_id, AsyncPfClient* client = nullptr);
  // Clears and destroys the vCPU's queue (vCPU teardown). No-op when absent.
  void remove_vcpu(uint32_t vcpu_id);

 private:
  AsyncPfWorkerPool pool_;  // declared first: destroyed after the queues
  std::mutex mu_;
  std::map<uint32_t, std::unique_ptr<AsyncPfQueue>> queues_;
};

}  // namespace gfnmap
