# Install rules: headers, the static library, a CMake package (gfnmap::gfnmap) and pkg-config.
# Consumers use find_package(gfnmap CONFIG) or `pkg-config --cflags --libs gfnmap`.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/gfnmap DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_BINARY_DIR}/include/gfnmap/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/gfnmap)
install(TARGETS gfnmap EXPORT gfnmapTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT gfnmapTargets NAMESPACE gfnmap:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/gfnmap)
file(WRITE ${PROJECT_BINARY_DIR}/gfnmapConfig.cmake.in
  "@PACKAGE_INIT@\ninclude(CMakeFindDependencyMacro)\nfind_dependency(Threads)\ninclude(\"\${CMAKE_CURRENT_LIST_DIR}/gfnmapTargets.cmake\")\n")
configure_package_config_file(${PROJECT_BINARY_DIR}/gfnmapConfig.cmake.in
  ${PROJECT_BINARY_DIR}/gfnmapConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/gfnmap)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/gfnmapConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/gfnmapConfig.cmake ${PROJECT_BINARY_DIR}/gfnmapConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/gfnmap)
# Relocatable: the prefix is found from the .pc file's own place (${pcfiledir}), so a tree
# installed with any --prefix, or moved, still resolves. C++ consumers add -std=c++20; C ones
# use gfnmap/gfnmap.h (Libs links the C++ runtime the library needs).
file(RELATIVE_PATH gfnmap_pc_up /p/${CMAKE_INSTALL_LIBDIR}/pkgconfig /p)
file(WRITE ${PROJECT_BINARY_DIR}/gfnmap.pc
  "prefix=\${pcfiledir}/${gfnmap_pc_up}\nlibdir=\${prefix}/${CMAKE_INSTALL_LIBDIR}\nincludedir=\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}\n\nName: gfnmap\nDescription: KVM's guest-memory fault-in path in user space\nVersion: ${PROJECT_VERSION}\nCflags: -I\${includedir}\nLibs: -L\${libdir} -lgfnmap -lstdc++ -lm -pthread\n")
install(FILES ${PROJECT_BINARY_DIR}/gfnmap.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
