// gfnmap CLI `explain`: parses scenario files, runs each request through the real resolver
// entry points on the host model, checks the expectations and renders the explanation.
#include "scenario.h"

#include <fmt/format.h>

#include <algorithm>

#include "cli_input.h"
#include "host_model.h"
#include "memslot_trace.h"

namespace gfnmap::cli {

std::string_view to_string(RequestApi api) {
  switch (api) {
    case RequestApi::kFaultin: return "faultin_pfn";
    case RequestApi::kKvmFollowPfn: return "kvm_follow_pfn";
    case RequestApi::kFollowPfn: return "follow_pfn";
    case RequestApi::kGfnToPfnMemslot: return "gfn_to_pfn_memslot";
  }
  return "?";
}

std::string_view to_string(ReleaseRule rule) {
  switch (rule) {
    case ReleaseRule::kNone: return "none";
    case ReleaseRule::kUnused: return "unused";
    case ReleaseRule::kClean: return "clean";
    case ReleaseRule::kDirty: return "dirty";
    case ReleaseRule::kFaultin: return "faultin";
  }
  return "?";
}

size_t ScenarioOutcome::failed() const {
  size_t n = mismatches.size();
  for (const RequestOutcome& r : requests) n += !r.mismatches.empty();
  return n;
}

namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Parsing

constexpr std::pair<std::string_view, uint64_t> kErrorPfnNames[] = {
    {"NOSLOT", kPfnNoslot.value},         {"FAULT", kPfnErrFault.value},
    {"HWPOISON", kPfnErrHwpoison.value},  {"RO_FAULT", kPfnErrRoFault.value},
    {"SIGPENDING", kPfnErrSigpending.value}, {"NEEDS_IO", kPfnErrNeedsIo.value},
};

FollFlags parse_foll_flags(const JsonReader& r) {
  try {
    uint64_t f = parse_flag_names(r.get_string(), r.path(),
                                  {{"WRITE", kFollWrite},
                                   {"NOWAIT", kFollNowait},
                                   {"INTERRUPTIBLE", kFollInterruptible},
                                   {"GET", kFollGet},
                                   {"HWPOISON", kFollHwpoison},
                                   {"HONOR_NUMA_FAULT", kFollHonorNumaFault},
                                   {"PIN", kFollPin}},
                                  "FOLL_");
    if (f > UINT32_MAX) r.fail(fmt::format("{} does not fit 32 bits", hex(f)));
    return static_cast<FollFlags>(f);
  } catch (const BadInput& e) {
    r.fail(e.what());
  }
}

MemslotSpec parse_memslot(const JsonReader& r, const HostModel& host) {
  r.expect_object({"slot", "as", "flags", "gpa", "size", "hva", "ioctl"});
  MemslotSpec m;
  uint64_t slot = r.at("slot").get_u64();
  uint64_t as = r.opt_u64("as").value_or(0);
  if (slot > 0xffff) r.at("slot").fail("a slot id has 16 bits (use \"as\" for the address space)");
  if (as > 0xffff) r.at("as").fail("an address space id has 16 bits");
  m.region.slot = static_cast<uint32_t>(as << 16 | slot);
  if (r.has("flags")) {
    try {
      m.region.flags = parse_mem_flags(r.at("flags").get_string(), "flags");
    } catch (const BadInput& e) {
      r.at("flags").fail(e.what());
    }
  }
  m.region.guest_phys_addr = r.opt_u64("gpa").value_or(0);
  m.region.memory_size = r.at("size").get_u64();
  m.region.userspace_addr = r.has("hva") ? host.address(r.at("hva")).value : 0;
  if (auto io = r.opt_string("ioctl")) {
    if (*io == "v1") {
      m.ioctl = RegionIoctl::kV1;
    } else if (*io == "v2") {
      m.ioctl = RegionIoctl::kV2;
    } else {
      r.at("ioctl").fail("expected \"v1\" or \"v2\"");
    }
  }
  return m;
}

RequestExpect parse_expect(const JsonReader& r) {
  r.expect_object({"result", "writable", "ref", "rows", "path", "async", "is_refcounted_page",
                   "outstanding"});
  RequestExpect e;
  if (r.has("result")) {
    JsonReader res = r.at("result");
    if (res.value().is_string()) {
      std::string s = res.get_string();
      std::string_view name = s;
      if (name.starts_with("KVM_PFN_ERR_")) name.remove_prefix(12);
      if (name.starts_with("KVM_PFN_")) name.remove_prefix(8);
      bool known = name == "pfn";
      for (const auto& [n, v] : kErrorPfnNames) known = known || n == name;
      if (known) {
        e.result = std::string(name);
      } else {
        e.result = hex(res.get_u64());  // a number written as a string ("0x1234")
      }
    } else {
      e.result = hex(res.get_u64());
    }
  }
  if (r.has("writable")) {
    JsonReader w = r.at("writable");
    e.writable = w.value().is_null() ? std::optional<bool>() : std::optional<bool>(w.get_bool());
  }
  e.ref = r.opt_bool("ref");
  if (r.has("rows")) {
    JsonReader rows = r.at("rows");
    std::vector<int> v;
    for (size_t i = 0; i < rows.array_size(); ++i) {
      int64_t row = rows.index(i).get_int();
      if (row < 1 || row > 27) rows.index(i).fail("a decision-table row is 1..27");
      v.push_back(static_cast<int>(row));
    }
    e.rows = std::move(v);
  }
  if (auto p = r.opt_string("path")) {
    if (*p != "none" && *p != "fast" && *p != "slow" && *p != "remapped")
      r.at("path").fail("expected none, fast, slow or remapped");
    e.path = *p;
  }
  e.async = r.opt_bool("async");
  e.is_refcounted_page = r.opt_bool("is_refcounted_page");
  e.outstanding = r.opt_u64("outstanding");
  return e;
}

RequestSpec parse_request(const JsonReader& r, const MemslotsConfig& config, HostModel& host) {
  static constexpr std::string_view kCommon[] = {"name", "api", "gfn", "gpa", "as", "release",
                                                 "expect", "during", "host"};
  RequestSpec q;
  std::string api = r.has("api") ? r.at("api").get_string() : "faultin_pfn";
  std::vector<std::string_view> specific;
  if (api == "faultin_pfn") {
    q.api = RequestApi::kFaultin;
    specific = {"flags", "map_writable", "refcounted_page"};
  } else if (api == "kvm_follow_pfn") {
    q.api = RequestApi::kKvmFollowPfn;
    specific = {"flags", "pin", "map_writable", "refcounted_page", "allow_unsafe_mappings"};
  } else if (api == "follow_pfn") {
    q.api = RequestApi::kFollowPfn;
    specific = {"flags", "atomic", "allow_write_mapping", "guarded_by_mmu_notifier"};
  } else if (api == "gfn_to_pfn_memslot") {
    q.api = RequestApi::kGfnToPfnMemslot;
    specific = {"atomic", "interruptible", "async", "write_fault", "writable"};
  } else {
    r.at("api").fail(fmt::format("unknown api \"{}\" (faultin_pfn, kvm_follow_pfn, follow_pfn, "
                                 "gfn_to_pfn_memslot)", api));
  }
  if (!r.value().is_object()) r.fail("expected an object");
  for (const auto& [key, v] : r.value().items()) {
    bool ok = std::find(std::begin(kCommon), std::end(kCommon), key) != std::end(kCommon) ||
              std::find(specific.begin(), specific.end(), key) != specific.end();
    if (!ok) {
      std::string list;
      for (std::string_view k : specific) list += (list.empty() ? "" : ", ") + std::string(k);
      r.fail_key(key, fmt::format("unknown field \"{}\" for api {} (its fields: {}; every api: "
                                  "name, gfn|gpa, as, release, expect, during, host)",
                                  key, api, list));
    }
  }
  q.name = r.opt_string("name").value_or("");
  if (r.has("gfn") == r.has("gpa")) r.fail("give exactly one of \"gfn\" and \"gpa\"");
  q.gfn = r.has("gfn") ? Gfn(r.at("gfn").get_u64()) : gpa_to_gfn(Gpa(r.at("gpa").get_u64()));
  uint64_t as = r.opt_u64("as").value_or(0);
  if (as >= config.nr_address_spaces) {
    r.at("as").fail(fmt::format("address space {} does not exist (config.address_spaces = {})",
                                as, config.nr_address_spaces));
  }
  q.as_id = static_cast<unsigned>(as);
  if (r.has("flags")) q.flags = parse_foll_flags(r.at("flags"));

  switch (q.api) {
    case RequestApi::kFaultin:
      q.map_writable = r.opt_bool("map_writable").value_or(true);
      q.refcounted_page = r.opt_bool("refcounted_page").value_or(true);
      break;
    case RequestApi::kKvmFollowPfn:
      q.pin = r.opt_bool("pin").value_or(false);
      q.map_writable = r.opt_bool("map_writable").value_or(false);
      q.refcounted_page = r.opt_bool("refcounted_page").value_or(true);
      q.allow_unsafe_mappings = r.opt_bool("allow_unsafe_mappings").value_or(false);
      break;
    case RequestApi::kFollowPfn:
      q.atomic = r.opt_bool("atomic").value_or(false);
      q.allow_write_mapping = r.opt_bool("allow_write_mapping").value_or(false);
      q.guarded = r.opt_bool("guarded_by_mmu_notifier").value_or(false);
      break;
    case RequestApi::kGfnToPfnMemslot:
      q.atomic = r.opt_bool("atomic").value_or(false);
      q.interruptible = r.opt_bool("interruptible").value_or(false);
      q.async_ptr = r.opt_bool("async").value_or(false);
      q.write_fault = r.opt_bool("write_fault").value_or(false);
      q.writable_ptr = r.opt_bool("writable").value_or(false);
      break;
  }

  if (auto rel = r.opt_string("release")) {
    if (*rel == "none") {
      q.release = ReleaseRule::kNone;
    } else if (*rel == "unused") {
      q.release = ReleaseRule::kUnused;
    } else if (*rel == "clean") {
      q.release = ReleaseRule::kClean;
    } else if (*rel == "dirty") {
      q.release = ReleaseRule::kDirty;
    } else if (*rel == "faultin") {
      q.release = ReleaseRule::kFaultin;
    } else {
      r.at("release").fail("expected none, unused, clean, dirty or faultin");
    }
    const bool merged = q.api == RequestApi::kFaultin || q.api == RequestApi::kKvmFollowPfn;
    if (!merged && (q.release == ReleaseRule::kUnused || q.release == ReleaseRule::kFaultin)) {
      r.at("release").fail(fmt::format("\"{}\" is a release of the merged API; {} releases with "
                                       "clean or dirty (kvm_release_pfn_*)", *rel, api));
    }
    if (q.api == RequestApi::kFollowPfn && q.release != ReleaseRule::kNone &&
        !(q.flags & kFollGet)) {
      r.at("release").fail("without FOLL_GET follow_pfn keeps no reference: nothing to release");
    }
  }
  if (r.has("during")) {
    q.during = parse_memslot(r.at("during"), host).region;
    if (q.during->slot >> 16 >= config.nr_address_spaces) {
      r.at("during").fail("its address space does not exist");
    }
  }
  if (r.has("host")) {
    q.host_before = r.at("host").value();
    host.validate_changes(r.at("host"));
  }
  if (r.has("expect")) q.expect = parse_expect(r.at("expect"));
  return q;
}

}  // namespace

