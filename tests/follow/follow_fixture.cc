// Shared fixture of the follow tests: builds every named host state on a fresh SimHost, the
// same way each time, so that two instances (resolver vs reference) can be compared.
#include "follow_fixture.h"

#include <cerrno>
#include <sstream>

namespace gfnmap::test {
namespace {

constexpr uint64_t kLen = kSlotPages * kPageSize;

struct StateName {
  State state;
  std::string_view name;
};

constexpr StateName kNames[] = {
    {State::kNoSlot, "NoSlot"},
    {State::kInvalidSlot, "InvalidSlot"},
    {State::kReadonlySlot, "ReadonlySlot"},
    {State::kReadonlySlotNotPresent, "ReadonlySlotNotPresent"},
    {State::kPresentWritable, "PresentWritable"},
    {State::kNotPresentAnon, "NotPresentAnon"},
    {State::kNotPresentAnonNoZeroPage, "NotPresentAnonNoZeroPage"},
    {State::kZeroPage, "ZeroPage"},
    {State::kCowShared, "CowShared"},
    {State::kSharedNotPresent, "SharedNotPresent"},
    {State::kFastMissOnce, "FastMissOnce"},
    {State::kWriteProtected, "WriteProtected"},
    {State::kFileSharedWritenotify, "FileSharedWritenotify"},
    {State::kReadOnlyVma, "ReadOnlyVma"},
    {State::kSignalPending, "SignalPending"},
    {State::kSignalFatal, "SignalFatal"},
    {State::kFatalBeforeLock, "FatalBeforeLock"},
    {State::kPoisoned, "Poisoned"},
    {State::kNoVma, "NoVma"},
    {State::kFileNotResident, "FileNotResident"},
    {State::kSwappedOut, "SwappedOut"},
    {State::kProtNone, "ProtNone"},
    {State::kGupFault, "GupFault"},
    {State::kPfnmap, "Pfnmap"},
    {State::kPfnmapVmIo, "PfnmapVmIo"},
    {State::kPfnmapMissing, "PfnmapMissing"},
    {State::kPfnmapFixupFails, "PfnmapFixupFails"},
    {State::kPfnmapFixupDropsLock, "PfnmapFixupDropsLock"},
    {State::kPfnmapVmaReplaced, "PfnmapVmaReplaced"},
    {State::kPfnmapReadOnlyPte, "PfnmapReadOnlyPte"},
    {State::kPfnmapRefcountZero, "PfnmapRefcountZero"},
    {State::kPfnmapReserved, "PfnmapReserved"},
    {State::kPfnmapNoStructPage, "PfnmapNoStructPage"},
};

// Setup steps: the first failure is recorded and turns the whole build into nullptr.
struct Builder {
  Env& env;
  State state;
  bool ok = true;

  template <class T>
  T take(Result<T> r, const char* what) {
    if (r.ok()) return std::move(r).value();
    fail(what, r.error());
    return T{};
  }
  void take(Result<void> r, const char* what) {
    if (!r.ok()) fail(what, r.error());
  }
  void fail(const char* what, const Error& e) {
    ADD_FAILURE() << "building state " << to_string(state) << ": " << what << ": "
                  << error_to_string(e);
    ok = false;
  }

