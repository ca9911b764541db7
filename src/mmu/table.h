// gfnmap MMU, internal: the table layout and walk live in gfnmap/mmu.h (namespace detail) so
// the vCPU's table-hit path can be inlined into callers; this header is what src/mmu includes.
#pragma once

#include "gfnmap/mmu.h"
