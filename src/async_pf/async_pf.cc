// gfnmap async_pf: per-vCPU queues of background fault-ins (kvm_setup_async_pf and friends) and
// the bounded worker pool that runs the slow path for them (async_pf_execute).
#include "gfnmap/async_pf.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <list>
#include <thread>
#include <unordered_map>

namespace gfnmap {

// ---------------------------------------------------------------------------------------------
// Internal state.
//
// Lock order: AsyncPfWorkerPool::Impl::mu, then AsyncPfQueue::Shared::lock; neither is held
// while calling a client or the HostMm.
//
// Ownership: every item of a queue (wakeup_all ones too) lives in the queue's `items` list
// (vCPU thread only) until check_completion delivers it or clear_completion_queue drops it.
// A worker holds a raw pointer while the item is pending or running and gives it up when it
// appends the item to the done list; it never touches the item afterwards.

namespace {
struct Item;
}

struct AsyncPfQueue::Shared {
  AsyncPfClient* client = nullptr;
  mutable std::mutex lock;  // vcpu->async_pf.lock: the done list
  mutable std::condition_variable cv;
  std::deque<Item*> done;
  long running = 0;  // items a worker is running; under the pool's mu
};

namespace {

struct Item {
  AsyncPfWork work;
  std::shared_ptr<AsyncPfQueue::Shared> owner;
  std::list<std::unique_ptr<Item>>::iterator self;  // position in the owner's item list
};

// Appends a finished item to its owner's done list (the tail of async_pf_execute).
void complete(Item* item) {
  std::shared_ptr<AsyncPfQueue::Shared> owner = item->owner;
  bool first = false;
  {
    std::lock_guard<std::mutex> guard(owner->lock);
    first = owner->done.empty();
    owner->done.push_back(item);  // item is the vCPU's from here on
  }
  if (first && owner->client != nullptr) owner->client->page_present_queued();
  owner->cv.notify_all();
}

}  // namespace

struct AsyncPfWorkerPool::Impl {
  explicit Impl(HostMm& m) : mm(m) {}

  HostMm& mm;
  std::mutex mu;
  std::condition_variable work_cv;  // pending non-empty or stopping
  std::condition_variable idle_cv;  // some owner's running dropped
  std::deque<Item*> pending;
  bool stopping = false;
  std::vector<std::thread> threads;
  std::atomic<uint64_t> completed{0};

  void worker_loop() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      work_cv.wait(lk, [&] { return stopping || !pending.empty(); });
      if (pending.empty()) return;  // stopping
      Item* item = pending.front();
      pending.pop_front();
      std::shared_ptr<AsyncPfQueue::Shared> owner = item->owner;
      ++owner->running;
      lk.unlock();

      // The slow path with write intent; no page is kept (get_user_pages_remote + put).
      Page page;
      const long r = mm.get_user_pages_unlocked(item->work.hva, kFollWrite, &page);
      if (r > 0 && page) mm.put_page(page);
      item->work.gup_result = r;
      // Counted before the item becomes visible, so completed() covers every delivered item.
      completed.fetch_add(1, std::memory_order_relaxed);
      complete(item);  // always, even when fault-in failed

      lk.lock();
      --owner->running;
      idle_cv.notify_all();
    }
  }

  // Queues item for a worker; completes it at once (-ECANCELED) when the pool is stopping.
  void schedule(Item* item) {
    {
      std::lock_guard<std::mutex> guard(mu);
      if (!stopping) {
        pending.push_back(item);
        work_cv.notify_one();
        return;
      }
    }
    item->work.gup_result = -ECANCELED;
    complete(item);
  }

  bool is_stopping() {
    std::lock_guard<std::mutex> guard(mu);
    return stopping;
  }
};

// ---------------------------------------------------------------------------------------------
// AsyncPfClient defaults.

bool AsyncPfClient::page_not_present(const AsyncPfWork& /*work*/) { return true; }
bool AsyncPfClient::can_dequeue_page_present() { return true; }
void AsyncPfClient::page_ready(const AsyncPfWork& /*work*/) {}
void AsyncPfClient::page_present(const AsyncPfWork& /*work*/) {}
void AsyncPfClient::page_present_queued() {}