  // A VMA of the slot's size; the slot maps it, the page under test is kPageIndex.
  Hva map(Prot prot, VmaKind kind, const MmapOptions& options = {}) {
    Hva start = take(env.host.mmap(kLen, prot, kind, options), "mmap");
    env.slot.userspace_addr = start;
    env.hva = start + kPageIndex * kPageSize;
    return start;
  }
  MmapOptions pfnmap(PfnmapBacking backing, bool present = true, bool writable = true) {
    MmapOptions o;
    o.pfnmap_backing = backing;
    o.ptes_present = present;
    o.ptes_writable = writable;
    return o;
  }
};

}  // namespace

std::string_view to_string(State state) {
  for (const StateName& n : kNames) {
    if (n.state == state) return n.name;
  }
  return "?";
}

const std::vector<State>& all_states() {
  static const std::vector<State> states = [] {
    std::vector<State> v;
    for (const StateName& n : kNames) v.push_back(n.state);
    return v;
  }();
  return states;
}

std::unique_ptr<Env> make_env(State state) {
  auto env = std::make_unique<Env>(
      SimHostConfig{.zero_page = state != State::kNotPresentAnonNoZeroPage});
  env->slot.id = 1;
  env->slot.base_gfn = kBaseGfn;
  env->slot.npages = kSlotPages;
  Builder b{*env, state};
  SimHost& h = env->host;

  switch (state) {
    case State::kNoSlot:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      env->has_slot = false;
      break;
    case State::kInvalidSlot:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      env->slot.flags |= kMemslotInvalid;
      break;
    case State::kReadonlySlot:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      env->slot.flags |= kMemReadonly;
      break;
    case State::kReadonlySlotNotPresent:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      env->slot.flags |= kMemReadonly;
      break;
    case State::kPresentWritable:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      break;
    case State::kNotPresentAnon:
    case State::kNotPresentAnonNoZeroPage:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      break;
    case State::kZeroPage:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, false), "populate read");
      break;
    case State::kCowShared:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.make_cow_shared(env->hva), "make_cow_shared");
      break;
    case State::kSharedNotPresent:
      b.map(kProtRW, VmaKind::kAnonShared);
      break;
    case State::kFastMissOnce:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      b.take(h.inject_fast_miss(env->hva, 1), "inject_fast_miss");
      break;
    case State::kWriteProtected:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      b.take(h.write_protect(env->hva), "write_protect");
      break;
    case State::kFileSharedWritenotify: {
      MmapOptions o;
      o.page_cache_resident = true;
      o.writenotify = true;
      b.map(kProtRW, VmaKind::kFileShared, o);
      b.take(h.populate(env->hva, kPageSize, false), "populate read");
      break;
    }
    case State::kReadOnlyVma:
      b.map(Prot::kRead, VmaKind::kAnonShared);
      b.take(h.populate(env->hva, kPageSize, false), "populate read");
      break;
    case State::kSignalPending:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      h.set_signal(SignalState::kPending);
      break;
    case State::kSignalFatal:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      h.set_signal(SignalState::kFatal);
      break;
    case State::kFatalBeforeLock:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      h.set_signal(SignalState::kFatalBeforeLock);
      break;
    case State::kPoisoned:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.poison(env->hva), "poison");
      break;
    case State::kNoVma: {
      Hva start = b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.munmap(start, kLen), "munmap");
      break;
    }
    case State::kFileNotResident:
      b.map(kProtRW, VmaKind::kFilePrivate);
      break;
    case State::kSwappedOut:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.populate(env->hva, kPageSize, true), "populate");
      if (b.take(h.swap_out(env->hva), "swap_out") != 1) {
        ADD_FAILURE() << "swap_out did not swap the page out";
        b.ok = false;
      }
      break;
    case State::kProtNone:
      b.map(Prot::kNone, VmaKind::kAnonPrivate);
      break;
    case State::kGupFault:
      b.map(kProtRW, VmaKind::kAnonPrivate);
      b.take(h.inject_gup_result(env->hva, GupInjection{-EFAULT, -1}), "inject_gup_result");
      break;
    case State::kPfnmap:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted));
      break;
    case State::kPfnmapVmIo: {
      MmapOptions o = b.pfnmap(PfnmapBacking::kRefcounted);
      o.vm_io = true;
      b.map(kProtRW, VmaKind::kPfnmap, o);
      break;
    }
    case State::kPfnmapMissing:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted, false));
      break;
    case State::kPfnmapFixupFails:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted, false));
      b.take(h.inject_fixup(env->hva, FixupInjection{-EFAULT, 0, {}}), "inject_fixup");
      break;
    case State::kPfnmapFixupDropsLock:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted, false));
      b.take(h.inject_fixup(env->hva, FixupInjection{0, 1, {}}), "inject_fixup");
      break;
    case State::kPfnmapVmaReplaced: {
      Hva start = b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted, false));
      Env* e = env.get();
      FixupInjection inj;
      inj.drop_lock_times = 1;
      // While the lock is dropped the driver replaces the mapping: same range, new device
      // memory with present PTEs. A stale VMA would give the old pfn (or fail the fixup).
      inj.while_unlocked = [e, start](SimHost& host) {
        if (!host.munmap(start, kLen).ok()) {
          ADD_FAILURE() << "munmap while unlocked failed";
          return;
        }
        MmapOptions o;
        o.fixed = start;
        o.pfnmap_backing = PfnmapBacking::kRefcounted;
        Result<Hva> r = host.mmap(kLen, kProtRW, VmaKind::kPfnmap, o);
        if (!r.ok()) {
          ADD_FAILURE() << "mmap while unlocked failed: " << error_to_string(r.error());
          return;
        }
        std::optional<VmaInfo> info = host.vma_info(e->hva);
        if (info) e->replaced_device_pfn = info->device_pfn;
      };
      b.take(h.inject_fixup(env->hva, std::move(inj)), "inject_fixup");
      break;
    }
    case State::kPfnmapReadOnlyPte:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcounted, true, false));
      break;
    case State::kPfnmapRefcountZero:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kRefcountZero));
      break;
    case State::kPfnmapReserved:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kReserved));
      break;
    case State::kPfnmapNoStructPage:
      b.map(kProtRW, VmaKind::kPfnmap, b.pfnmap(PfnmapBacking::kNoStructPage));
      break;
  }
  if (!b.ok) return nullptr;
  h.reset_counters();
  return env;
}

Faultin faultin(Env& env, FollFlags flags) {
  Faultin f;
  // Garbage in the out-parameters: faultin_pfn must define both (invariant 1).
  f.page = Page{&env.host, Pfn(0xbad), Hva(0xbad000), false};
  f.pfn = faultin_pfn(env.host, env.slot_ptr(), env.gfn, flags, &f.writable, &f.page, &f.trace);
  return f;
}

void release_installed(const Faultin& f) {
  release_faultin_page(f.page, /*unused=*/false, /*dirty=*/f.writable);
}

bool has_row(const FollowTrace& trace, int row) {
  for (int r : trace.rows) {
    if (r == row) return true;
  }
  return false;
}

std::string trace_to_string(const FollowTrace& trace) {
  std::ostringstream out;
  out << "path " << to_string(trace.path) << ", rows {";
  for (size_t i = 0; i < trace.rows.size(); ++i) out << (i ? "," : "") << trace.rows[i];
  out << "}";
  for (const std::string& s : trace.steps) out << "\n  " << s;
  return out.str();
}

std::string frames_to_string(SimHost& host, const std::vector<Pfn>& pfns) {
  std::ostringstream out;
  for (Pfn pfn : pfns) {
    FrameInfo f = host.frame(pfn);
    out << pfn_to_string(pfn) << ": valid " << f.valid << " kind " << to_string(f.kind)
        << " ref " << f.refcount << " held " << f.held_refs << "/" << f.held_pins << " res "
        << f.reserved << " dirty " << f.dirty << " acc " << f.accessed << " freed " << f.freed
        << "\n";
  }
  return out.str();
}

}  // namespace gfnmap::test
