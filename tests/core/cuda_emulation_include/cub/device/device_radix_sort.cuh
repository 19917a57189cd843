// Stands in for the CUDA toolkit's <cub/device/device_radix_sort.cuh> in the CPU emulation of the CUDA
// backend (tests/core/cuda_emulation.h says what is emulated and how).
#include "tests/core/cuda_emulation.h"