// ---------------------------------------------------------------------------------------------
// AsyncPfWorkerPool.

AsyncPfWorkerPool::AsyncPfWorkerPool(HostMm& mm, unsigned nr_threads)
    : impl_(std::make_shared<Impl>(mm)) {
  nr_threads = std::clamp(nr_threads, 1u, 64u);
  impl_->threads.reserve(nr_threads);
  for (unsigned i = 0; i < nr_threads; ++i) {
    impl_->threads.emplace_back([impl = impl_.get()] { impl->worker_loop(); });
  }
}

AsyncPfWorkerPool::~AsyncPfWorkerPool() {
  std::deque<Item*> cancelled;
  {
    std::lock_guard<std::mutex> guard(impl_->mu);
    impl_->stopping = true;
    cancelled.swap(impl_->pending);
    // Counted as running so that a concurrent clear_completion_queue waits for them.
    for (Item* item : cancelled) ++item->owner->running;
    impl_->work_cv.notify_all();
  }
  // Not started: complete without fault-in so their vCPUs still see "page ready".
  for (Item* item : cancelled) {
    std::shared_ptr<AsyncPfQueue::Shared> owner = item->owner;
    item->work.gup_result = -ECANCELED;
    complete(item);
    std::lock_guard<std::mutex> guard(impl_->mu);
    --owner->running;
    impl_->idle_cv.notify_all();
  }
  for (std::thread& t : impl_->threads) t.join();
}

unsigned AsyncPfWorkerPool::nr_threads() const {
  return static_cast<unsigned>(impl_->threads.size());
}

