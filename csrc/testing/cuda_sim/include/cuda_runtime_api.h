// Contract: stands in for the CUDA toolkit's cuda_runtime_api.h in the CPU execution harness
// (csrc/testing/cuda_sim; its include/ directory comes first on the include path): only the
// types the kernels' interface headers (norm_kernels.cuh, agc_kernels.cuh) name. No runtime functions:
// the harness launches kernels with gs_sim::launch.
#pragma once

typedef enum cudaError { cudaSuccess = 0, cudaErrorLaunchFailure = 719 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