Scenario parse_scenario(const std::string& text, const std::string& file) {
  Scenario s;
  s.file = file;
  s.text = text;
  json doc = parse_json_text(s.text, file);
  JsonReader r(doc, "", &s.file, &s.text);
  r.expect_object({"description", "row", "config", "host", "memslots", "requests", "expect"});
  s.description = r.opt_string("description").value_or("");
  if (r.has("row")) {
    int64_t row = r.at("row").get_int();
    if (row < 1 || row > 27) r.at("row").fail("a decision-table row is 1..27");
    s.row = static_cast<int>(row);
  }
  if (r.has("config")) {
    JsonReader c = r.at("config");
    c.expect_object({"address_spaces", "slots"});
    uint64_t nas = c.opt_u64("address_spaces").value_or(1);
    if (nas < 1 || nas > 2) c.at("address_spaces").fail("1 or 2");
    uint64_t nslots = c.opt_u64("slots").value_or(kUserMemSlots);
    if (nslots < 1 || nslots > kMemSlotsNum) c.at("slots").fail(fmt::format("1..{}", kMemSlotsNum));
    s.config.nr_address_spaces = static_cast<unsigned>(nas);
    s.config.nr_user_slots = static_cast<uint32_t>(nslots);
  }
  // Built now to validate the block (with its locations) and to resolve VMA names in the
  // memslots; the model is deterministic, so the run builds the same one again.
  if (r.has("host")) s.host = r.at("host").value();
  HostModel host(JsonReader(s.host, "host", &s.file, &s.text));
  if (r.has("memslots")) {
    JsonReader ms = r.at("memslots");
    for (size_t i = 0; i < ms.array_size(); ++i) {
      s.memslots.push_back(parse_memslot(ms.index(i), host));
    }
  }
  JsonReader rq = r.at("requests");
  if (rq.array_size() == 0) rq.fail("a scenario needs at least one request");
  for (size_t i = 0; i < rq.array_size(); ++i) {
    s.requests.push_back(parse_request(rq.index(i), s.config, host));
  }
  if (r.has("expect")) {
    JsonReader e = r.at("expect");
    e.expect_object({"outstanding"});
    s.expect_outstanding = e.opt_u64("outstanding");
  }
  return s;
}

