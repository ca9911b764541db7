// gfnmap kvm: the kernel side of memslot conformance (`replay --kvm`, tests/kvm): a fresh VM
// that takes memslot operations one at a time and answers with the raw errno.
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

}  // namespace gfnmap::kvm
