// gfnmap CLI verb `replay`: applies a memslot operation trace (KVM_SET_USER_MEMORY_REGION per
// line) to gfnmap's Memslots, and with --kvm also to a real VM, and prints each result, whether
// the two agree, and the final slot table (docs/replay.md).
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "cli_input.h"
#include "gfnmap/kvm.h"
#include "memslot_trace.h"
#include "verb.h"

namespace gfnmap::cli {
namespace {

constexpr const char* kReplayFooter = R"(Trace format (one KVM_SET_USER_MEMORY_REGION per line, '#' starts a comment):
  slot=ID [as=AS] [flags=LOG_DIRTY_PAGES|READONLY|GUEST_MEMFD|0xN] [gpa=N] size=N [hva=N]
  [gmem_fd=N] [gmem_offset=N] [ioctl=v1|v2] [expect=OK|NOOP|CREATE|DELETE|MOVE|FLAGS_ONLY|EINVAL|EEXIST|...]
Numbers: decimal or 0x-hex, optional K/M/G/T suffix. size=0 deletes. Omitted gpa/hva/flags
are 0, as is 0; without as=, slot= is KVM's raw field (address space in bits 16..31).
Example:
  slot=0 flags=LOG_DIRTY_PAGES gpa=0 size=2M hva=0x7f0000000000 expect=CREATE
With --kvm every operation also goes to a fresh VM on /dev/kvm (gfnmap is then configured like
that kernel) and both results are printed; a valid slot larger than --kvm-max-slot is refused
before anything is applied (the kernel allocates per-page metadata for every valid slot).
Exit status: 0 done, 1 an expect= did not hold or gfnmap and the kernel disagreed,
2 bad usage or input (or /dev/kvm unusable with --kvm).
Full reference: docs/replay.md; examples: scenarios/traces/.)";

struct ReplayOptions {
  std::string trace;
  bool json = false;
  unsigned address_spaces = 1;
  uint32_t slots = kUserMemSlots;
  bool kvm = false;
  std::string kvm_max_slot_text = "1G";
};

// With --kvm the kernel allocates metadata for every page of every valid slot. A trace is
// refused when one operation could make it accept a slot larger than `limit`, or when all the
// sizes it could accept add up to more than kKvmTotalSlots limits (sizes above
// KVM_MEM_MAX_NR_PAGES pages are rejected by the kernel itself, so they never count).
constexpr uint64_t kKvmTotalSlots = 64;
const TraceOp* too_large_for_kernel(const std::vector<TraceOp>& ops, uint64_t limit,
                                    bool* total) {
  uint64_t sum = 0;
  for (const TraceOp& op : ops) {
    const uint64_t size = op.region.memory_size;
    if ((size >> kPageShift) > kMemMaxNrPages) continue;
    *total = false;
    if (size > limit) return &op;
    sum += size;
    *total = true;
    if (sum / kKvmTotalSlots > limit) return &op;
  }
  return nullptr;
}

int run_replay(const ReplayOptions& opt) {
  MemslotsConfig config;
  config.nr_address_spaces = opt.address_spaces;
  config.nr_user_slots = opt.slots;
  ReplayReport report;
  std::vector<TraceOp> ops;
  uint64_t kvm_max_slot = 0;
  try {
    kvm_max_slot = parse_u64(opt.kvm_max_slot_text, "--kvm-max-slot");
    std::string text = read_text_file(opt.trace);
    ops = parse_memslot_trace(text, opt.trace);
  } catch (const BadInput& e) {
    std::fprintf(stderr, "gfnmap replay: %s\n", e.what());
    return 2;
  }
  if (!opt.kvm) {
    report = run_memslot_trace(ops, config, opt.trace);
  } else {
    bool total = false;
    if (const TraceOp* big = too_large_for_kernel(ops, kvm_max_slot, &total)) {
      std::fprintf(stderr,
                   "gfnmap replay: %s:%zu: %s %s: the kernel would allocate shadow-MMU "
                   "metadata for every page of it; raise --kvm-max-slot if that is intended\n",
                   opt.trace.c_str(), big->line,
                   total ? fmt::format("the slot sizes up to here add up to more than {} x "
                                       "--kvm-max-slot", kKvmTotalSlots).c_str()
                         : fmt::format("a slot of {:#x} bytes is larger than --kvm-max-slot",
                                       big->region.memory_size).c_str(),
                   opt.kvm_max_slot_text.c_str());
      return 2;
    }
    auto peer = kvm::KernelMemslotPeer::create();
    if (!peer) {
      std::fprintf(stderr, "gfnmap replay --kvm: %s\n", error_to_string(peer.error()).c_str());
      return 2;
    }
    kvm::KernelMemslotPeer& vm = **peer;
    PeerApply apply = [&vm](const UserspaceMemoryRegion& region, RegionIoctl ioctl) {
      OpOutcome out;
      out.err = vm.apply(region, ioctl);
      out.kind_known = false;  // the kernel reports success without the change kind
      return out;
    };
    report = run_memslot_trace(ops, vm.memslots_config(), opt.trace, apply, "kvm");
  }
  if (opt.json) {
    std::printf("%s\n", replay_to_json(report).dump(2).c_str());
  } else {
    std::fputs(format_replay_text(report).c_str(), stdout);
  }
  return report.expect_failures || report.disagreements ? 1 : 0;
}

GFNMAP_VERB("replay", "apply a memslot operation trace and print each result and the final slots",
            [](CLI::App& cmd) -> std::function<int()> {
              auto opt = std::make_shared<ReplayOptions>();
              cmd.footer(kReplayFooter);
              cmd.add_option("TRACE", opt->trace, "memslot operation trace file")
                  ->required();
              cmd.add_flag("--json", opt->json, "print one JSON object instead of text");
              cmd.add_option("--address-spaces", opt->address_spaces,
                             "number of address spaces, 1 or 2 (default 1, as on x86 without SMM)")
                  ->check(CLI::Range(1u, 2u));
              cmd.add_option("--slots", opt->slots,
                             "user slots per address space (KVM_USER_MEM_SLOTS; default 32764, "
                             "as KVM_CAP_NR_MEMSLOTS reports here)")
                  ->check(CLI::Range(1u, static_cast<unsigned>(kMemSlotsNum)));
              auto* kvm = cmd.add_flag("--kvm", opt->kvm,
                                       "also apply every operation to a fresh VM on /dev/kvm "
                                       "and compare (gfnmap is configured like that kernel)");
              kvm->excludes("--address-spaces")->excludes("--slots");
              cmd.add_option("--kvm-max-slot", opt->kvm_max_slot_text,
                     "with --kvm: refuse a trace whose valid slots exceed this size (default "
                     "1G; the shadow MMU allocates metadata per page of every valid slot)")
                  ->needs(kvm);
              return [opt] { return run_replay(*opt); };
            });

}  // namespace
}  // namespace gfnmap::cli
