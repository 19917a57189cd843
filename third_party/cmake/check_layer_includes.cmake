cmake_minimum_required(VERSION 3.25)
# cmake -DROOT=<source root> -DLAYER=comm -DALLOWED=comm,runtime/core -P check_layer_includes.cmake
#
# Checks the files of one layer (ROOT/LAYER/*, and its backend subfolders cpu/
# and cuda/) against two rules of docs/design.md and fails naming the file, the
# include and the rule:
#   1. A quoted include "<layer>/..." may name only the layer itself or one it
#      depends on (ALLOWED): arrows point down.
#   2. A system header owned by one layer is included only there:
#        <mpi.h>, <nccl.h>                  comm/ (and comm/cuda/)
#        <cuda*.h> (cuda.h, cuda_runtime.h, cuda_runtime_api.h, cuda_bf16.h, ...)
#                                           comm/cuda/ and runtime/core/cuda/
#        <cublas*.h>                        runtime/core/cuda/
#        <cblas.h>                          runtime/core/cpu/
set(layers runtime/core comm data parallel model optim runtime launch)
string(REPLACE "," ";" allowed "${ALLOWED}")
set(dir ${ROOT}/${LAYER})
file(GLOB files ${dir}/*.h ${dir}/*.cc ${dir}/*.cu ${dir}/*.cuh
     ${dir}/cpu/*.h ${dir}/cpu/*.cc ${dir}/cuda/*.h ${dir}/cuda/*.cc ${dir}/cuda/*.cu ${dir}/cuda/*.cuh)

# The folders (relative to ROOT, with a trailing slash) that may include
# system header `inc`, and the rule's wording; empty when anyone may.
function(owned_header inc out_dirs out_rule)
  set(dirs "")
  set(rule "")
  if(inc MATCHES "^(mpi|nccl)\\.h$")
    set(dirs "comm/")
    set(rule "only comm/ talks to MPI and NCCL")
  elseif(inc MATCHES "^cublas[^/]*\\.h$")
    set(dirs "runtime/core/cuda/")
    set(rule "only the CUDA backend (runtime/core/cuda/) talks to cuBLAS")
  elseif(inc MATCHES "^cuda[^/]*\\.h$")
    set(dirs "comm/cuda/;runtime/core/cuda/")
    set(rule "only the CUDA backend (runtime/core/cuda/) and the NCCL communicator (comm/cuda/) talk to CUDA")
  elseif(inc MATCHES "^cblas[^/]*\\.h$")
    set(dirs "runtime/core/cpu/")
    set(rule "only the CPU backend (runtime/core/cpu/) talks to BLAS")
  endif()
  set(${out_dirs} "${dirs}" PARENT_SCOPE)
  set(${out_rule} "${rule}" PARENT_SCOPE)
endfunction()

set(bad "")
foreach(f IN LISTS files)
  file(RELATIVE_PATH rel ${ROOT} ${f})
  file(STRINGS ${f} lines REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*([\"<])([^\">]+)[\">].*" "\\1" delim "${line}")
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*([\"<])([^\">]+)[\">].*" "\\2" inc "${line}")
    # Rule 1: project headers.
    set(owner "")
    foreach(layer IN LISTS layers)
      string(LENGTH "${layer}/" n)
      string(SUBSTRING "${inc}" 0 ${n} prefix)
      if(prefix STREQUAL "${layer}/")
        set(owner ${layer})
        break()
      endif()
    endforeach()
    if(owner)
      if(delim STREQUAL "\"" AND NOT owner IN_LIST allowed)
        string(APPEND bad "\n  ${rel}: includes \"${inc}\" (layer ${owner}/), but ${LAYER}/ may only use: ${ALLOWED}")
      endif()
      continue()
    endif()
    # Rule 2: system headers owned by one layer.
    owned_header("${inc}" dirs rule)
    if(dirs)
      set(ok FALSE)
      foreach(d IN LISTS dirs)
        string(LENGTH "${d}" n)
        string(SUBSTRING "${rel}" 0 ${n} prefix)
        if(prefix STREQUAL d)
          set(ok TRUE)
        endif()
      endforeach()
      if(NOT ok)
        string(REPLACE ";" " and " where "${dirs}")
        if(delim STREQUAL "<")
          set(shown "<${inc}>")
        else()
          set(shown "\"${inc}\"")
        endif()
        string(APPEND bad "\n  ${rel}: includes ${shown}, which only ${where} may include (${rule})")
      endif()
    endif()
  endforeach()
endforeach()
if(bad)
  message(FATAL_ERROR "Layering violation (docs/design.md: launch -> runtime -> model, optim -> parallel -> "
                      "comm, data -> runtime/core; MPI/NCCL only in comm/, CUDA only in comm/cuda/ and "
                      "runtime/core/cuda/, BLAS only in runtime/core/cpu/):${bad}")
endif()
