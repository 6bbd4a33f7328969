"""Backend choice: a short, pure decision per (device, dtype) group.

``backend="auto"`` picks the best backend available for the group and never raises for
a supported setup; an explicit name that cannot serve the group raises an error that
says why. Faster backends are imported lazily, so importing fused_accum never touches a
GPU or a compiler.
"""

from __future__ import annotations

import torch

from .reference import ReferenceBackend
from .spec import Backend, StepBatch

BACKEND_NAMES = ("auto", "torch", "triton", "cpu", "cuda")

_REFERENCE = ReferenceBackend()


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is one of ``BACKEND_NAMES``."""
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKEND_NAMES))}"
        )


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs the group of parameters of ``dtype`` on ``device``."""
    check_backend_name(name)
    if name in ("auto", "torch"):
        return _REFERENCE
    raise ValueError(
        f"backend={name!r} is not available in this version of fused_accum "
        f"(requested for {dtype} parameters on {device}); use backend='torch' or 'auto'"
    )


__all__ = ["BACKEND_NAMES", "Backend", "StepBatch", "check_backend_name", "resolve_backend"]
