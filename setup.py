"""Build script: the pure-Python package, plus the compiled kernels of csrc/ as the
extension fused_accum._C (CPU always when a C++ compiler works, CUDA when a toolkit is
found), built with torch.utils.cpp_extension and ninja.

Environment:
    FUSED_ACCUM_CUDA=auto|0|1   build the CUDA kernels: when a toolkit is found (auto,
                                the default), never, or always (an error if none is).
    FUSED_ACCUM_CPP=1|0         build the compiled kernels at all (default 1); with 0,
                                or without a compiler, the package stays pure Python.
    TORCH_CUDA_ARCH_LIST        GPU architectures (default "8.0;9.0"): nothing is
                                queried from a GPU at build time.
    MAX_JOBS                    parallel compile jobs (default: CPU count, at most 4).
    CUDA_HOME                   the CUDA toolkit root, when torch guesses it wrong.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _cuda_home() -> str | None:
    """The toolkit root if it has nvcc and the runtime headers, else None."""
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    if (
        home
        and (Path(home) / "bin" / "nvcc").exists()
        and (Path(home) / "include" / "cuda_runtime.h").exists()
    ):
        return home
    return None


def _extensions():
    if os.environ.get("FUSED_ACCUM_CPP", "1") == "0":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "fused_accum: torch is not importable at build time; building without compiled kernels",
            file=sys.stderr,
        )
        return [], {}

    mode = os.environ.get("FUSED_ACCUM_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FUSED_ACCUM_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _cuda_home() if mode != "0" else None
    if mode == "1" and cuda_home is None:
        raise SystemExit(
            "FUSED_ACCUM_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit "
            "root (the folder with bin/nvcc and include/cuda_runtime.h)"
        )
    os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 1, 4)))
    sources = ["csrc/ops.cpp", "csrc/cpu/kernels.cpp"]
    # -fopenmp: ATen's parallel_for runs on OpenMP inside our own code, and without the
    # flag its pragmas are ignored (one thread). -fno-math-errno: loops calling sqrt
    # vectorise only when sqrt need not set errno.
    compile_args = {"cxx": ["-O3", "-fno-math-errno", "-fopenmp"]}
    link_args = ["-fopenmp"]
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources.append("csrc/cuda/kernels.cu")
        compile_args["nvcc"] = ["-O3"]
        extension = cpp_extension.CUDAExtension(
            "fused_accum._C", sources, extra_compile_args=compile_args, extra_link_args=link_args
        )
    else:
        if mode == "auto":
            print(
                "fused_accum: no CUDA toolkit found; building the CPU kernels only", file=sys.stderr
            )
        extension = cpp_extension.CppExtension(
            "fused_accum._C", sources, extra_compile_args=compile_args, extra_link_args=link_args
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


extensions, commands = _extensions()
setup(ext_modules=extensions, cmdclass=commands)
