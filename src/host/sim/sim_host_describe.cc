// gfnmap host/sim: names of the model's enums, their parsers (for the CLI's JSON scenarios),
// and SimHost::describe / dump, the human-readable state.
#include <cstdio>
#include <string>

#include "sim_host_impl.h"

namespace gfnmap {
namespace {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string_view level_name(PgLevel level) {
  switch (level) {
    case PgLevel::k4K:
      return "4K";
    case PgLevel::k2M:
      return "2M";
    case PgLevel::k1G:
      return "1G";
  }
  return "?";
}

std::string_view state_name(PteInfo::State s) {
  switch (s) {
    case PteInfo::State::kNone:
      return "none";
    case PteInfo::State::kPresent:
      return "present";
    case PteInfo::State::kSwapped:
      return "swapped";
    case PteInfo::State::kHwpoison:
      return "hwpoison";
  }
  return "?";
}

std::string describe_frame(const detail::Frame& f, uint64_t pfn) {
  std::string s = "frame " + hex(pfn) + ": " + std::string(to_string(f.kind));
  if (!f.has_struct_page) s += " (no struct page)";
  s += " refcount " + std::to_string(f.refcount);
  s += " held " + std::to_string(f.held_refs) + " refs " + std::to_string(f.held_pins) + " pins";
  if (f.reserved) s += " reserved";
  if (f.poisoned) s += " poisoned";
  if (f.dirty) s += " dirty";
  if (f.accessed) s += " accessed";
  if (f.freed) s += " freed";
  return s;
}

std::string describe_vma(const detail::VmaRec& v) {
  std::string s = "vma [" + hex(v.start) + ", " + hex(v.end) + ") " + std::string(to_string(v.kind)) +
                  " " + prot_to_string(v.prot) + " " + std::string(to_string(v.backing));
  if (v.file_backed() && !v.is_hugetlb()) {
    s += " file " + std::to_string(v.file) + " +" + hex(v.file_off);
    if (v.writenotify) s += " writenotify";
  }
  if (v.kind == VmaKind::kPfnmap) {
    s += std::string(v.vm_io ? " VM_IO|VM_PFNMAP" : " VM_PFNMAP") + " device pfn " +
         hex(v.device_pfn) + " " + std::string(to_string(v.pfnmap_backing));
  }
  return s;
}

std::string describe_pte(const detail::Pte& p, uint64_t zero_pfn) {
  std::string s = "pte " + std::string(state_name(p.state));
  if (p.state == PteInfo::State::kPresent || p.state == PteInfo::State::kHwpoison) {
    s += " pfn " + hex(p.pfn);
  }
  if (p.state == PteInfo::State::kPresent) {
    s += p.writable ? " writable" : " read-only";
    if (p.pfn == zero_pfn) s += " zero-page";
  }
  if (p.cow) s += " cow-shared";
  if (p.young) s += " young";
  if (p.dirty) s += " dirty";
  return s;
}

}  // namespace

std::string_view to_string(VmaKind kind) {
  switch (kind) {
    case VmaKind::kAnonPrivate:
      return "anon-private";
    case VmaKind::kAnonShared:
      return "anon-shared";
    case VmaKind::kFilePrivate:
      return "file-private";
    case VmaKind::kFileShared:
      return "file-shared";
    case VmaKind::kPfnmap:
      return "pfnmap";
  }
  return "?";
}

std::string_view to_string(PageBacking backing) {
  switch (backing) {
    case PageBacking::k4K:
      return "4k";
    case PageBacking::kThp:
      return "thp";
    case PageBacking::kHugetlb2M:
      return "hugetlb-2m";
    case PageBacking::kHugetlb1G:
      return "hugetlb-1g";
  }
  return "?";
}

std::string_view to_string(PfnmapBacking backing) {
  switch (backing) {
    case PfnmapBacking::kRefcounted:
      return "refcounted";
    case PfnmapBacking::kRefcountZero:
      return "refcount-zero";
    case PfnmapBacking::kReserved:
      return "reserved";
    case PfnmapBacking::kNoStructPage:
      return "no-struct-page";
  }
  return "?";
}

std::string_view to_string(SignalState state) {
  switch (state) {
    case SignalState::kNone:
      return "none";
    case SignalState::kPending:
      return "pending";
    case SignalState::kFatal:
      return "fatal";
    case SignalState::kFatalBeforeLock:
      return "fatal-before-lock";
  }
  return "?";
}

std::string_view to_string(FrameKind kind) {
  switch (kind) {
    case FrameKind::kZero:
      return "zero";
    case FrameKind::kAnon:
      return "anon";
    case FrameKind::kPageCache:
      return "page-cache";
    case FrameKind::kDevice:
      return "device";
    case FrameKind::kHole:
      return "hole";
  }
  return "?";
}

std::string prot_to_string(Prot prot) {
  std::string s = "---";
  if (has(prot, Prot::kRead)) s[0] = 'r';
  if (has(prot, Prot::kWrite)) s[1] = 'w';
  if (has(prot, Prot::kExec)) s[2] = 'x';
  return s;
}

namespace {
template <class E, size_t N>
std::optional<E> parse_enum(std::string_view text, const E (&values)[N]) {
  for (E v : values) {
    if (to_string(v) == text) return v;
  }
  return std::nullopt;
}
}  // namespace

std::optional<VmaKind> parse_vma_kind(std::string_view text) {
  constexpr VmaKind kAll[] = {VmaKind::kAnonPrivate, VmaKind::kAnonShared, VmaKind::kFilePrivate,
                              VmaKind::kFileShared, VmaKind::kPfnmap};
  return parse_enum(text, kAll);
}

std::optional<PageBacking> parse_page_backing(std::string_view text) {
  constexpr PageBacking kAll[] = {PageBacking::k4K, PageBacking::kThp, PageBacking::kHugetlb2M,
                                  PageBacking::kHugetlb1G};
  return parse_enum(text, kAll);
}

std::optional<PfnmapBacking> parse_pfnmap_backing(std::string_view text) {
  constexpr PfnmapBacking kAll[] = {PfnmapBacking::kRefcounted, PfnmapBacking::kRefcountZero,
                                    PfnmapBacking::kReserved, PfnmapBacking::kNoStructPage};
  return parse_enum(text, kAll);
}

std::optional<SignalState> parse_signal_state(std::string_view text) {
  constexpr SignalState kAll[] = {SignalState::kNone, SignalState::kPending, SignalState::kFatal,
                                  SignalState::kFatalBeforeLock};
  return parse_enum(text, kAll);
}

std::optional<Prot> parse_prot(std::string_view text) {
  if (text == "none") return Prot::kNone;
  if (text.empty()) return std::nullopt;
  Prot p = Prot::kNone;
  for (char c : text) {
    switch (c) {
      case 'r':
        p = p | Prot::kRead;
        break;
      case 'w':
        p = p | Prot::kWrite;
        break;
      case 'x':
        p = p | Prot::kExec;
        break;
      case '-':
        break;
      default:
        return std::nullopt;
    }
  }
  return p;
}

std::string SimHost::describe(Hva hva) const {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  const uint64_t a = detail::align_down(hva.value, kPageSize);
  const uint64_t pg = detail::page_no(a);
  std::string s = "hva " + hex(hva.value) + "\n";
  const detail::VmaRec* v = im.find_vma_locked(a);
  if (!v) {
    s += "  no vma\n";
  } else {
    s += "  " + describe_vma(*v) + "\n";
  }
  auto it = im.ptes.find(pg);
  if (it == im.ptes.end()) {
    s += "  pte none\n";
  } else {
    s += "  " + describe_pte(it->second, im.cfg.first_pfn) + "\n";
    if (it->second.state == PteInfo::State::kPresent ||
        it->second.state == PteInfo::State::kHwpoison) {
      if (const detail::Frame* f = im.frame_locked(it->second.pfn)) {
        s += "  " + describe_frame(*f, it->second.pfn) + "\n";
      }
    }
  }
  if (v && v->file_backed() && !v->is_hugetlb()) {
    const detail::File& f = im.files.at(v->file);
    const uint64_t idx = v->file_index(a);
    s += "  file " + std::to_string(v->file) + (f.memfd ? " (memfd)" : " (disk)") + " page " +
         std::to_string(idx) + ": ";
    if (idx >= f.npages) {
      s += "beyond EOF\n";
    } else if (f.cache.count(idx)) {
      s += "in page cache (pfn " + hex(f.cache.at(idx)) + ")\n";
    } else if (f.disk.count(idx) || !f.memfd) {
      s += f.memfd ? "swapped out (needs I/O)\n" : "on disk (needs I/O)\n";
    } else {
      s += "not allocated\n";
    }
  }
  PgLevel level = PgLevel::k4K;
  if (it != im.ptes.end() && it->second.state == PteInfo::State::kPresent) {
    level = im.huge_level_locked(a, nullptr).value_or(PgLevel::k4K);
  }
  s += "  host mapping level " + std::string(level_name(level)) + "\n";
  if (auto g = im.gup_inj.find(pg); g != im.gup_inj.end()) {
    s += "  injected GUP result " + std::to_string(g->second.result) + " (" +
         (g->second.times < 0 ? std::string("until cleared") : std::to_string(g->second.times) + " more") +
         ")\n";
  }
  if (auto g = im.fast_inj.find(pg); g != im.fast_inj.end()) {
    s += "  injected fast-path miss (" +
         (g->second < 0 ? std::string("until cleared") : std::to_string(g->second) + " more") + ")\n";
  }
  if (auto g = im.fixup_inj.find(pg); g != im.fixup_inj.end()) {
    s += "  injected fixup: error " + std::to_string(g->second.error) + ", drops lock " +
         std::to_string(g->second.drop_lock_times) + " more times" +
         (g->second.while_unlocked ? " with a callback" : "") + "\n";
  }
  SignalState sig = im.signal_locked();
  if (sig != SignalState::kNone) s += "  signal " + std::string(to_string(sig)) + "\n";
  return s;
}

std::string SimHost::dump() const {
  Impl& im = *impl_;
  std::lock_guard l(im.mu);
  std::string s;
  for (const auto& [start, v] : im.vmas) {
    s += describe_vma(v) + "\n";
    for (auto it = im.ptes.lower_bound(detail::page_no(v.start));
         it != im.ptes.end() && it->first < detail::page_no(v.end); ++it) {
      s += "  " + hex(it->first << kPageShift) + " " + describe_pte(it->second, im.cfg.first_pfn);
      if (it->second.state == PteInfo::State::kPresent) {
        if (const detail::Frame* f = im.frame_locked(it->second.pfn)) {
          s += " refcount " + std::to_string(f->refcount);
          if (f->held_refs || f->held_pins) {
            s += " held " + std::to_string(f->held_refs) + "+" + std::to_string(f->held_pins);
          }
        }
      }
      s += "\n";
    }
  }
  for (const auto& [rs, lvl] : im.huge) {
    s += "huge mapping " + hex(rs) + " " + std::string(level_name(lvl)) + "\n";
  }
  const SimCounters& c = im.counts;
  s += "signal " + std::string(to_string(im.signal)) + ", outstanding refs " +
       std::to_string(im.outstanding) + ", violations " + std::to_string(im.violation_count) + "\n";
  s += "counters: fast " + std::to_string(c.fast_hits) + "/" + std::to_string(c.fast_lookups) +
       ", slow GUP " + std::to_string(c.slow_gup_pages) + "/" + std::to_string(c.slow_gups) +
       ", vma_lookup " + std::to_string(c.vma_lookups) + ", follow_pfnmap " +
       std::to_string(c.follow_pfnmaps) + ", fixup " + std::to_string(c.fixups) + " (" +
       std::to_string(c.fixup_unlocks) + " unlocked), faults " + std::to_string(c.faults) +
       ", cow breaks " + std::to_string(c.cow_breaks) + ", page-ins " +
       std::to_string(c.page_ins) + ", invalidations " + std::to_string(c.invalidations) + "\n";
  return s;
}

}  // namespace gfnmap
