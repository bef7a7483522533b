"""Build gradstab and its compiled extension ``gradstab._C``.

* CPU build of torch              -> CppExtension (csrc/*.cpp, csrc/cpu/*.cpp)
* CUDA build of torch + a toolkit -> CUDAExtension (adds csrc/cuda/*); GRADSTAB_FORCE_CUDA=1
                                     forces it (and fails if no toolkit is found)
* CUDA build of torch, no toolkit -> CppExtension, with a message saying so
* GRADSTAB_NO_EXT=1               -> pure Python, no extension

Object files go to build/temp.<platform>-<python>-torch<version> in the source tree, for plain
and editable (``pip install -e``) installs alike, so a second install reuses them: ninja
recompiles only what changed (setuptools' editable install would otherwise compile in a fresh
temporary folder every time). ``GRADSTAB_BUILD_TEMP=<dir>`` puts them elsewhere.

The CUDA toolkit is the one CUDA_HOME (or CUDA_PATH) names, else the one the ``nvcc`` on PATH
belongs to (found through symbolic links and, for a wrapper script, by asking nvcc itself),
else /usr/local/cuda. The build needs the user's own torch: install with
``pip install --no-build-isolation .``.
"""

import glob
import os
import re
import shutil
import subprocess
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


def _is_toolkit(path):
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        os.path.isfile(os.path.join(inc, "cuda_runtime_api.h"))
        for inc in [os.path.join(path, "include")]
        + glob.glob(os.path.join(path, "targets", "*", "include"))
    )


def _nvcc_toolkit_candidates(nvcc):
    """Directories the nvcc at `nvcc` may belong to: its real location's parent, and the
    toolkit root nvcc reports itself (a wrapper script elsewhere on PATH execs the real one)."""
    found = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for line in (out.stdout + out.stderr).splitlines():
            m = re.match(r"#\$ TOP=(.+)$", line.strip())
            if m:
                found.append(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def find_cuda_toolkit():
    """(toolkit directory or None, how it was found or why not).

    Raises:
        RuntimeError: CUDA_HOME/CUDA_PATH is set to a directory that is no CUDA toolkit, or an
            nvcc is on PATH but its toolkit (with the CUDA headers) cannot be found.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return value, f"{var}={value}"
            raise RuntimeError(
                f"gradstab: {var}={value!r} is not a CUDA toolkit (no bin/nvcc, or no "
                f"include/cuda_runtime_api.h under it). Set {var} to the toolkit's root directory "
                "(the TOP that `nvcc --dryrun -c -x cu /dev/null` prints), or unset it."
            )
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates = _nvcc_toolkit_candidates(nvcc)
        for path in candidates:
            if _is_toolkit(path):
                return path, f"the toolkit of {nvcc}"
        raise RuntimeError(
            f"gradstab: found nvcc at {nvcc}, but no CUDA toolkit with its headers at "
            f"{', '.join(sorted(set(candidates)))}. Set CUDA_HOME to the toolkit's root directory "
            "(the TOP that `nvcc --dryrun -c -x cu /dev/null` prints), e.g. "
            "`CUDA_HOME=/usr/local/cuda-13.0 pip install --no-build-isolation .`."
        )
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA_HOME or CUDA_PATH, no nvcc on PATH and no /usr/local/cuda"


def _third_party_include_dirs(cuda):
    """torch's, Python's and the CUDA toolkit's header directories: named again as -isystem
    (which makes GCC drop their -I twins), so warnings count only in gradstab's own code."""
    import sysconfig

    from torch.utils import cpp_extension

    try:
        dirs = cpp_extension.include_paths(device_type="cuda" if cuda else "cpu")
    except TypeError:  # torch before 2.6: include_paths(cuda: bool)
        dirs = cpp_extension.include_paths(cuda)
    return [*dirs, sysconfig.get_paths()["include"]]


def persistent_build_temp(torch_version):
    """The folder of the object files: ``GRADSTAB_BUILD_TEMP``, else
    ``build/temp.<platform>-<python>-torch<version>`` in the source tree (one per torch, so
    builds against two torches in one tree do not overwrite each other's objects)."""
    import sysconfig

    env = os.environ.get("GRADSTAB_BUILD_TEMP")
    if env:
        return os.path.abspath(env)
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    torch_tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch_version)
    return os.path.join(ROOT, "build", f"temp.{tag}-torch{torch_tag}")


def _persistent(build_ext_cls, torch_version):
    """``build_ext_cls`` compiling into :func:`persistent_build_temp` (ninja then rebuilds
    only the objects whose sources, headers or flags changed)."""

    class BuildExt(build_ext_cls):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = persistent_build_temp(torch_version)

    return BuildExt


def _extensions():
    if os.environ.get("GRADSTAB_NO_EXT") == "1":
        print("gradstab: GRADSTAB_NO_EXT=1, installing the pure-Python package", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            "gradstab builds its extension against your installed PyTorch, which could not be "
            f"imported ({exc}). Install torch first, then `pip install --no-build-isolation .` "
            "(or set GRADSTAB_NO_EXT=1 for the pure-Python package)."
        ) from exc
    force_cuda = os.environ.get("GRADSTAB_FORCE_CUDA") == "1"
    use_cuda = False
    if force_cuda or torch.version.cuda is not None:
        if torch.version.cuda is None:
            raise RuntimeError(
                f"gradstab: GRADSTAB_FORCE_CUDA=1, but torch {torch.__version__} is not a CUDA "
                "build; install a CUDA build of torch or unset GRADSTAB_FORCE_CUDA."
            )
        toolkit, how = find_cuda_toolkit()
        if toolkit is None:
            if force_cuda:
                raise RuntimeError(
                    f"gradstab: GRADSTAB_FORCE_CUDA=1, but no CUDA toolkit was found ({how}); "
                    "install one, or set CUDA_HOME to its root directory."
                )
            print(
                f"gradstab: torch {torch.__version__} is a CUDA build but no CUDA toolkit was "
                f"found ({how}): building the CPU extension only. Set CUDA_HOME to a CUDA "
                f"{torch.version.cuda} toolkit to build the CUDA kernels.",
                file=sys.stderr,
            )
        else:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first, so
            # its include and library paths are the toolkit's (not a wrapper script's parent).
            os.environ["CUDA_HOME"] = toolkit
            use_cuda = True
            print(f"gradstab: building the CUDA kernels with {toolkit} ({how})", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
    # -ffp-contract=off keeps results bit-identical across the ISA clones of the CPU kernel.
    link = ["-fopenmp"]  # torch's wheel ships libgomp.so.1: one OpenMP runtime, torch's threads
    if sys.platform == "darwin":
        cxx = [f for f in cxx if f != "-fopenmp"]
        link = []
    nvcc = list(NVCC_FLAGS)
    if os.environ.get("GRADSTAB_WERROR") == "1":
        # CI's bar: gradstab's own host and device code compiles without a warning. torch's and
        # the toolkit's headers are included as system headers, so only gradstab's code counts.
        system = [a for d in _third_party_include_dirs(use_cuda) for a in ("-isystem", d)]
        cxx += [*system, "-Wall", "-Wextra", "-Werror"]
        nvcc += [*system, "-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror"]
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
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
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
    build_ext = _persistent(BuildExtension.with_options(use_ninja=True), torch.__version__)
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
