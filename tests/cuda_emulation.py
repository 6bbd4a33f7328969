"""The CUDA kernels of csrc/cuda under the tests' emulator of the CUDA execution model
(tests/cuda_emulator): built once per machine with torch.utils.cpp_extension (cached
in its extensions folder), registered as torch.ops.fused_accum_emulated for CPU
tensors, and wrapped as a compiled backend.

Without a C++ toolchain or off Linux (fibers are ucontext) the emulated tests skip,
unless FUSED_ACCUM_EXPECT_COMPILED=1 (CI), where a failed build fails them."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from fused_accum.backends.compiled import CompiledBackend

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tests" / "cuda_emulator"


def _headers_digest() -> str:
    """A digest of every header the build includes: torch rebuilds an extension when
    its sources or flags change, and the kernels live in headers."""
    digest = hashlib.sha1()
    for path in sorted([*(ROOT / "csrc").rglob("*.h"), *(ROOT / "csrc").rglob("*.cuh"),
                        *EMULATOR.glob("*.h")]):  # fmt: skip
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _build() -> str | None:
    """Build and load the emulated kernels; return why that failed, or None."""
    if not sys.platform.startswith("linux"):
        return "the CUDA emulator runs on Linux (ucontext fibers)"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="fused_accum_cuda_emulator",
            sources=[str(EMULATOR / "emulated_ops.cpp")],
            extra_include_paths=[str(ROOT / "csrc"), str(EMULATOR)],
            extra_cflags=["-O2", f"-DFUSED_ACCUM_HEADERS={_headers_digest()}"],
            is_python_module=False,
        )
    except Exception as error:  # a missing compiler or ninja, or a compile error
        return f"the CUDA emulator did not build: {error}"
    return None


def emulated_ops():
    """torch.ops.fused_accum_emulated, built on first use; skips (or, in CI, fails)
    the calling test when it cannot be built."""
    reason = _build()
    if reason is not None:
        if os.environ.get("FUSED_ACCUM_EXPECT_COMPILED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return torch.ops.fused_accum_emulated


def emulated_backend() -> CompiledBackend:
    return CompiledBackend("cuda-emulated", ops=emulated_ops())
