// Stands in for the CUDA toolkit's <cublas_v2.h> in the CPU emulation of the
// CUDA backend (tests/core/cublas_emulation.h says what is emulated and how).
// GEMMs run in the order of their handle's stream, like the kernels, and
// only from a thread whose current device is the handle's.
#include "tests/core/cuda_emulation.h"
#define MOE_CUBLAS_EMULATION_SUBMIT(stream, fn) moe::cuda_emulation::Submit(stream, fn)
#define MOE_CUBLAS_EMULATION_DEVICE moe::cuda_emulation::t_device
#define MOE_CUBLAS_EMULATION_COUNT(api) moe::cuda_emulation::CountWork(api)
#include "tests/core/cublas_emulation.h"
