// Stands in for the CUDA toolkit's <cuda_runtime_api.h> in the CPU emulation of the CUDA
// backend (tests/core/cuda_emulation.h says what is emulated and how).
#include "tests/core/cuda_emulation.h"