Scenario load_scenario(const std::string& path) {
  return parse_scenario(read_text_file(path), path);
}

// ---------------------------------------------------------------------------------------------
// Running

namespace {

// Runs `fn` from inside flush_shadow_memslot, i.e. after the INVALID copy was published.
class DuringListener final : public MemslotListener {
 public:
  explicit DuringListener(std::function<void()> fn) : fn_(std::move(fn)) {}
  // Runs on the writer's thread inside set_memory_region: no exception may escape into it.
  void flush_shadow_memslot(const Memslot&) override {
    if (ran_) return;
    ran_ = true;
    try {
      fn_();
    } catch (const BadInput& e) {
      error_ = e.what();
    }
  }
  bool ran() const { return ran_; }
  const std::string& error() const { return error_; }

 private:
  std::function<void()> fn_;
  bool ran_ = false;
  std::string error_;
};

std::string bool_str(bool b) { return b ? "true" : "false"; }

std::string opt_bool_str(const std::optional<bool>& b) {
  return b ? bool_str(*b) : "(not reported)";
}

std::string slot_str(const Memslot* slot) {
  if (!slot) return "NULL";
  std::string s = fmt::format("slot {}", slot->id);
  if (slot->invalid()) s += " (INVALID)";
  return s;
}

std::string hva_str(Hva hva) {
  if (hva == kHvaErrBad) return "KVM_HVA_ERR_BAD";
  if (hva == kHvaErrRoBad) return "KVM_HVA_ERR_RO_BAD";
  return hex(hva.value);
}

std::string result_str(Pfn pfn) {
  std::string s = pfn_to_string(pfn);
  return is_error_noslot_pfn(pfn) ? s : "pfn " + s;
}

bool result_matches(const std::string& expect, Pfn pfn) {
  if (expect == "pfn") return !is_error_noslot_pfn(pfn);
  for (const auto& [n, v] : kErrorPfnNames) {
    if (expect == n) return pfn.value == v;
  }
  return expect == hex(pfn.value);
}

std::string rows_str(const std::vector<int>& rows) {
  if (rows.empty()) return "(none)";
  std::string s;
  for (int r : rows) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}

void check_expect(const RequestExpect& e, RequestOutcome& o) {
  auto miss = [&](std::string_view what, const std::string& want, const std::string& got) {
    o.mismatches.push_back(fmt::format("{}: expected {}, got {}", what, want, got));
  };
  if (e.result && !result_matches(*e.result, o.pfn)) miss("result", *e.result, result_str(o.pfn));
  if (e.writable && *e.writable != o.writable) {
    miss("writable", opt_bool_str(*e.writable), opt_bool_str(o.writable));
  }
  if (e.ref && *e.ref != o.ref) miss("ref", bool_str(*e.ref), bool_str(o.ref));
  if (e.rows && *e.rows != o.trace.rows) miss("rows", rows_str(*e.rows), rows_str(o.trace.rows));
  if (e.path && *e.path != to_string(o.trace.path)) {
    miss("path", *e.path, std::string(to_string(o.trace.path)));
  }
  if (e.async && std::optional<bool>(*e.async) != o.async) {
    miss("async", bool_str(*e.async), opt_bool_str(o.async));
  }
  if (e.is_refcounted_page &&
      std::optional<bool>(*e.is_refcounted_page) != o.is_refcounted_page) {
    miss("is_refcounted_page", bool_str(*e.is_refcounted_page),
         opt_bool_str(o.is_refcounted_page));
  }
  if (e.outstanding && *e.outstanding != o.outstanding_after_release) {
    miss("outstanding", std::to_string(*e.outstanding),
         std::to_string(o.outstanding_after_release));
  }
}

// The v7 legacy wrapper's request, built as __gfn_to_pfn_memslot builds it (spec 2.1).
FollowPfn legacy_equivalent(const RequestSpec& q, const Memslot* slot) {
  FollowPfn foll;
  foll.slot = slot;
  foll.gfn = q.gfn;
  foll.flags = kFollGet | (q.write_fault ? kFollWrite : 0) | (q.async_ptr ? kFollNowait : 0) |
               (q.interruptible ? kFollInterruptible : 0);
  foll.atomic = q.atomic;
  foll.allow_write_mapping = q.writable_ptr;
  return foll;
}

// The call: one request against `slot` (already looked up, possibly NULL or INVALID). With
// `equivalent`, a legacy request runs as its follow_pfn equivalent, traced.
void call(HostModel& host, const RequestSpec& q, const Memslot* slot, bool equivalent,
          RequestOutcome& o, Page& page) {
  HostMm& mm = host.mm();
  switch (q.api) {
    case RequestApi::kFaultin: {
      bool writable = false;
      o.call = fmt::format("faultin_pfn({}, gfn {:#x}, {}, {}, {})", slot_str(slot), q.gfn.value,
                           foll_flags_to_string(q.flags), q.map_writable ? "&writable" : "NULL",
                           q.refcounted_page ? "&page" : "NULL");
      o.pfn = faultin_pfn(mm, slot, q.gfn, q.flags, q.map_writable ? &writable : nullptr,
                          q.refcounted_page ? &page : nullptr, &o.trace);
      if (q.map_writable) o.writable = writable;
      o.ref = static_cast<bool>(page);
      // faultin_pfn does not report the hva: the translation it made (spec 3.1 step 1).
      o.hva = gfn_to_hva_many(slot, q.gfn, nullptr, q.flags & kFollWrite);
      break;
    }
    case RequestApi::kKvmFollowPfn: {
      bool writable = false;
      KvmFollowPfn kfp;
      kfp.slot = slot;
      kfp.gfn = q.gfn;
      kfp.flags = q.flags;
      kfp.pin = q.pin;
      kfp.map_writable = q.map_writable ? &writable : nullptr;
      kfp.refcounted_page = q.refcounted_page ? &page : nullptr;
      FollowSemantics sem;
      sem.allow_unsafe_mappings = q.allow_unsafe_mappings;
      o.call = fmt::format("kvm_follow_pfn({{{}, gfn {:#x}, flags {}, pin {}, map_writable {}, "
                           "refcounted_page {}}}{})",
                           slot_str(slot), q.gfn.value, foll_flags_to_string(q.flags),
                           bool_str(q.pin), q.map_writable ? "&writable" : "NULL",
                           q.refcounted_page ? "&page" : "NULL",
                           q.allow_unsafe_mappings ? ", allow_unsafe_mappings" : "");
      o.pfn = kvm_follow_pfn(mm, kfp, sem, &o.trace);
      o.hva = kfp.hva;
      if (q.map_writable) o.writable = writable;
      o.ref = static_cast<bool>(page);
      break;
    }
    case RequestApi::kFollowPfn: {
      FollowPfn foll;
      foll.slot = slot;
      foll.gfn = q.gfn;
      foll.flags = q.flags;
      foll.atomic = q.atomic;
      foll.allow_write_mapping = q.allow_write_mapping;
      foll.guarded_by_mmu_notifier = q.guarded;
      o.call = fmt::format("follow_pfn({{{}, gfn {:#x}, flags {}, atomic {}, allow_write_mapping "
                           "{}, guarded_by_mmu_notifier {}}})",
                           slot_str(slot), q.gfn.value, foll_flags_to_string(q.flags),
                           bool_str(q.atomic), bool_str(q.allow_write_mapping),
                           bool_str(q.guarded));
      o.pfn = follow_pfn(mm, foll, &o.trace);
      o.hva = foll.hva;
      o.writable = foll.writable;
      o.is_refcounted_page = foll.is_refcounted_page;
      o.ref = (q.flags & kFollGet) && foll.is_refcounted_page && !is_error_noslot_pfn(o.pfn);
      break;
    }
    case RequestApi::kGfnToPfnMemslot: {
      o.call = fmt::format("gfn_to_pfn_memslot({}, gfn {:#x}, atomic {}, interruptible {}, {}, "
                           "write_fault {}, {}, &hva)",
                           slot_str(slot), q.gfn.value, bool_str(q.atomic),
                           bool_str(q.interruptible), q.async_ptr ? "&async" : "NULL",
                           bool_str(q.write_fault), q.writable_ptr ? "&writable" : "NULL");
      if (equivalent) {
        FollowPfn foll = legacy_equivalent(q, slot);
        o.pfn = follow_pfn(mm, foll, &o.trace);
        if (q.async_ptr) o.async = false;
        if (o.pfn == kPfnErrNeedsIo) {
          o.async = true;
          o.pfn = kPfnErrFault;
        }
        o.hva = foll.hva;
        if (q.writable_ptr) o.writable = foll.writable;
        break;
      }
      bool async = false;
      bool writable = false;
      Hva hva;
      o.pfn = gfn_to_pfn_memslot(mm, slot, q.gfn, q.atomic, q.interruptible,
                                 q.async_ptr ? &async : nullptr, q.write_fault,
                                 q.writable_ptr ? &writable : nullptr, &hva);
      o.hva = hva;
      if (q.async_ptr) o.async = async;
      if (q.writable_ptr) o.writable = writable;
      break;
    }
  }
}

// The release step (spec 6) by the request's rule.
void release(HostModel& host, const RequestSpec& q, RequestOutcome& o, const Page& page) {
  const bool merged = q.api == RequestApi::kFaultin || q.api == RequestApi::kKvmFollowPfn;
  switch (q.release) {
    case ReleaseRule::kNone:
      break;
    case ReleaseRule::kUnused:
      release_page_unused(page);
      o.released = "release_page_unused(page)";
      break;
    case ReleaseRule::kClean:
      if (merged) {
        release_page_clean(page);
        o.released = "release_page_clean(page)";
      } else {
        release_pfn_clean(host.mm(), o.pfn, o.hva);
        o.released = "release_pfn_clean(pfn)";
      }
      break;
    case ReleaseRule::kDirty:
      if (merged) {
        release_page_dirty(page);
        o.released = "release_page_dirty(page)";
      } else {
        release_pfn_dirty(host.mm(), o.pfn, o.hva);
        o.released = "release_pfn_dirty(pfn)";
      }
      break;
    case ReleaseRule::kFaultin: {
      bool dirty = o.writable.value_or(false);
      release_faultin_page(page, /*unused=*/false, dirty);
      o.released = fmt::format("release_faultin_page(page, unused=false, dirty={})",
                               bool_str(dirty));
      break;
    }
  }
}

// Lookup, host state before, the call, the reference checks, the release, host state after.
void resolve(HostModel& host, const RequestSpec& q, const Memslot* slot, bool equivalent,
             RequestOutcome& o) {
  HostMm& mm = host.mm();
  o.outstanding_before = mm.outstanding_refs();
  Hva hva = gfn_to_hva_memslot_prot(slot, q.gfn, nullptr);
  if (!kvm_is_error_hva(hva)) o.frame_before = host.mapped_frame(hva);

  Page page;
  call(host, q, slot, equivalent, o, page);

  o.outstanding_after_call = mm.outstanding_refs();
  if (!is_error_noslot_pfn(o.pfn)) o.frame_after_call = host.frame(o.pfn);
  const int64_t delta = static_cast<int64_t>(o.outstanding_after_call) -
                        static_cast<int64_t>(o.outstanding_before);
  if (q.api == RequestApi::kGfnToPfnMemslot) {
    // The wrapper does not say whether it kept a reference; the host's count does.
    o.ref = delta > 0;
  } else if (delta != (o.ref ? 1 : 0)) {
    o.mismatches.push_back(fmt::format(
        "invariant 2: the API hands out {} but the host's outstanding count changed by {}",
        o.ref ? "one reference" : "no reference", delta));
  }

  release(host, q, o, page);
  o.outstanding_after_release = mm.outstanding_refs();
  if (!is_error_noslot_pfn(o.pfn)) o.frame_after_release = host.frame(o.pfn);
  if (q.release != ReleaseRule::kNone && o.outstanding_after_release != o.outstanding_before) {
    o.mismatches.push_back(fmt::format(
        "invariant 2: after {} the host has {} outstanding reference(s), {} before the call",
        o.released, o.outstanding_after_release, o.outstanding_before));
  }
  if (std::string e = host.take_deferred_error(); !e.empty()) throw BadInput(e);
}

struct Pass {
  std::vector<RequestOutcome> requests;
  uint64_t outstanding_end = 0;
  uint64_t violations = 0;
  std::vector<std::string> violation_log;
};

// One run of the whole scenario on a fresh host model and memslots. With `equivalent`, legacy
// requests run as their follow_pfn equivalent (to obtain their trace); the model is
// deterministic, so both runs see the same states.
Pass run_pass(const Scenario& s, bool equivalent) {
  Pass pass;
  HostModel host(JsonReader(s.host, "host", &s.file, &s.text));
  Memslots memslots(s.config);
  for (size_t i = 0; i < s.memslots.size(); ++i) {
    const MemslotSpec& m = s.memslots[i];
    auto r = memslots.set_memory_region(m.region, m.ioctl);
    if (!r.ok()) {
      throw BadInput(fmt::format("{}: memslots[{}]: KVM_SET_USER_MEMORY_REGION fails: {}", s.file,
                                 i, error_to_string(r.error())));
    }
  }
  for (size_t i = 0; i < s.requests.size(); ++i) {
    const RequestSpec& q = s.requests[i];
    RequestOutcome o;
    if (!q.host_before.is_null()) {
      host.apply_changes(
          JsonReader(q.host_before, fmt::format("requests[{}].host", i), &s.file, &s.text));
    }
    auto lookup_and_resolve = [&] {
      auto lock = memslots.read_lock();
      const Memslot* slot = lock.set(q.as_id).gfn_to_memslot(q.gfn);
      resolve(host, q, slot, equivalent, o);
    };
    if (q.during) {
      DuringListener listener(lookup_and_resolve);
      memslots.add_listener(&listener);
      auto r = memslots.set_memory_region(*q.during);
      memslots.remove_listener(&listener);
      if (!r.ok()) {
        throw BadInput(fmt::format("{}: requests[{}].during: KVM_SET_USER_MEMORY_REGION fails: {}",
                                   s.file, i, error_to_string(r.error())));
      }
      if (!listener.ran()) {
        throw BadInput(fmt::format("{}: requests[{}].during: the change is {}, not a DELETE or "
                                   "MOVE, so no INVALID window opens",
                                   s.file, i,
                                   r.value() ? std::string(to_string(*r.value())) : "a no-op"));
      }
      if (std::string e = listener.error(); !e.empty()) throw BadInput(e);
    } else {
      lookup_and_resolve();
    }
    pass.requests.push_back(std::move(o));
  }
  pass.outstanding_end = host.mm().outstanding_refs();
  pass.violations = host.sim().violations();
  for (const SimViolation& v : host.sim().violation_log()) pass.violation_log.push_back(v.what);
  return pass;
}

}  // namespace

