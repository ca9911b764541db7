// gfnmap host interface: default notifier callbacks (aging and release are optional).
// Subscribers that track young state override them.
#include "gfnmap/host.h"

namespace gfnmap {

bool MmuNotifier::clear_flush_young(Hva, Hva) { return false; }
bool MmuNotifier::clear_young(Hva, Hva) { return false; }
bool MmuNotifier::test_young(Hva, Hva) { return false; }
void MmuNotifier::release() {}

}  // namespace gfnmap
