// gfnmap CLI `replay`: parses memslot traces, applies them to Memslots (and optionally to a
// peer such as a real VM), and reports each operation's result and the final slot table.
#include "memslot_trace.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "cli_input.h"

namespace gfnmap::cli {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

constexpr std::string_view kExpectNames[] = {"OK", "NOOP", "CREATE", "DELETE", "MOVE",
                                             "FLAGS_ONLY"};

bool valid_expect(std::string_view e) {
  if (std::find(std::begin(kExpectNames), std::end(kExpectNames), e) != std::end(kExpectNames))
    return true;
  // An errno name: E followed by capitals/digits (checked against errno_name when compared).
  if (e.size() < 2 || e[0] != 'E') return false;
  return std::all_of(e.begin() + 1, e.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  });
}

std::string change_name(const std::optional<MemslotChange>& change) {
  return change ? std::string(to_string(*change)) : "NOOP";
}

bool expect_holds(std::string_view expect, const OpOutcome& out) {
  if (expect == "OK") return out.err == 0;
  if (out.err != 0) return expect == errno_name(out.err);
  return expect == change_name(out.change);
}

OpOutcome apply(Memslots& slots, const TraceOp& op) {
  OpOutcome out;
  auto r = slots.set_memory_region(op.region, op.ioctl);
  if (r.ok()) {
    out.change = r.value();
  } else {
    out.err = r.error().code;
    out.message = r.error().message;
  }
  return out;
}

}  // namespace

std::string mem_flags_to_string(uint32_t flags) {
  static constexpr std::pair<uint32_t, std::string_view> kNames[] = {
      {kMemLogDirtyPages, "LOG_DIRTY_PAGES"},
      {kMemReadonly, "READONLY"},
      {kMemGuestMemfd, "GUEST_MEMFD"},
      {kMemslotInvalid, "INVALID"},
  };
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if (!(flags & bit)) continue;
    if (!out.empty()) out += '|';
    out += name;
    flags &= ~bit;
  }
  if (flags) out += (out.empty() ? "" : "|") + hex(flags);
  return out.empty() ? "0" : out;
}

uint32_t parse_mem_flags(std::string_view text, std::string_view what) {
  uint64_t flags = parse_flag_names(text, what,
                                    {{"LOG_DIRTY_PAGES", kMemLogDirtyPages},
                                     {"READONLY", kMemReadonly},
                                     {"GUEST_MEMFD", kMemGuestMemfd}},
                                    "KVM_MEM_");
  if (flags > UINT32_MAX) throw BadInput(fmt::format("{}: {} does not fit 32 bits", what, hex(flags)));
  return static_cast<uint32_t>(flags);
}

std::string OpOutcome::summary() const {
  if (err) return std::string(errno_name(err));
  if (!kind_known) return "OK";
  return "OK " + change_name(change);
}

