"""Backend choice: a short, pure decision per (device, dtype) group.

``backend="auto"`` picks the best backend available for the group and never raises for
a supported setup; an explicit name that cannot serve the group raises an error that
says why. Faster backends (Triton, the compiled extension) are imported lazily, so
importing fused_accum never touches a GPU, triton or the extension.
"""

from __future__ import annotations

import warnings

import torch

from .reference import ReferenceBackend
from .spec import AdamHyperparams, Backend, SgdHyperparams, StepBatch

BACKEND_NAMES = ("auto", "torch", "triton", "cpu", "cuda")

_REFERENCE = ReferenceBackend()


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is one of ``BACKEND_NAMES``."""
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKEND_NAMES))}"
        )


# What "auto" tries, in order, per device type; the reference backend comes last. The
# order is the measured speed where measured (benchmarks/RESULTS.md). On CUDA, until a
# GPU measures it (benchmarks/gpu_check.sh prints the verdict): the CUDA kernels first.
# Both move the bytes of the byte model with 16-byte accesses (their PTX checks), but
# a compiled launch costs the host a few microseconds against tens for Triton's Python
# launcher, which decides small models' windows, and nothing is compiled at first use.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
_instances: dict[str, Backend] = {}
_noticed: set[str] = set()


def _unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "triton":
        from .triton_backend import unavailable_reason

        return unavailable_reason(device, dtype)
    if device.type != name:
        return f"backend={name!r} runs {name.upper()} tensors"
    from .compiled import unavailable_reason

    return unavailable_reason(device)


def _instance(name: str) -> Backend:
    if name not in _instances:
        if name == "triton":
            from .triton_backend import TritonBackend

            _instances[name] = TritonBackend()
        else:
            from .compiled import CompiledBackend

            _instances[name] = CompiledBackend(name)
    return _instances[name]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs the group of parameters of ``dtype`` on ``device``.

    ``auto`` takes the first available of the CUDA kernels then Triton on a GPU, the
    compiled CPU kernels on a CPU, and else the reference, saying so once per device
    type. An explicit name that cannot serve the group raises ValueError saying why."""
    check_backend_name(name)
    if name == "torch":
        return _REFERENCE
    if name == "auto":
        reasons = []
        for candidate in _AUTO_ORDER.get(device.type, ()):
            reason = _unavailable_reason(candidate, device, dtype)
            if reason is None:
                return _instance(candidate)
            reasons.append(f"{candidate}: {reason}")
        if reasons and device.type not in _noticed:
            _noticed.add(device.type)
            warnings.warn(
                f"fused_accum: no fused kernels for {device.type} tensors "
                f"({'; '.join(reasons)}); using the pure-PyTorch reference backend",
                stacklevel=2,
            )
        return _REFERENCE
    reason = _unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(
            f"backend={name!r} cannot run the {dtype} parameters on {device}: {reason}; "
            f"use backend='auto' to fall back to what is available"
        )
    return _instance(name)


__all__ = [
    "BACKEND_NAMES",
    "AdamHyperparams",
    "Backend",
    "SgdHyperparams",
    "StepBatch",
    "check_backend_name",
    "resolve_backend",
]
