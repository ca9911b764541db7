// gfnmap CLI verb `info`: what this build of gfnmap supports on this machine.
// Prints the library version and which hosts (model, real memory, /dev/kvm) are usable.
#include <unistd.h>

#include <cstdio>

#include "verb.h"

namespace {
GFNMAP_VERB("info", "print the build and which hosts this machine offers",
            [](CLI::App&) -> std::function<int()> {
              return [] {
                std::printf("gfnmap 0.1.0\n");
                std::printf("host model:   yes\n");
                std::printf("real memory:  yes\n");
                std::printf("/dev/kvm:     %s\n", access("/dev/kvm", R_OK | W_OK) == 0 ? "yes" : "no");
                std::printf("userfaultfd:  %s\n",
                            access("/dev/userfaultfd", R_OK | W_OK) == 0 ? "yes (/dev/userfaultfd)"
                                                                        : "syscall only");
                return 0;
              };
            });
}  // namespace
