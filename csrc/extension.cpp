// Contract: the Python module gradstab._C. Importing it registers the compiled kernels (CPU, and
// CUDA when built with GRADSTAB_WITH_CUDA) for the ops defined in gradstab/_library.py, and
// exposes build_info() for gradstab.backend_info(), OP_CODES (the shortcuts' op codes) and
// cpu_fast_path() (csrc/cpu/fast_path.cpp) for gradstab.functional, zscore_threshold() and
// percentile_threshold() (csrc/cpu/thresholds.cpp) for gradstab.adaptive (and, in a CUDA
// build, cuda_fast_path() and test hooks from csrc/cuda/fast_path.cpp, and the CUDA twins of
// the threshold rules from csrc/cuda/thresholds.cpp).
#include <torch/extension.h>

#include "common/codes.h"
#include "cpu/range_kernels.h"
#ifdef GRADSTAB_WITH_CUDA
#include "cuda/norm_ops.h"
namespace gradstab {
namespace cuda {
void register_fast_path(pybind11::module& m);  // cuda/fast_path.cpp
void register_thresholds(pybind11::module& m);  // cuda/thresholds.cpp
}  // namespace cuda
}  // namespace gradstab
#endif

namespace gradstab {
namespace cpu {
void register_fast_path(pybind11::module& m);  // fast_path.cpp
void register_thresholds(pybind11::module& m);  // thresholds.cpp
}  // namespace cpu
}  // namespace gradstab

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu_isa"] = gradstab::cpu::selected_isa();
#ifdef GRADSTAB_WITH_CUDA
  d["cuda"] = true;
  d["cuda_kernel"] = gradstab::cuda::build_description();
#else
  d["cuda"] = false;
#endif
  d["torch_version"] = TORCH_VERSION;
  return d;
}

// {op name: code} of the eager shortcuts, from the one definition (common/codes.h).
pybind11::dict op_codes() {
  pybind11::dict d;
  for (int32_t code = 0; code < gradstab::kNumOps; ++code) {
    d[gradstab::op_name(static_cast<gradstab::Op>(code))] = code;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradstab compiled kernels (registered with the PyTorch dispatcher on import)";
  m.def("build_info", &build_info, "What this build of gradstab._C contains.");
  m.attr("OP_CODES") = op_codes();
  gradstab::cpu::register_fast_path(m);
  gradstab::cpu::register_thresholds(m);  // the adaptive thresholds' rules on a CPU state
#ifdef GRADSTAB_WITH_CUDA
  gradstab::cuda::register_fast_path(m);  // cuda_fast_path and the CUDA test hooks
  gradstab::cuda::register_thresholds(m);  // the threshold rules on a CUDA state
#endif
}
