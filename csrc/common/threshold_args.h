// Contract: the argument checks of the compiled threshold rules (cpu/thresholds.cpp,
// cuda/thresholds.cpp), written once: the same checks in the same order with the same words on
// both devices; each failure names the argument and what was expected.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/threshold_rules.h"

namespace gradstab {

// A state tensor of the rule: on `device`, of `dtype`, shaped `shape`, contiguous.
void check_threshold_state(const at::Tensor& t, const char* name, at::ScalarType dtype,
                           at::IntArrayRef shape, const at::Device& device, const char* fn);

// This step's norms as contiguous float64 on `device`, shaped like the state (undefined when
// `norm` is empty). On CUDA the conversion is an asynchronous device op (no host sync).
at::Tensor threshold_norms(const c10::optional<at::Tensor>& norm, at::IntArrayRef shape,
                           const at::Device& device, const char* fn);

// A checked call of a rule: this step's norms (threshold_norms) and the rule's configuration.
struct ZCall {
  at::Tensor g;
  rules::ZConfig c;
};
struct PCall {
  at::Tensor g;
  rules::PConfig c;
};

// Every check of a z-score call, then its configuration (cap: none -> NaN).
ZCall check_zscore_call(const c10::optional<at::Tensor>& norm, const at::Tensor& mean,
                        const at::Tensor& var, const at::Tensor& count, const at::Tensor& spikes,
                        const at::Tensor& warmup, double alpha, double z_thresh, double eps,
                        c10::optional<double> cap, int64_t warmup_steps, int64_t rule,
                        bool skip_on_spike, bool update, const at::Device& device,
                        const char* fn);

// Every check of a percentile call, then its configuration.
PCall check_percentile_call(const c10::optional<at::Tensor>& norm, const at::Tensor& history,
                            const at::Tensor& count, double percentile,
                            c10::optional<double> cap, int64_t warmup_steps,
                            bool include_current, bool update, const at::Device& device,
                            const char* fn);

}  // namespace gradstab
