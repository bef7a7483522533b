// Contract: the ADInplaceOrView kernel of every gradstab op that writes its gradients
// (clip_norm, clip_norm_per_layer, clip_value, normalize_per_layer, adaptive_clip,
// clip_with_norm): it runs the op's kernel below ADInplaceOrView, then bumps the version counter
// of every tensor the schema marks as written (`Tensor(a!)[]`), as PyTorch's own in-place ops
// do, so autograd notices when a tensor it saved (a gradient kept for double backward) was
// changed. Nothing is bumped when the kernel raises (the ops change nothing then). Inference
// tensors have no version counter and are skipped. The eager shortcuts (cpu/fast_path.cpp,
// cuda/fast_path.cpp) bump with bump_versions() themselves.
#include "common/version_counter.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <vector>

namespace gradstab {

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

namespace {

void bump_written_after(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) written.push_back(t);
    } else if (v.isTensor()) {
      written.push_back(v.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  bump_versions(written);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, ADInplaceOrView, m) {
  for (const char* name :
       {"clip_norm", "clip_norm_per_layer", "clip_value", "normalize_per_layer", "adaptive_clip",
        "clip_with_norm"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_after>());
  }
}

}  // namespace gradstab
