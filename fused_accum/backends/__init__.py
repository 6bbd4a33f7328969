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


_TRITON: Backend | None = None


def _triton_backend() -> Backend:
    global _TRITON
    if _TRITON is None:
        from .triton_backend import TritonBackend

        _TRITON = TritonBackend()
    return _TRITON


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs the group of parameters of ``dtype`` on ``device``:
    ``auto`` takes Triton on CUDA when it works and the reference otherwise."""
    check_backend_name(name)
    if name == "torch":
        return _REFERENCE
    from .triton_backend import unavailable_reason

    if name == "auto":
        if device.type == "cuda" and unavailable_reason(device) is None:
            return _triton_backend()
        return _REFERENCE
    if name == "triton":
        reason = unavailable_reason(device)
        if reason is not None:
            raise ValueError(
                f"backend='triton' cannot run the {dtype} parameters on {device}: {reason}; "
                f"use backend='auto' to fall back to the reference backend"
            )
        return _triton_backend()
    raise ValueError(
        f"backend={name!r} is not available in this version of fused_accum "
        f"(requested for {dtype} parameters on {device}); use backend='torch' or 'auto'"
    )


__all__ = ["BACKEND_NAMES", "Backend", "StepBatch", "check_backend_name", "resolve_backend"]
