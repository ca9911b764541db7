# gfnmap install test (cmake -P): install, relocate, consume from C (pkg-config) and C++
# (find_package), run both, and scan the installed files for paths of the source or build tree.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  set(run_out "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK}/staged)
file(RENAME ${WORK}/staged ${WORK}/moved)  # relocated: nothing may depend on the first prefix
set(prefix ${WORK}/moved)

# Nothing installed names the source tree, the build tree or the prefix it was installed to.
file(GLOB_RECURSE installed ${prefix}/*)
foreach(f ${installed})
  file(READ ${f} magic LIMIT 4 HEX)
  if(magic STREQUAL "7f454c46" OR magic STREQUAL "213c6172")  # ELF, ar: debug info names the build
    continue()
  endif()
  file(READ ${f} text)
  foreach(bad ${SOURCE_DIR} ${BUILD_DIR} ${WORK}/staged)
    string(FIND "${text}" "${bad}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "${f} names ${bad}")
    endif()
  endforeach()
endforeach()

# C, through pkg-config.
file(GLOB_RECURSE pcs ${prefix}/*/gfnmap.pc)
list(LENGTH pcs n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one gfnmap.pc under ${prefix}, found: ${pcs}")
endif()
get_filename_component(pcdir ${pcs} DIRECTORY)
set(ENV{PKG_CONFIG_PATH} ${pcdir})
run(pkg-config --cflags --libs gfnmap)
string(STRIP "${run_out}" flags)
separate_arguments(flags UNIX_COMMAND "${flags}")
run(${CC} -std=c11 -Wall -Wextra -Werror -pedantic ${SOURCE_DIR}/examples/hello_vm.c ${flags}
    -o ${WORK}/hello_c)
run(${WORK}/hello_c)
message(STATUS "C program via pkg-config:\n${run_out}")

# C++, through find_package(gfnmap).
file(MAKE_DIRECTORY ${WORK}/cxx)
file(WRITE ${WORK}/cxx/CMakeLists.txt [=[
cmake_minimum_required(VERSION 3.25)
project(consumer CXX)
find_package(gfnmap CONFIG REQUIRED)
add_executable(consumer main.cc)
target_link_libraries(consumer PRIVATE gfnmap::gfnmap)
]=])
file(WRITE ${WORK}/cxx/main.cc [=[
#include "gfnmap/vm.h"
#include "gfnmap/version.h"
int main() {
  auto vm = gfnmap::Vm::create({.host = gfnmap::HostKind::kModel});
  if (!vm) return 2;
  auto ram = (*vm)->create_memory(gfnmap::Backing::kAnonymous, 1 << 20);
  if (!ram || !(*vm)->set_user_memory_region({.slot = 0, .guest_phys_addr = 0,
                                               .memory_size = 1 << 20,
                                               .userspace_addr = ram->value})) return 3;
  auto vcpu = (*vm)->create_vcpu(0);
  uint64_t v = 0;
  if (!vcpu || !(*vcpu)->write_u64(gfnmap::Gpa(8), 7).ok() ||
      !(*vcpu)->read_u64(gfnmap::Gpa(8), &v).ok()) return 4;
  return v == 7 && GFNMAP_VERSION_MAJOR >= 0 ? 0 : 5;
}
]=])
run(${CMAKE_COMMAND} -S ${WORK}/cxx -B ${WORK}/cxx/build -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${WORK}/cxx/build)
run(${WORK}/cxx/build/consumer)
message(STATUS "C++ program via find_package: ok")
file(REMOVE_RECURSE ${WORK})
