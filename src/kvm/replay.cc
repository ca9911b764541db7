// gfnmap kvm: `replay --kvm` as a library function: one memslot trace applied to gfnmap's
// Memslots (configured like this kernel) and to a fresh real VM, results side by side.
#include <cerrno>
#include <string>

#include "gfnmap/kvm.h"

namespace gfnmap::kvm {

Result<std::unique_ptr<KernelMemslotPeer>> KernelMemslotPeer::create() {
  auto sys = System::open();
  if (!sys) return sys.error();
  std::unique_ptr<KernelMemslotPeer> peer(new KernelMemslotPeer());
  peer->sys_ = std::make_unique<System>(std::move(*sys));
  auto vm = Vm::create(*peer->sys_);
  if (!vm) return vm.error();
  peer->vm_ = std::move(*vm);
  peer->config_ = peer->sys_->memslots_config();
  return peer;
}

int KernelMemslotPeer::apply(const UserspaceMemoryRegion& region, RegionIoctl ioctl) {
  return vm_->set_user_memory_region(region, ioctl);
}

Result<ReplayReport> replay_against_kernel(std::span<const ReplayOp> trace) {
  auto peer = KernelMemslotPeer::create();
  if (!peer) return peer.error();
  Memslots slots((*peer)->memslots_config());
  ReplayReport report;
  report.ops.reserve(trace.size());
  for (const ReplayOp& op : trace) {
    ReplayOpResult r;
    auto g = slots.set_memory_region(op.region, op.ioctl);
    if (g.ok()) {
      r.gfnmap_message = g->has_value() ? std::string(to_string(**g)) : "no-op";
    } else {
      r.gfnmap_errno = g.error().code;
      r.gfnmap_message = g.error().message;
    }
    r.kernel_errno = (*peer)->apply(op.region, op.ioctl);
    if (!r.agree()) ++report.disagreements;
    report.ops.push_back(std::move(r));
  }
  return report;
}

}  // namespace gfnmap::kvm
