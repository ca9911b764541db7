// kvm suite helpers: skip when /dev/kvm is absent, small RAII mappings.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "gfnmap/kvm.h"

#define GFNMAP_REQUIRE_KVM()                                     \
  do {                                                           \
    std::string why_;                                            \
    if (!::gfnmap::kvm::kvm_available(&why_)) GTEST_SKIP() << why_; \
  } while (0)