uint64_t AsyncPfWorkerPool::completed() const {
  return impl_->completed.load(std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// AsyncPfQueue.

struct AsyncPfQueue::Local {
  std::list<std::unique_ptr<Item>> items;       // vcpu->async_pf.queue
  std::unordered_map<uint64_t, uint32_t> gfns;  // vcpu->arch.apf.gfns: gfn -> outstanding items
};

AsyncPfQueue::AsyncPfQueue(AsyncPfWorkerPool& pool, uint32_t vcpu_id, AsyncPfClient* client)
    : pool_(pool.impl_),
      shared_(std::make_shared<Shared>()),
      vcpu_id_(vcpu_id),
      client_(client),
      local_(std::make_unique<Local>()) {
  shared_->client = client;
}

AsyncPfQueue::~AsyncPfQueue() { clear_completion_queue(); }

uint32_t AsyncPfQueue::alloc_token() {
  // Never 0: when id << 12 would be 0 (id's low 20 bits clear) the id restarts at 1.
  if ((next_id_ << 12) == 0) next_id_ = 1;
  const uint32_t id = next_id_++;
  return (id << 12) | vcpu_id_;
}

uint32_t AsyncPfQueue::setup_async_pf(Gpa cr2_or_gpa, Gfn gfn, Hva hva, uint64_t error_code) {
  const uint32_t token = alloc_token();
  if (queued_ >= kAsyncPfPerVcpu) return 0;
  if (kvm_is_error_hva(hva)) return 0;
  if (pool_->is_stopping()) return 0;

  auto owned = std::make_unique<Item>();
  Item* item = owned.get();
  item->owner = shared_;
  item->work.token = token;
  item->work.gfn = gfn;
  item->work.cr2_or_gpa = cr2_or_gpa;
  item->work.hva = hva;
  item->work.error_code = error_code;
  local_->items.push_back(std::move(owned));
  item->self = std::prev(local_->items.end());
  ++queued_;
  ++local_->gfns[gfn.value];

  item->work.notpresent_injected = client_ ? client_->page_not_present(item->work) : true;
  events_.push_back(AsyncPfEvent{AsyncPfEvent::Kind::kPageNotPresent, token, gfn, cr2_or_gpa,
                                 false, 0});
  pool_->schedule(item);
  return token;
}

bool AsyncPfQueue::find_gfn(Gfn gfn) const {
  auto it = local_->gfns.find(gfn.value);
  return it != local_->gfns.end() && it->second != 0;
}

unsigned AsyncPfQueue::check_completion() {
  unsigned delivered = 0;
  for (;;) {
    Item* item = nullptr;
    {
      std::lock_guard<std::mutex> guard(shared_->lock);
      if (shared_->done.empty()) break;
      item = shared_->done.front();
    }
    if (client_ != nullptr && !client_->can_dequeue_page_present()) break;
    {
      // Only this thread pops, so the front is still `item`.
      std::lock_guard<std::mutex> guard(shared_->lock);
      shared_->done.pop_front();
    }
    AsyncPfWork& work = item->work;
    if (!work.wakeup_all) {
      if (client_ != nullptr) client_->page_ready(work);  // prefetch re-run of the fault
      auto it = local_->gfns.find(work.gfn.value);
      if (it != local_->gfns.end() && --it->second == 0) local_->gfns.erase(it);
    }
    if (client_ != nullptr) client_->page_present(work);
    events_.push_back(AsyncPfEvent{AsyncPfEvent::Kind::kPageReady, work.token, work.gfn,
                                   work.cr2_or_gpa, work.wakeup_all, work.gup_result});
    --queued_;
    local_->items.erase(item->self);
    ++delivered;
  }
  return delivered;
}

void AsyncPfQueue::clear_completion_queue() {
  {
    // Cancel work not yet started (cancel_work_sync), wait for running work.
    std::unique_lock<std::mutex> lk(pool_->mu);
    auto& pending = pool_->pending;
    pending.erase(std::remove_if(pending.begin(), pending.end(),
                                 [&](Item* item) { return item->owner == shared_; }),
                  pending.end());
    pool_->idle_cv.wait(lk, [&] { return shared_->running == 0; });
  }
  {
    std::lock_guard<std::mutex> guard(shared_->lock);
    shared_->done.clear();
  }
  local_->items.clear();
  local_->gfns.clear();
  queued_ = 0;
}

int AsyncPfQueue::wakeup_all() {
  {
    std::lock_guard<std::mutex> guard(shared_->lock);
    if (!shared_->done.empty()) return 0;
  }
  auto owned = std::make_unique<Item>();
  Item* item = owned.get();
  item->owner = shared_;
  item->work.token = kAsyncPfWakeupAllToken;
  item->work.wakeup_all = true;
  item->work.gup_result = 0;
  local_->items.push_back(std::move(owned));
  item->self = std::prev(local_->items.end());
  ++queued_;
  complete(item);
  return 0;
}

bool AsyncPfQueue::has_completions() const {
  std::lock_guard<std::mutex> guard(shared_->lock);
  return !shared_->done.empty();
}

bool AsyncPfQueue::wait_for_completion(long timeout_ms) const {
  std::unique_lock<std::mutex> lk(shared_->lock);
  auto ready = [&] { return !shared_->done.empty(); };
  if (timeout_ms < 0) {
    shared_->cv.wait(lk, ready);
    return true;
  }
  return shared_->cv.wait_for(lk, std::chrono::milliseconds(timeout_ms), ready);
}

std::vector<AsyncPfEvent> AsyncPfQueue::take_events() {
  std::vector<AsyncPfEvent> out;
  out.swap(events_);
  return out;
}

// ---------------------------------------------------------------------------------------------
// AsyncPf.

AsyncPfQueue& AsyncPf::vcpu_queue(uint32_t vcpu_id, AsyncPfClient* client) {
  std::lock_guard<std::mutex> guard(mu_);
  auto& slot = queues_[vcpu_id];
  if (!slot) slot = std::make_unique<AsyncPfQueue>(pool_, vcpu_id, client);
  return *slot;
}

void AsyncPf::remove_vcpu(uint32_t vcpu_id) {
  std::unique_ptr<AsyncPfQueue> queue;
  {
    std::lock_guard<std::mutex> guard(mu_);
    auto it = queues_.find(vcpu_id);
    if (it == queues_.end()) return;
    queue = std::move(it->second);
    queues_.erase(it);
  }
}

}  // namespace gfnmap
