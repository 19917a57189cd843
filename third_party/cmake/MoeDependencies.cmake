# Finds every external dependency. Each one missing stops the configure step with
# the Debian package that provides it, so a fresh machine knows what to install.

function(moe_require found what apt_package)
  if(NOT ${found})
    message(FATAL_ERROR
      "moe-runtime: ${what} was not found. On Debian 12 install it with:\n"
      "  sudo apt-get install ${apt_package}\n"
      "(launch/setup.sh installs every dependency at once).")
  endif()
endfunction()

find_package(PkgConfig QUIET)
moe_require(PKG_CONFIG_FOUND "pkg-config" "pkg-config")

# Open MPI.
find_package(MPI COMPONENTS C QUIET)
moe_require(MPI_C_FOUND "MPI (Open MPI)" "libopenmpi-dev openmpi-bin")
find_program(MOE_MPIEXEC NAMES mpirun mpiexec)
moe_require(MOE_MPIEXEC "mpirun" "openmpi-bin")

# Abseil (Debian ships its CMake package).
find_package(absl CONFIG QUIET)
moe_require(absl_FOUND "Abseil" "libabsl-dev")

# Protocol Buffers: library and protoc.
find_package(Protobuf QUIET)
moe_require(Protobuf_FOUND "Protocol Buffers" "libprotobuf-dev protobuf-compiler")
if(NOT Protobuf_PROTOC_EXECUTABLE)
  moe_require(FALSE "protoc" "protobuf-compiler")
endif()

# HDF5, the Open MPI build (parallel I/O).
pkg_check_modules(HDF5 QUIET IMPORTED_TARGET hdf5-openmpi)
moe_require(HDF5_FOUND "HDF5 (Open MPI build)" "libhdf5-openmpi-dev hdf5-tools")

# SentencePiece (moe-preprocess --tokenizer spm:MODEL.model).
pkg_check_modules(SENTENCEPIECE QUIET IMPORTED_TARGET sentencepiece)
moe_require(SENTENCEPIECE_FOUND "SentencePiece (libsentencepiece)" "libsentencepiece-dev")

# CPU BLAS.
pkg_check_modules(OPENBLAS QUIET IMPORTED_TARGET openblas)
moe_require(OPENBLAS_FOUND "OpenBLAS" "libopenblas-dev")

# Catch2 v2 (Debian 12 ships 2.13).
find_package(Catch2 QUIET)
moe_require(Catch2_FOUND "Catch2" "catch2")

find_package(Threads REQUIRED)

# CUDA toolkit and NCCL (for the NCCL communicator in comm/cuda).
set(MOE_CUDA_ENABLED OFF)
if(NOT MOE_WITH_CUDA STREQUAL "OFF")
  # H100/H200 only (sm_90) unless the user says otherwise: one architecture keeps
  # nvcc time down on the 2-core CI (set before CMake picks the compiler's default).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures (90: H100/H200)")
  endif()
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  find_package(CUDAToolkit QUIET)
  find_library(MOE_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  find_path(MOE_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND AND MOE_NCCL_LIBRARY AND MOE_NCCL_INCLUDE)
    set(MOE_CUDA_ENABLED ON)
  elseif(MOE_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR
      "MOE_WITH_CUDA=ON but the CUDA toolkit with NCCL was not found "
      "(looked in /usr/local/cuda). Install the CUDA toolkit and NCCL, or configure "
      "with -DMOE_WITH_CUDA=OFF.")
  endif()
endif()
if(MOE_CUDA_ENABLED)
  enable_language(CUDA)
  # The kernels are C++17 (this CMake does not know nvcc's C++20 flag).
  set(CMAKE_CUDA_STANDARD 17)
  # -O3 host code, line info for profilers, nvcc's and the host compiler's warnings as errors.
  set(CMAKE_CUDA_FLAGS_RELEASE "-O3 -lineinfo -DNDEBUG")
  add_library(moe_nccl INTERFACE)
  target_include_directories(moe_nccl INTERFACE ${MOE_NCCL_INCLUDE})
  target_link_libraries(moe_nccl INTERFACE ${MOE_NCCL_LIBRARY} CUDA::cudart)
  message(STATUS "moe-runtime: CUDA backend and NCCL communicator ON (CUDA ${CUDAToolkit_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "moe-runtime: CUDA backend and NCCL communicator OFF")
endif()

# Warnings as errors for the CUDA sources of a layer (.cu through nvcc and the
# host compiler, .cc that include CUDA headers).
function(moe_cuda_strict)
  foreach(src IN LISTS ARGN)
    if(src MATCHES "\\.cu$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS
        "-Werror=all-warnings;-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Werror")
    else()
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "-Werror")
    endif()
  endforeach()
endfunction()
