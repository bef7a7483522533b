"""Drive the CUDA kernels for compute-sanitizer and Nsight Compute (see run_gpu_checks.sh).

``python benchmarks/gpu/driver.py sanitize`` calls every op on small inputs that reach every
code path of csrc/cuda/norm_kernels.cu (all dtypes; aligned, misaligned, strided and zero-size
gradients; NaN/Inf; float32 squares that overflow and underflow; float64 sums that need the
max-abs rescue; p = 1, 2, 3, inf; in-pass and deferred value clipping; per-layer clipping;
error_if_nonfinite; the direct entry point; a one-block grid; gradients sharing memory, written
one at a time; adaptive_clip with short and long units, mixed dtypes, a working copy, the
rescue and the shared-memory path) and checks each result against the pure-PyTorch reference,
so a run under ``compute-sanitizer`` both exercises and verifies.

``python benchmarks/gpu/driver.py traffic --case clip-healthy`` (or clip-clipping,
agc-healthy, agc-clipping) makes one warm call and one measured call, inside the NVTX range
``gradstab_measure``, on GPT-2-small float32 gradients, for
``ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum`` (see ncu_summary.py): a healthy
call should read the gradients once (498 MB) and write only the per-unit records (~0.7 MB);
adaptive_clip reads the weights too (996 MB).

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
from gradstab.tools.bench import gpt2_small_shapes

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


def _check(got, want, what: str, rtol: float = 1e-6) -> None:
    for a, b in zip(got, want):
        x = a.cpu().double()
        if not torch.allclose(x, b.double(), rtol=rtol, atol=0, equal_nan=True):
            raise SystemExit(f"driver: {what}: {x} != {b}")


def _agc_inputs(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gradients, parameters) reaching every path of csrc/cuda/agc_kernels.cu."""
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=DEV) * scale).to(dtype)

    grads = [
        randn((64, 3, 3, 3), torch.float32, 0.05),  # short units, several per work item
        randn((3, 5_000), torch.bfloat16, 0.05),  # long units: pieces and the scale kernel
        randn((20_001,), torch.float16, 0.01)[1:],  # one long unit, not 16-byte aligned
        randn((50, 40), torch.float32, 0.05).t(),  # units are not blocks: a working copy
        randn((0, 4), torch.float32),
        randn((3, 0), torch.float32),
        randn((), torch.float64),
        torch.full((2, 5_000), 1e200, dtype=torch.float64, device=DEV),  # rescued by max-abs
    ]
    params = [
        randn((64, 3, 3, 3), torch.bfloat16),
        randn((3, 5_000), torch.float32),
        randn((20_000,), torch.float32),
        randn((40, 50), torch.float64),
        randn((0, 4), torch.float32),
        randn((3, 0), torch.float16),
        randn((), torch.float32),
        torch.full((2, 5_000), 1e190, dtype=torch.float64, device=DEV),
    ]
    grads[0][1, 0, 0, 0] = float("nan")
    grads[1][0, 7] = float("inf")
    return grads, params


def _agc_sanitize() -> None:
    for p in (2.0, 1.0, math.inf, 3.0):
        for shared in (False, True):
            grads, params = _agc_inputs(7)
            if shared:  # a gradient twice: decided first, written one at a time
                grads, params = [*grads, grads[1]], [*params, params[1]]
            cg = _cpu(grads)
            if shared:
                cg[-1] = cg[1]
            want = reference.adaptive_clip(cg, _cpu(params), 0.01, 1e-3, p)
            got = OPS.adaptive_clip(grads, params, 0.01, 1e-3, p)
            _check(got, want, f"adaptive_clip p={p} shared={shared}")
            _check(grads, cg, f"adaptive_clip gradients p={p} shared={shared}", rtol=1e-2)


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
        for op in ("clip_norm", "clip_value"):  # gradients sharing memory: the serial path
            buf = torch.linspace(-5, 5, 130_000, device=DEV)
            views = [buf[:70_000], buf[60_000:], buf[::3], buf[:70_000]]
            cbuf = buf.cpu().clone()
            cviews = [cbuf[:70_000], cbuf[60_000:], cbuf[::3], cbuf[:70_000]]
            bound = torch.tensor(0.5, dtype=torch.float64, device=DEV)
            if op == "clip_norm":
                got = OPS.clip_norm(views, bound, 2.0, EPS, False)
                want = reference.clip_norm(cviews, bound.cpu(), 2.0, EPS, False)
            else:
                got = OPS.clip_value(views, bound, 2.0)
                want = reference.clip_value(cviews, bound.cpu(), 2.0)
            _check(got, want, f"{op} on shared memory")
            _check([buf], [cbuf], f"{op} shared buffer", rtol=1e-5)
        _agc_sanitize()
    ext._cuda_set_max_blocks(0)
    torch.cuda.synchronize()
    print("driver: sanitize: every op ran and matched the reference")


def _cpu(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.detach().cpu().clone() for g in grads]


#: Traffic cases: (op, clips?) -- what ncu measures inside the "gradstab_measure" NVTX range.
TRAFFIC_CASES = {
    "clip-healthy": ("clip_norm", False),
    "clip-clipping": ("clip_norm", True),
    "agc-healthy": ("adaptive_clip", False),
    "agc-clipping": ("adaptive_clip", True),
}


def traffic(case: str) -> None:
    """One warm call (table built, kernels loaded), then the measured call inside an NVTX
    range that ``ncu --nvtx --nvtx-include gradstab_measure/`` profiles, on GPT-2 small
    float32 gradients (498 MB); prints the bytes a single read of the inputs takes."""
    op, clips = TRAFFIC_CASES[case]
    gen = torch.Generator(device=DEV).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=DEV) for _, s in gpt2_small_shapes()]
    weights = [torch.randn_like(g) for g in grads]
    total = float(OPS.grad_stats(grads, 2.0)[3])
    bound = torch.tensor(total * (0.5 if clips else 1e6), device=DEV)

    def call() -> None:
        if op == "clip_norm":
            OPS.clip_norm(grads, bound, 2.0, EPS, False)
        else:  # every unit clipped, or none
            OPS.adaptive_clip(grads, weights, 1e-3 if clips else 1e6, 1e-3, 2.0)

    call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("gradstab_measure")
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    nbytes = sum(g.numel() * 4 for g in grads) * (2 if op == "adaptive_clip" else 1)
    print(f"driver: traffic {case}: one read of the inputs is {nbytes} bytes")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sanitize", "traffic"])
    parser.add_argument("--case", choices=sorted(TRAFFIC_CASES), default="clip-healthy")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("driver: no CUDA device", file=sys.stderr)
        return 2
    if gradstab.backend_info()["cuda"]["kernel"] != "cuda":
        print("driver: gradstab._C has no CUDA kernel", file=sys.stderr)
        return 2
    sanitize() if args.what == "sanitize" else traffic(args.case)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
