// Contract: stands in for the CUDA toolkit's cuda_runtime.h in the CPU execution harness
// (csrc/testing/cuda_sim): the device-side built-ins the kernel files use, run as host C++ on
// the simulator (gs_sim/device.h). Include it only in translation units of kernel code: it
// defines __device__, __noinline__ and the other CUDA qualifiers as macros.
#pragma once

#include "cuda_runtime_api.h"
#include "gs_sim/device.h"
