# Install rules: headers, the static library, a CMake package (gfnmap::gfnmap) and pkg-config.
# Consumers use find_package(gfnmap CONFIG) or `pkg-config --cflags --libs gfnmap`.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/gfnmap DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
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
file(WRITE ${PROJECT_BINARY_DIR}/gfnmap.pc
  "prefix=${CMAKE_INSTALL_PREFIX}\nlibdir=\${prefix}/${CMAKE_INSTALL_LIBDIR}\nincludedir=\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}\n\nName: gfnmap\nDescription: KVM's guest-memory fault-in path in user space\nVersion: ${PROJECT_VERSION}\nCflags: -I\${includedir} -std=c++20\nLibs: -L\${libdir} -lgfnmap -pthread\n")
install(FILES ${PROJECT_BINARY_DIR}/gfnmap.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
