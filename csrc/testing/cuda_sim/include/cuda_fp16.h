// Contract: stands in for the CUDA toolkit's cuda_fp16.h in the CPU execution harness
// (csrc/testing/cuda_sim): __half as a 16-bit struct and the conversions the kernels use, with
// the device's results bit for bit (round to nearest even; a NaN becomes 0x7fff, as cvt.rn.f16.f32
// gives).
#pragma once

#include "gs_sim/half.h"
