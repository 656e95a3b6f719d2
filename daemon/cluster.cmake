# The control plane (frames, authentication, cluster membership, bootstrap) as one static
# library. daemon/CMakeLists.txt includes this file; tests/cluster includes it on its own when
# the daemon is not part of the build. Log and metrics symbols come from whatever links it
# (the daemon's implementations, or the test stand-ins).
if(NOT TARGET epd_cluster)
  pkg_check_modules(EPD_CL_UV REQUIRED IMPORTED_TARGET libuv)
  pkg_check_modules(EPD_CL_CRYPTO REQUIRED IMPORTED_TARGET libcrypto)
  pkg_check_modules(EPD_CL_CJSON REQUIRED IMPORTED_TARGET libcjson)
  add_library(epd_cluster STATIC
    ${CMAKE_CURRENT_LIST_DIR}/ctl_frame.c
    ${CMAKE_CURRENT_LIST_DIR}/ctl_auth.c
    ${CMAKE_CURRENT_LIST_DIR}/cluster.c
    ${CMAKE_CURRENT_LIST_DIR}/cluster_link.c
    ${CMAKE_CURRENT_LIST_DIR}/cluster_peer.c
    ${CMAKE_CURRENT_LIST_DIR}/cluster_coord.c
    ${CMAKE_CURRENT_LIST_DIR}/cluster_boot.c)
  target_include_directories(epd_cluster PUBLIC
    ${CMAKE_CURRENT_LIST_DIR}
    ${CMAKE_CURRENT_LIST_DIR}/../config
    ${CMAKE_CURRENT_LIST_DIR}/../transport/include)
  target_link_libraries(epd_cluster PUBLIC PkgConfig::EPD_CL_UV PkgConfig::EPD_CL_CRYPTO
                        PkgConfig::EPD_CL_CJSON epd_clock Threads::Threads)
  if(TARGET epd_core)
    target_link_libraries(epd_cluster PUBLIC epd_core)
  endif()
  # The frame codec alone, for the fuzzer (built with its own sanitizer flags).
  set(EPD_CTL_FRAME_SOURCES ${CMAKE_CURRENT_LIST_DIR}/ctl_frame.c)
endif()