std::vector<TraceOp> parse_memslot_trace(std::string_view text, const std::string& file) {
  std::vector<TraceOp> ops;
  size_t line_no = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? nl : nl - pos);
    pos = nl == std::string_view::npos ? text.size() + 1 : nl + 1;
    ++line_no;
    if (auto hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    line = trim(line);
    if (line.empty()) continue;

    auto fail = [&](const std::string& msg) -> BadInput {
      return BadInput(fmt::format("{}:{}: {}", file, line_no, msg));
    };
    TraceOp op;
    op.line = line_no;
    op.text = std::string(line);
    std::optional<uint64_t> slot, as;
    bool seen_size = false;
    std::vector<std::string_view> seen;
    std::string_view rest = line;
    while (!rest.empty()) {
      size_t end = 0;
      while (end < rest.size() && !std::isspace(static_cast<unsigned char>(rest[end]))) ++end;
      std::string_view tok = rest.substr(0, end);
      rest = trim(rest.substr(end));
      size_t eq = tok.find('=');
      if (eq == std::string_view::npos || eq == 0) {
        throw fail(fmt::format("expected key=value, got \"{}\" (keys: slot, as, flags, gpa, "
                               "size, hva, ioctl, expect)", tok));
      }
      std::string_view key = tok.substr(0, eq);
      std::string_view val = tok.substr(eq + 1);
      if (std::find(seen.begin(), seen.end(), key) != seen.end())
        throw fail(fmt::format("{}= given twice", key));
      seen.push_back(key);
      try {
        std::string what = std::string(key);
        if (key == "slot") {
          slot = parse_u64(val, what);
        } else if (key == "as") {
          as = parse_u64(val, what);
        } else if (key == "flags") {
          op.region.flags = parse_mem_flags(val, what);
        } else if (key == "gpa") {
          op.region.guest_phys_addr = parse_u64(val, what);
        } else if (key == "size") {
          op.region.memory_size = parse_u64(val, what);
          seen_size = true;
        } else if (key == "hva") {
          op.region.userspace_addr = parse_u64(val, what);
        } else if (key == "gmem_fd") {
          uint64_t fd = parse_u64(val, what);
          if (fd > UINT32_MAX) throw BadInput(fmt::format("gmem_fd: {} does not fit 32 bits", fd));
          op.region.guest_memfd = static_cast<uint32_t>(fd);
        } else if (key == "gmem_offset") {
          op.region.guest_memfd_offset = parse_u64(val, what);
        } else if (key == "ioctl") {
          if (val == "v1" || val == "1") {
            op.ioctl = RegionIoctl::kV1;
          } else if (val == "v2" || val == "2") {
            op.ioctl = RegionIoctl::kV2;
          } else {
            throw BadInput(fmt::format("ioctl: \"{}\" is neither v1 nor v2", val));
          }
        } else if (key == "expect") {
          if (!valid_expect(val)) {
            throw BadInput(fmt::format("expect: \"{}\" is not OK, NOOP, CREATE, DELETE, MOVE, "
                                       "FLAGS_ONLY or an errno name like EINVAL", val));
          }
          op.expect = std::string(val);
        } else {
          throw BadInput(fmt::format("unknown key \"{}\" (keys: slot, as, flags, gpa, size, hva, "
                                     "gmem_fd, gmem_offset, ioctl, expect)", key));
        }
      } catch (const BadInput& e) {
        throw fail(e.what());
      }
    }
    if (!slot) throw fail("missing slot=");
    if (!seen_size) throw fail("missing size= (size=0 deletes the slot)");
    if (as) {
      if (*slot > 0xffff) throw fail(fmt::format("slot: {} is not a 16-bit id (with as= given)", *slot));
      if (*as > 0xffff) throw fail(fmt::format("as: {} does not fit 16 bits", *as));
      op.region.slot = static_cast<uint32_t>(*as << 16 | *slot);
    } else {
      if (*slot > UINT32_MAX) throw fail(fmt::format("slot: {} does not fit 32 bits", *slot));
      op.region.slot = static_cast<uint32_t>(*slot);
    }
    ops.push_back(std::move(op));
  }
  return ops;
}

ReplayReport run_memslot_trace(const std::vector<TraceOp>& ops, const MemslotsConfig& config,
                               const std::string& file, const PeerApply& peer,
                               const std::string& peer_name) {
  ReplayReport report;
  report.file = file;
  report.config = config;
  report.peer_name = peer ? peer_name : std::string();
  Memslots slots(config);
  for (const TraceOp& op : ops) {
    OpReport r;
    r.op = &op;
    r.gfnmap = apply(slots, op);
    if (op.expect) r.expect_met = expect_holds(*op.expect, r.gfnmap);
    if (peer) {
      r.peer = peer(op.region, op.ioctl);
      r.peer_agrees = r.peer->err == r.gfnmap.err;
    }
    report.expect_failures += !r.expect_met;
    report.disagreements += !r.peer_agrees;
    report.ops.push_back(std::move(r));
  }
  auto lock = slots.read_lock();
  for (unsigned as = 0; as < config.nr_address_spaces; ++as) {
    const MemslotSet& set = lock.set(as);
    report.generations.push_back(set.generation());
    for (const Memslot& s : set.slots()) report.final_slots.push_back(s);
  }
  return report;
}

