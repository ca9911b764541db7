// gfnmap CLI: builds and changes a SimHost from a scenario's "host" blocks (files, VMAs, page
// operations, injections, signals), with named VMAs usable as addresses everywhere.
#include "host_model.h"

#include <fmt/format.h>

#include <cctype>

namespace gfnmap::cli {
namespace {

// "EFAULT", "-EFAULT", -14 or 0 -> a value <= 0.
long parse_neg_errno(const JsonReader& r) {
  if (r.value().is_number_integer()) {
    int64_t v = r.get_int();
    if (v > 0) r.fail("expected 0 or a negative errno (or a name like \"-EFAULT\")");
    return static_cast<long>(v);
  }
  std::string s = r.get_string();
  std::string_view name = s;
  if (name.starts_with("-")) name.remove_prefix(1);
  for (int code = 1; code < 256; ++code) {
    if (errno_name(code) == name) return -code;
  }
  r.fail(fmt::format("unknown errno name \"{}\"", s));
}

Prot parse_prot_field(const JsonReader& r) {
  auto p = parse_prot(r.get_string());
  if (!p) r.fail("expected a protection like \"rw\", \"r\", \"rwx\" or \"none\"");
  return *p;
}

void check(const JsonReader& r, const Result<void>& res, std::string_view what) {
  if (!res.ok()) r.fail(fmt::format("SimHost {} fails: {}", what, error_to_string(res.error())));
}

template <class T>
T check(const JsonReader& r, Result<T> res, std::string_view what) {
  if (!res.ok()) r.fail(fmt::format("SimHost {} fails: {}", what, error_to_string(res.error())));
  return std::move(res.value());
}

}  // namespace

HostModel::HostModel(const JsonReader& host) {
  SimHostConfig config;
  if (!host.value().is_null()) {
    host.expect_object({"config", "files", "vmas", "ops"});
    if (host.has("config")) {
      JsonReader c = host.at("config");
      c.expect_object({"hva_base", "first_pfn", "zero_page"});
      if (auto v = c.opt_u64("hva_base")) config.hva_base = Hva(*v);
      if (auto v = c.opt_u64("first_pfn")) config.first_pfn = *v;
      if (auto v = c.opt_bool("zero_page")) config.zero_page = *v;
    }
  }
  sim_ = std::make_unique<SimHost>(config);
  if (host.value().is_null()) return;

  if (host.has("files")) {
    JsonReader files = host.at("files");
    for (size_t i = 0; i < files.array_size(); ++i) {
      JsonReader f = files.index(i);
      f.expect_object({"name", "kind", "size", "resident"});
      std::string name = f.at("name").get_string();
      if (file_names_.count(name)) f.at("name").fail(fmt::format("file \"{}\" defined twice", name));
      std::string kind = f.at("kind").get_string();
      uint64_t size = f.at("size").get_u64();
      FileId id = 0;
      if (kind == "memfd") {
        if (f.has("resident")) f.at("resident").fail("a memfd is always resident");
        id = check(f, sim_->create_memfd(size), "create_memfd");
      } else if (kind == "file") {
        id = check(f, sim_->create_file(size, f.opt_bool("resident").value_or(false)),
                   "create_file");
      } else {
        f.at("kind").fail("expected \"memfd\" or \"file\"");
      }
      file_names_.emplace(std::move(name), id);
    }
  }

  if (host.has("vmas")) {
    JsonReader vmas = host.at("vmas");
    for (size_t i = 0; i < vmas.array_size(); ++i) {
      JsonReader v = vmas.index(i);
      v.expect_object({"name", "size", "prot", "kind", "backing", "at", "file", "file_offset",
                       "page_cache_resident", "writenotify", "vm_io", "pfnmap_backing",
                       "ptes_present", "ptes_writable"});
      std::string name = v.opt_string("name").value_or("");
      if (!name.empty()) {
        if (!std::isalpha(static_cast<unsigned char>(name[0])) ||
            name.find_first_of("+- ") != std::string::npos) {
          v.at("name").fail("a VMA name starts with a letter and has no '+', '-' or space");
        }
        if (vma_names_.count(name)) v.at("name").fail(fmt::format("VMA \"{}\" defined twice", name));
      }
      uint64_t size = v.at("size").get_u64();
      Prot prot = v.has("prot") ? parse_prot_field(v.at("prot")) : kProtRW;
      VmaKind kind = VmaKind::kAnonPrivate;
      if (auto k = v.opt_string("kind")) {
        auto parsed = parse_vma_kind(*k);
        if (!parsed) {
          v.at("kind").fail("expected anon-private, anon-shared, file-private, file-shared or "
                            "pfnmap");
        }
        kind = *parsed;
      }
      MmapOptions o;
      if (auto b = v.opt_string("backing")) {
        auto parsed = parse_page_backing(*b);
        if (!parsed) v.at("backing").fail("expected 4k, thp, hugetlb-2m or hugetlb-1g");
        o.backing = *parsed;
      }
      if (v.has("at")) o.fixed = address(v.at("at"));
      if (auto f = v.opt_string("file")) {
        auto it = file_names_.find(*f);
        if (it == file_names_.end()) v.at("file").fail(fmt::format("no file \"{}\" in host.files", *f));
        o.file = it->second;
      }
      if (auto off = v.opt_u64("file_offset")) o.file_offset = *off;
      if (auto b = v.opt_bool("page_cache_resident")) o.page_cache_resident = *b;
      if (auto b = v.opt_bool("writenotify")) o.writenotify = *b;
      const bool pfnmap = kind == VmaKind::kPfnmap;
      for (std::string_view key : {"vm_io", "pfnmap_backing", "ptes_present", "ptes_writable"}) {
        if (v.has(key) && !pfnmap) v.fail_key(key, "applies only to kind \"pfnmap\"");
      }
      if (auto b = v.opt_bool("vm_io")) o.vm_io = *b;
      if (auto pb = v.opt_string("pfnmap_backing")) {
        auto parsed = parse_pfnmap_backing(*pb);
        if (!parsed) {
          v.at("pfnmap_backing").fail("expected refcounted, refcount-zero, reserved or "
                                      "no-struct-page");
        }
        o.pfnmap_backing = *parsed;
      }
      if (auto b = v.opt_bool("ptes_present")) o.ptes_present = *b;
      if (auto b = v.opt_bool("ptes_writable")) o.ptes_writable = *b;
      Hva at = check(v, sim_->mmap(size, prot, kind, o), "mmap");
      if (!name.empty()) vma_names_.emplace(std::move(name), at);
    }
  }
  if (host.has("ops")) run_ops(host.at("ops"), /*dry=*/false);
}

void HostModel::apply_changes(const JsonReader& changes) {
  changes.expect_object({"ops"});
  run_ops(changes.at("ops"), /*dry=*/false);
}

Hva HostModel::address(const JsonReader& value) const {
  if (value.value().is_string()) {
    const std::string& s = value.value().get_ref<const std::string&>();
    if (!s.empty() && std::isalpha(static_cast<unsigned char>(s[0]))) {
      size_t op = s.find_first_of("+-");
      std::string_view name = std::string_view(s).substr(0, op);
      auto it = vma_names_.find(name);
      if (it == vma_names_.end()) {
        std::string known;
        for (const auto& [n, hva] : vma_names_) known += (known.empty() ? "" : ", ") + n;
        value.fail(fmt::format("no VMA named \"{}\" (named VMAs: {})", name,
                               known.empty() ? "none" : known));
      }
      if (op == std::string::npos) return it->second;
      uint64_t off;
      try {
        off = parse_u64(std::string_view(s).substr(op + 1), value.path());
      } catch (const BadInput& e) {
        value.fail(e.what());
      }
      return s[op] == '+' ? it->second + off : it->second - off;
    }
  }
  return Hva(value.get_u64());
}

std::optional<FrameState> HostModel::frame(Pfn pfn) const {
  FrameInfo f = sim_->frame(pfn);
  if (!f.valid) return std::nullopt;
  FrameState s;
  s.pfn = pfn.value;
  s.kind = std::string(to_string(f.kind));
  s.refcount = f.refcount;
  s.held = f.held_refs + f.held_pins;
  s.dirty = f.dirty;
  s.accessed = f.accessed;
  s.reserved = f.reserved;
  s.poisoned = f.poisoned;
  s.freed = f.freed;
  return s;
}

std::optional<FrameState> HostModel::mapped_frame(Hva hva) const {
  PteInfo pte = sim_->pte(hva);
  if (pte.state != PteInfo::State::kPresent) return std::nullopt;
  return frame(pte.pfn);
}

std::vector<std::string> HostModel::describe_vmas() const {
  std::vector<std::string> lines;
  std::map<uint64_t, std::string> names;
  for (const auto& [n, hva] : vma_names_) names[hva.value] = n;
  // Walk the VMAs in address order through vma_info.
  std::vector<VmaInfo> infos;
  for (const auto& [start, name] : names) {
    if (auto info = sim_->vma_info(Hva(start))) {
      lines.push_back(fmt::format("{:<8} [{:#x}, {:#x}) {} {} {}{}", name, info->vma.start.value,
                                  info->vma.end.value, to_string(info->kind),
                                  prot_to_string(info->prot), to_string(info->backing),
                                  info->kind == VmaKind::kPfnmap
                                      ? fmt::format(" {}", to_string(info->pfnmap_backing))
                                      : ""));
    }
  }
  return lines;
}

void HostModel::run_ops(const JsonReader& ops, bool dry) {
  for (size_t i = 0; i < ops.array_size(); ++i) run_op(ops.index(i), dry);
}

void HostModel::validate_changes(const JsonReader& changes) {
  changes.expect_object({"ops"});
  run_ops(changes.at("ops"), /*dry=*/true);
}

std::string HostModel::take_deferred_error() {
  std::string e = std::move(deferred_error_);
  deferred_error_.clear();
  return e;
}

// Parses every field of one op (so a dry run finds every input error), then applies it to the
// model unless `dry`.
void HostModel::run_op(const JsonReader& r, bool dry) {
  if (!r.value().is_object()) r.fail("expected an object like {\"op\": \"populate\", ...}");
  std::string op = r.at("op").get_string();
  auto len = [&] { return r.opt_u64("len").value_or(kPageSize); };
  SimHost& sim = *sim_;
  if (op == "populate") {
    r.expect_object({"op", "hva", "len", "write"});
    Hva hva = address(r.at("hva"));
    bool write = r.opt_bool("write").value_or(false);
    if (!dry) check(r, sim.populate(hva, len(), write), "populate");
  } else if (op == "discard" || op == "munmap" || op == "make_cow_shared" ||
             op == "write_protect" || op == "evict_from_page_cache" || op == "swap_out" ||
             op == "zap_pfnmap") {
    r.expect_object({"op", "hva", "len"});
    Hva hva = address(r.at("hva"));
    uint64_t n = len();
    if (dry) return;
    if (op == "discard") check(r, sim.discard(hva, n), op);
    if (op == "munmap") check(r, sim.munmap(hva, n), op);
    if (op == "make_cow_shared") check(r, sim.make_cow_shared(hva, n), op);
    if (op == "write_protect") check(r, sim.write_protect(hva, n), op);
    if (op == "evict_from_page_cache") (void)check(r, sim.evict_from_page_cache(hva, n), op);
    if (op == "swap_out") (void)check(r, sim.swap_out(hva, n), op);
    if (op == "zap_pfnmap") check(r, sim.zap_pfnmap(hva, n), op);
  } else if (op == "mprotect") {
    r.expect_object({"op", "hva", "len", "prot"});
    Hva hva = address(r.at("hva"));
    Prot prot = parse_prot_field(r.at("prot"));
    if (!dry) check(r, sim.mprotect(hva, len(), prot), "mprotect");
  } else if (op == "poison") {
    r.expect_object({"op", "hva"});
    Hva hva = address(r.at("hva"));
    if (!dry) check(r, sim.poison(hva), "poison");
  } else if (op == "set_signal") {
    r.expect_object({"op", "state"});
    auto state = parse_signal_state(r.at("state").get_string());
    if (!state) r.at("state").fail("expected none, pending, fatal or fatal-before-lock");
    if (!dry) sim.set_signal(*state);
  } else if (op == "inject_gup_result") {
    r.expect_object({"op", "hva", "result", "times"});
    GupInjection inj;
    inj.result = parse_neg_errno(r.at("result"));
    if (r.has("times")) inj.times = static_cast<int>(r.at("times").get_int());
    Hva hva = address(r.at("hva"));
    if (!dry) check(r, sim.inject_gup_result(hva, inj), "inject_gup_result");
  } else if (op == "inject_fast_miss") {
    r.expect_object({"op", "hva", "times"});
    int times = r.has("times") ? static_cast<int>(r.at("times").get_int()) : -1;
    Hva hva = address(r.at("hva"));
    if (!dry) check(r, sim.inject_fast_miss(hva, times), "inject_fast_miss");
  } else if (op == "inject_fixup") {
    r.expect_object({"op", "hva", "error", "drop_lock_times", "while_unlocked"});
    FixupInjection inj;
    if (r.has("error")) inj.error = static_cast<int>(parse_neg_errno(r.at("error")));
    if (r.has("drop_lock_times")) {
      inj.drop_lock_times = static_cast<int>(r.at("drop_lock_times").get_int());
    }
    Hva hva = address(r.at("hva"));
    if (r.has("while_unlocked")) {
      JsonReader nested = r.at("while_unlocked");
      run_ops(nested, /*dry=*/true);  // every input error is found here, not in the callback
      // The callback runs on the faulting thread inside the resolver, where no exception may
      // escape: a SimHost refusal is kept and reported after the request.
      auto ops = std::make_shared<nlohmann::json>(nested.value());
      auto path = std::make_shared<std::string>(nested.path());
      const std::string* file = r.file();
      const std::string* text = r.text();
      inj.while_unlocked = [this, ops, path, file, text](SimHost&) {
        try {
          run_ops(JsonReader(*ops, *path, file, text), /*dry=*/false);
        } catch (const BadInput& e) {
          if (deferred_error_.empty()) deferred_error_ = e.what();
        }
      };
    }
    if (!dry) check(r, sim.inject_fixup(hva, std::move(inj)), "inject_fixup");
  } else if (op == "clear_injections") {
    r.expect_object({"op"});
    if (!dry) sim.clear_injections();
  } else {
    r.at("op").fail(fmt::format(
        "unknown op \"{}\" (populate, discard, munmap, mprotect, make_cow_shared, write_protect, "
        "poison, evict_from_page_cache, swap_out, zap_pfnmap, set_signal, inject_gup_result, "
        "inject_fast_miss, inject_fixup, clear_injections)", op));
  }
}

}  // namespace gfnmap::cli