ScenarioOutcome run_scenario(const Scenario& s) {
  ScenarioOutcome out;
  out.scenario = &s;
  Pass main = run_pass(s, /*equivalent=*/false);
  const bool any_legacy =
      std::any_of(s.requests.begin(), s.requests.end(),
                  [](const RequestSpec& q) { return q.api == RequestApi::kGfnToPfnMemslot; });
  if (any_legacy) {
    Pass shadow = run_pass(s, /*equivalent=*/true);
    for (size_t i = 0; i < s.requests.size(); ++i) {
      if (s.requests[i].api != RequestApi::kGfnToPfnMemslot) continue;
      RequestOutcome& real = main.requests[i];
      const RequestOutcome& eq = shadow.requests[i];
      real.trace = eq.trace;
      real.trace_note = "the legacy wrapper takes no trace: steps, rows and path are those of "
                        "its follow_pfn equivalent (spec 2.1) in a second, identical run";
      if (real.pfn != eq.pfn || real.writable != eq.writable || real.async != eq.async ||
          real.hva != eq.hva || real.outstanding_after_call != eq.outstanding_after_call) {
        real.mismatches.push_back(fmt::format(
            "the legacy wrapper ({}, writable {}, async {}) differs from its follow_pfn "
            "equivalent ({}, writable {}, async {})",
            result_str(real.pfn), opt_bool_str(real.writable), opt_bool_str(real.async),
            result_str(eq.pfn), opt_bool_str(eq.writable), opt_bool_str(eq.async)));
      }
    }
  }
  for (size_t i = 0; i < s.requests.size(); ++i) check_expect(s.requests[i].expect, main.requests[i]);
  out.requests = std::move(main.requests);
  out.outstanding_end = main.outstanding_end;
  if (s.expect_outstanding && *s.expect_outstanding != out.outstanding_end) {
    out.mismatches.push_back(fmt::format("outstanding references at the end: expected {}, got {}",
                                         *s.expect_outstanding, out.outstanding_end));
  }
  if (main.violations) {
    out.mismatches.push_back(fmt::format("the host model recorded {} protocol violation(s)",
                                         main.violations));
    for (const std::string& v : main.violation_log) out.mismatches.push_back("  " + v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Rendering

namespace {

std::string frame_str(const FrameState& f) {
  std::string s = fmt::format("pfn {:#x} ({}) refcount {}, held {}", f.pfn, f.kind, f.refcount,
                              f.held);
  if (f.dirty) s += ", dirty";
  if (f.accessed) s += ", accessed";
  if (f.reserved) s += ", reserved";
  if (f.poisoned) s += ", poisoned";
  if (f.freed) s += ", freed";
  return s;
}

json frame_json(const std::optional<FrameState>& f) {
  if (!f) return nullptr;
  return {{"pfn", hex(f->pfn)},       {"kind", f->kind},         {"refcount", f->refcount},
          {"held", f->held},          {"dirty", f->dirty},       {"accessed", f->accessed},
          {"reserved", f->reserved},  {"poisoned", f->poisoned}, {"freed", f->freed}};
}

json opt_json(const std::optional<bool>& b) { return b ? json(*b) : json(nullptr); }

}  // namespace

std::string format_explain_text(const ScenarioOutcome& out) {
  const Scenario& s = *out.scenario;
  std::string t;
  t += fmt::format("== {}", s.file);
  if (s.row) t += fmt::format(" (decision-table row {})", *s.row);
  t += "\n";
  if (!s.description.empty()) t += fmt::format("   {}\n", s.description);
  if (!s.memslots.empty()) {
    t += "   memslots:\n";
    for (const MemslotSpec& m : s.memslots) {
      t += fmt::format("     slot {} as {}: gpa [{:#x}, {:#x}) -> hva {:#x}, flags {}\n",
                       m.region.slot & 0xffff, m.region.slot >> 16, m.region.guest_phys_addr,
                       m.region.guest_phys_addr + m.region.memory_size, m.region.userspace_addr,
                       mem_flags_to_string(m.region.flags));
    }
  }
  for (size_t i = 0; i < out.requests.size(); ++i) {
    const RequestOutcome& o = out.requests[i];
    const RequestSpec& q = s.requests[i];
    t += fmt::format("\n-- request {}{}\n", i + 1, q.name.empty() ? "" : ": " + q.name);
    if (q.during) {
      t += fmt::format("   during:    KVM_SET_USER_MEMORY_REGION slot {} size {:#x} (inside "
                       "flush_shadow_memslot, the old slot published INVALID)\n",
                       q.during->slot & 0xffff, q.during->memory_size);
    }
    t += fmt::format("   call:      {}\n", o.call);
    t += "   steps:\n";
    for (const std::string& step : o.trace.steps) t += fmt::format("     {}\n", step);
    if (!o.trace_note.empty()) t += fmt::format("     ({})\n", o.trace_note);
    t += fmt::format("   rows:      {}\n", rows_str(o.trace.rows));
    t += fmt::format("   path:      {}\n", to_string(o.trace.path));
    t += fmt::format("   result:    {}\n", result_str(o.pfn));
    t += fmt::format("   hva:       {}\n", hva_str(o.hva));
    t += fmt::format("   writable:  {}\n", opt_bool_str(o.writable));
    if (o.is_refcounted_page) {
      t += fmt::format("   is_refcounted_page: {}\n", bool_str(*o.is_refcounted_page));
    }
    if (o.async) t += fmt::format("   async:     {}\n", bool_str(*o.async));
    t += fmt::format("   ref:       {}\n", o.ref ? "held by the caller" : "none");
    t += fmt::format("   host refs: {} before, {} after the call", o.outstanding_before,
                     o.outstanding_after_call);
    if (!o.released.empty()) {
      t += fmt::format(", {} after {}", o.outstanding_after_release, o.released);
    }
    t += "\n";
    if (o.frame_before) {
      t += fmt::format("   before:    hva maps {}\n", frame_str(*o.frame_before));
    }
    if (o.frame_after_call) t += fmt::format("   after:     {}\n", frame_str(*o.frame_after_call));
    if (o.frame_after_release && !o.released.empty()) {
      t += fmt::format("   released:  {}\n", frame_str(*o.frame_after_release));
    }
    if (o.mismatches.empty()) {
      t += "   check:     ok\n";
    } else {
      for (const std::string& m : o.mismatches) t += fmt::format("   MISMATCH:  {}\n", m);
    }
  }
  t += fmt::format("\n   outstanding references at the end: {}\n", out.outstanding_end);
  for (const std::string& m : out.mismatches) t += fmt::format("   MISMATCH:  {}\n", m);
  t += fmt::format("   {}\n", out.failed() ? "FAIL" : "PASS");
  return t;
}

json explain_to_json(const ScenarioOutcome& out) {
  const Scenario& s = *out.scenario;
  json j;
  j["file"] = s.file;
  j["description"] = s.description;
  j["row"] = s.row ? json(*s.row) : json(nullptr);
  json reqs = json::array();
  for (size_t i = 0; i < out.requests.size(); ++i) {
    const RequestOutcome& o = out.requests[i];
    const RequestSpec& q = s.requests[i];
    json r;
    r["name"] = q.name;
    r["api"] = to_string(q.api);
    r["as"] = q.as_id;
    r["gfn"] = hex(q.gfn.value);
    r["call"] = o.call;
    r["steps"] = o.trace.steps;
    if (!o.trace_note.empty()) r["trace_note"] = o.trace_note;
    r["rows"] = o.trace.rows;
    r["path"] = to_string(o.trace.path);
    r["result"] = is_error_noslot_pfn(o.pfn) ? pfn_to_string(o.pfn) : "pfn";
    r["pfn"] = hex(o.pfn.value);
    r["hva"] = hva_str(o.hva);
    r["writable"] = opt_json(o.writable);
    r["ref"] = o.ref;
    r["async"] = opt_json(o.async);
    r["is_refcounted_page"] = opt_json(o.is_refcounted_page);
    r["outstanding"] = {{"before", o.outstanding_before},
                        {"after_call", o.outstanding_after_call},
                        {"after_release", o.outstanding_after_release}};
    r["release"] = o.released.empty() ? json(nullptr) : json(o.released);
    r["frame"] = {{"before", frame_json(o.frame_before)},
                  {"after_call", frame_json(o.frame_after_call)},
                  {"after_release", frame_json(o.frame_after_release)}};
    r["mismatches"] = o.mismatches;
    r["pass"] = o.mismatches.empty();
    reqs.push_back(std::move(r));
  }
  j["requests"] = std::move(reqs);
  j["outstanding_end"] = out.outstanding_end;
  j["mismatches"] = out.mismatches;
  j["pass"] = out.failed() == 0;
  return j;
}

}  // namespace gfnmap::cli
