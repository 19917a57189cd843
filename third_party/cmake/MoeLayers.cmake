# One static library per layer of docs/design.md, linked only downward.
#
#   moe_add_layer(<target> DIR <folder> [DEPS <targets>...] [LIBS <external>...]
#                 [SOURCES <extra sources>...] [CUDA_SOURCES <.cu files>...])
#
# Sources are the folder's *.cc files (not its subfolders, which are their own
# layers or optional backends). Before the library compiles, its files (and
# those of its cpu/ and cuda/ backend subfolders) are checked
# (check_layer_includes.cmake): an #include "<layer>/..." must name the layer
# itself or one of its DEPS (transitively), and <mpi.h>, <nccl.h>, <cuda*.h>,
# <cublas*.h> and <cblas.h> may appear only in the layer that owns them. A
# violation fails the build, naming the file, the include and the rule.

set(MOE_LAYER_CHECK_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/check_layer_includes.cmake)

function(moe_add_layer target)
  cmake_parse_arguments(L "" "DIR" "DEPS;LIBS;SOURCES;CUDA_SOURCES" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${L_DIR}/*.cc)
  list(APPEND srcs ${L_SOURCES})
  if(MOE_CUDA_ENABLED)
    list(APPEND srcs ${L_CUDA_SOURCES})
  endif()
  if(srcs)
    set(scope PUBLIC)
    add_library(${target} STATIC ${srcs})
  else()  # a layer with headers only so far
    set(scope INTERFACE)
    add_library(${target} INTERFACE)
  endif()
  target_include_directories(${target} ${scope} ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  target_link_libraries(${target} ${scope} ${L_DEPS} ${L_LIBS})
  if(MOE_CUDA_ENABLED)
    target_compile_definitions(${target} ${scope} MOE_WITH_CUDA=1)
  endif()

  # Folders this layer may include from: its own and those of every dependency.
  set(allowed ${L_DIR})
  foreach(dep IN LISTS L_DEPS)
    get_property(dep_dirs GLOBAL PROPERTY MOE_LAYER_DIRS_${dep})
    list(APPEND allowed ${dep_dirs})
  endforeach()
  list(REMOVE_DUPLICATES allowed)
  set_property(GLOBAL PROPERTY MOE_LAYER_DIRS_${target} ${allowed})

  string(REPLACE ";" "," allowed_arg "${allowed}")
  add_custom_target(${target}_layer_check
    COMMAND ${CMAKE_COMMAND} -DROOT=${CMAKE_SOURCE_DIR} -DLAYER=${L_DIR}
            -DALLOWED=${allowed_arg} -P ${MOE_LAYER_CHECK_SCRIPT}
    COMMENT "Checking that ${L_DIR}/ includes only ${allowed_arg}"
    VERBATIM)
  add_dependencies(${target} ${target}_layer_check)
endfunction()