std::string format_replay_text(const ReplayReport& report) {
  std::string out;
  out += fmt::format("replay {}: {} operation{}, {} address space{}, {} user slots\n", report.file,
                     report.ops.size(), report.ops.size() == 1 ? "" : "s",
                     report.config.nr_address_spaces,
                     report.config.nr_address_spaces == 1 ? "" : "s", report.config.nr_user_slots);
  size_t width = 0;
  for (const OpReport& r : report.ops) width = std::max(width, r.op->text.size());
  width = std::min<size_t>(width, 90);
  for (const OpReport& r : report.ops) {
    std::string result = r.gfnmap.summary();
    if (r.gfnmap.err) result += ": " + r.gfnmap.message;
    out += fmt::format("{:>5}  {:<{}}  -> {}", r.op->line, r.op->text, width, result);
    if (r.op->expect && !r.expect_met) {
      out += fmt::format("   MISMATCH: expected {}", *r.op->expect);
    }
    out += '\n';
    if (r.peer) {
      out += fmt::format("{:>5}  {:<{}}     {}: {}  {}\n", "", "", width, report.peer_name,
                         r.peer->summary(), r.peer_agrees ? "(agrees)" : "DISAGREES");
    }
  }
  out += "final slot table:\n";
  if (report.final_slots.empty()) {
    out += "  (no slots)\n";
  } else {
    auto range = [](const Memslot& s) {
      return fmt::format("[{:#x}, {:#x})", gfn_to_gpa(s.base_gfn).value,
                         gfn_to_gpa(s.end_gfn()).value);
    };
    size_t flags_w = 5;
    size_t range_w = 9;
    for (const Memslot& s : report.final_slots) {
      flags_w = std::max(flags_w, mem_flags_to_string(s.flags).size());
      range_w = std::max(range_w, range(s).size());
    }
    out += fmt::format("  {:>2}  {:>5}  {:<{}}  {:<{}}  {:>10}  {}\n", "as", "slot", "flags",
                       flags_w, "gpa range", range_w, "pages", "hva");
    for (const Memslot& s : report.final_slots) {
      out += fmt::format("  {:>2}  {:>5}  {:<{}}  {:<{}}  {:>10}  {:#x}\n", s.as_id, s.id,
                         mem_flags_to_string(s.flags), flags_w, range(s), range_w, s.npages,
                         s.userspace_addr.value);
    }
  }
  out += "generations:";
  for (size_t as = 0; as < report.generations.size(); ++as)
    out += fmt::format(" as{}={}", as, report.generations[as]);
  out += '\n';
  if (report.expect_failures) {
    out += fmt::format("{} expectation{} not met\n", report.expect_failures,
                       report.expect_failures == 1 ? "" : "s");
  }
  if (!report.peer_name.empty()) {
    out += fmt::format("{}: {} disagreement{}\n", report.peer_name, report.disagreements,
                       report.disagreements == 1 ? "" : "s");
  }
  return out;
}

nlohmann::json replay_to_json(const ReplayReport& report) {
  using nlohmann::json;
  auto outcome_json = [](const OpOutcome& o) {
    json j;
    j["ok"] = o.err == 0;
    j["errno"] = o.err ? json(std::string(errno_name(o.err))) : json(nullptr);
    j["message"] = o.err ? json(o.message) : json(nullptr);
    j["change"] = o.err || !o.kind_known ? json(nullptr) : json(change_name(o.change));
    j["summary"] = o.summary();
    return j;
  };
  json j;
  j["trace"] = report.file;
  j["config"] = {{"address_spaces", report.config.nr_address_spaces},
                 {"user_slots", report.config.nr_user_slots}};
  json ops = json::array();
  for (const OpReport& r : report.ops) {
    const TraceOp& op = *r.op;
    json o;
    o["line"] = op.line;
    o["text"] = op.text;
    o["region"] = {{"slot", op.region.slot},
                   {"id", op.region.slot & 0xffff},
                   {"as", op.region.slot >> 16},
                   {"flags", mem_flags_to_string(op.region.flags)},
                   {"gpa", hex(op.region.guest_phys_addr)},
                   {"size", hex(op.region.memory_size)},
                   {"hva", hex(op.region.userspace_addr)}};
    o["ioctl"] = op.ioctl == RegionIoctl::kV1 ? "v1" : "v2";
    o["result"] = outcome_json(r.gfnmap);
    o["expect"] = op.expect ? json(*op.expect) : json(nullptr);
    o["expect_met"] = r.expect_met;
    if (r.peer) {
      o["peer"] = outcome_json(*r.peer);
      o["agrees"] = r.peer_agrees;
    }
    ops.push_back(std::move(o));
  }
  j["operations"] = std::move(ops);
  json slots = json::array();
  for (const Memslot& s : report.final_slots) {
    slots.push_back({{"as", s.as_id},
                     {"slot", s.id},
                     {"flags", mem_flags_to_string(s.flags)},
                     {"gpa", hex(gfn_to_gpa(s.base_gfn).value)},
                     {"gpa_end", hex(gfn_to_gpa(s.end_gfn()).value)},
                     {"npages", s.npages},
                     {"hva", hex(s.userspace_addr.value)}});
  }
  j["slots"] = std::move(slots);
  j["generations"] = report.generations;
  j["expect_failures"] = report.expect_failures;
  if (!report.peer_name.empty()) {
    j["peer"] = report.peer_name;
    j["disagreements"] = report.disagreements;
  }
  return j;
}

}  // namespace gfnmap::cli
