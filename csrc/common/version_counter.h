// Contract: version counters of the tensors gradstab writes in place (see version_counter.cpp).
#pragma once

#include <ATen/ATen.h>

namespace gradstab {

// Bumps the version counter of every defined, non-inference tensor of `tensors`.
void bump_versions(at::TensorList tensors);

}  // namespace gradstab
