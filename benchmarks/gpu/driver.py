"""Drive the CUDA kernels for compute-sanitizer and Nsight Compute (see run_gpu_checks.sh).

``python benchmarks/gpu/driver.py sanitize`` calls every op on small inputs that reach every
code path of csrc/cuda/kernels.cu (all dtypes; aligned, misaligned, strided and zero-size
gradients; NaN/Inf; float32 squares that overflow and underflow; float64 sums that need the
max-abs rescue; p = 1, 2, 3, inf; in-pass and deferred value clipping; per-layer clipping;
error_if_nonfinite; the direct entry point; a one-block grid) and checks each result against
the pure-PyTorch reference, so a run under ``compute-sanitizer`` both exercises and verifies.

``python benchmarks/gpu/driver.py traffic`` runs healthy and clipping calls on GPT-2-small
float32 gradients, for ``ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum``: a healthy
step should read the gradients once (498 MB) and write only the per-unit records (~0.7 MB).

Example:
    $ compute-sanitizer --tool memcheck python benchmarks/gpu/driver.py sanitize
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import gradstab
from gradstab import reference
from gradstab.bench import gpt2_small_shapes

OPS = torch.ops.gradstab
DEV = "cuda"
EPS = 1e-6


def _inputs(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(n: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(n, generator=gen, device=DEV) * scale).to(dtype)

    grads = [
        randn(20_001, torch.float32),
        randn(8_195, torch.float16)[1:],  # 2-byte offset: scalar head, vector body, tail
        randn(16_390, torch.bfloat16)[3:],
        randn(4_100, torch.float64)[1:],
        randn(2 * 3_001, torch.float32)[::2],  # strided: a contiguous copy
        randn(64 * 33, torch.float32).view(64, 33).t(),  # dense, permuted: in place
        randn(0, torch.float16),
        randn(1, torch.bfloat16),
        torch.full((5_000,), 3e30, device=DEV),  # float32 squares overflow: redone in double
        torch.full((5_000,), 1e-30, device=DEV),  # float32 squares underflow: redone in double
        torch.full((3_000,), 1e200, dtype=torch.float64, device=DEV),  # rescued by max-abs
    ]
    grads[0][17] = float("nan")
    grads[2][5] = float("inf")
    return grads


def _check(got, want, what: str) -> None:
    for a, b in zip(got, want):
        x = a.cpu().double()
        if not torch.allclose(x, b.double(), rtol=1e-6, atol=0, equal_nan=True):
            raise SystemExit(f"driver: {what}: {x} != {b}")


def sanitize() -> None:
    ext = gradstab._extension._C
    for blocks in (0, 1):
        ext._cuda_set_max_blocks(blocks)
        for p in (2.0, 1.0, math.inf, 3.0):
            grads = _inputs(1)
            _check(OPS.grad_stats(grads, p), reference.grad_stats(_cpu(grads), p), f"stats p={p}")
        for finite_only in (True, False):
            grads = _inputs(2)
            if finite_only:
                grads = [g for g in grads if bool(torch.isfinite(g).all())]
            bound = torch.tensor(0.5, dtype=torch.float64, device=DEV)
            want = reference.grad_stats(_cpu(grads), 2.0)
            _check(OPS.clip_norm(grads, bound, 2.0, EPS, False), want, "clip_norm")
            grads = _inputs(3)
            want = reference.grad_stats(_cpu(grads), 2.0)
            _check(OPS.clip_norm_per_layer(grads, bound, 2.0, EPS), want, "per layer")
            grads = _inputs(3)
            _check(OPS.normalize_per_layer(grads, bound, 2.0, EPS), want, "normalize")
            for deferred in (False, True):  # float64 in the list: clamped after the stats
                grads = _inputs(4)
                if not deferred:
                    grads = [g for g in grads if g.dtype != torch.float64]
                want = reference.grad_stats(_cpu(grads), 2.0)
                _check(OPS.clip_value(grads, bound, 2.0), want, "clip_value")
        grads = _inputs(5)
        try:
            OPS.clip_norm(grads, torch.tensor(1.0, device=DEV), 2.0, EPS, True)
            raise SystemExit("driver: error_if_nonfinite=True did not raise")
        except RuntimeError:
            pass
        params = []
        for g in _inputs(6):
            prm = torch.nn.Parameter(torch.empty_like(g))
            prm.grad = g
            params.append(prm)
        for op in range(5):
            ext.cuda_fast_path(op, params, 2.0, 0.25, EPS, False)
    ext._cuda_set_max_blocks(0)
    torch.cuda.synchronize()
    print("driver: sanitize: every op ran and matched the reference")


def _cpu(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.detach().cpu().clone() for g in grads]


def traffic() -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=DEV) for _, s in gpt2_small_shapes()]
    total = float(OPS.grad_stats(grads, 2.0)[3])
    torch.cuda.synchronize()
    for _ in range(3):
        OPS.clip_norm(grads, torch.tensor(total * 1e6, device=DEV), 2.0, EPS, False)  # healthy
    torch.cuda.synchronize()
    OPS.clip_norm(grads, torch.tensor(total * 0.5, device=DEV), 2.0, EPS, False)  # clipping
    torch.cuda.synchronize()
    nbytes = sum(g.numel() * 4 for g in grads)
    print(f"driver: traffic: {len(grads)} gradients, {nbytes / 1e6:.1f} MB")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sanitize", "traffic"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("driver: no CUDA device", file=sys.stderr)
        return 2
    if gradstab.backend_info()["cuda"]["kernel"] != "cuda":
        print("driver: gradstab._C has no CUDA kernel", file=sys.stderr)
        return 2
    sanitize() if args.what == "sanitize" else traffic()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
