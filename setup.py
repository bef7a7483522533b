"""Build gradstab and its compiled extension ``gradstab._C``.

* CPU build of torch          -> CppExtension (csrc/*.cpp, csrc/cpu/*.cpp)
* CUDA build of torch + nvcc  -> CUDAExtension (adds csrc/cuda/*.cu); GRADSTAB_FORCE_CUDA=1 forces it
* GRADSTAB_NO_EXT=1           -> pure Python, no extension

The build needs the user's own torch: install with ``pip install --no-build-isolation .``.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# IEEE float arithmetic in the CUDA kernels (no flush-to-zero, correctly rounded division and
# square root: the defaults without --use_fast_math, spelled out); the kernels also use explicit
# __fadd_rn/__fmul_rn/__dadd_rn where the order of rounding matters, so FMA contraction cannot
# change their results. .ci/run compile-checks csrc/cuda with the same flags.
NVCC_FLAGS = ["-O3", "-lineinfo", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("GRADSTAB_NO_EXT") == "1":
        print("gradstab: GRADSTAB_NO_EXT=1, installing the pure-Python package", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as exc:
        raise RuntimeError(
            "gradstab builds its extension against your installed PyTorch, which could not be "
            f"imported ({exc}). Install torch first, then `pip install --no-build-isolation .` "
            "(or set GRADSTAB_NO_EXT=1 for the pure-Python package)."
        ) from exc

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    force_cuda = os.environ.get("GRADSTAB_FORCE_CUDA") == "1"
    use_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
    # -ffp-contract=off keeps results bit-identical across the ISA clones of the CPU kernel.
    link = ["-fopenmp"]  # torch's wheel ships libgomp.so.1: one OpenMP runtime, torch's threads
    if sys.platform == "darwin":
        cxx = [f for f in cxx if f != "-fopenmp"]
        link = []
    define_macros = []
    if use_cuda and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        define_macros.append(("GRADSTAB_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "gradstab._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "gradstab._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
