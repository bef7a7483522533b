// Contract: the kernel parameters (threshold_kernels.cuh) of a checked threshold call
// (common/threshold_args.h), from its tensors: written once for the CUDA binding
// (cuda/thresholds.cpp) and the CPU execution harness (csrc/testing/cuda_sim/binding.cpp).
// `bound` is the output (undefined when not judging).
#pragma once

#include <torch/extension.h>

#include "common/threshold_args.h"
#include "cuda/threshold_kernels.cuh"

namespace gradstab {
namespace cuda {

inline ZParams zscore_params(const ZCall& call, at::Tensor& mean, at::Tensor& var,
                             at::Tensor& count, at::Tensor& spikes, at::Tensor& warmup,
                             at::Tensor& bound, bool update) {
  ZParams P{};
  P.c = call.c;
  P.n = mean.numel();
  P.norm = call.g.defined() ? call.g.data_ptr<double>() : nullptr;
  P.mean = mean.data_ptr<double>();
  P.var = var.data_ptr<double>();
  P.count = count.data_ptr<int64_t>();
  P.spikes = spikes.data_ptr<int64_t>();
  P.warmup = warmup.data_ptr<double>();
  P.bound = bound.defined() ? bound.data_ptr<double>() : nullptr;
  P.update = update ? 1 : 0;
  return P;
}

inline PParams percentile_params(const PCall& call, at::Tensor& history, at::Tensor& count,
                                 at::Tensor& bound, bool update) {
  PParams P{};
  P.c = call.c;
  P.n = count.numel();
  P.norm = call.g.defined() ? call.g.data_ptr<double>() : nullptr;
  P.history = history.data_ptr<double>();
  P.count = count.data_ptr<int64_t>();
  P.bound = bound.defined() ? bound.data_ptr<double>() : nullptr;
  P.update = update ? 1 : 0;
  return P;
}

}  // namespace cuda
}  // namespace gradstab
