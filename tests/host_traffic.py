"""A harness that counts what the optimizer makes the host do with device data: reads
of tensor values on the host (``.item()``, ``bool(t)``, ``float(t)``, ``torch.equal``)
and tensors built from host data (``torch.tensor(...)``, item assignment of a Python
number), each attributed to the function of fused_accum that caused it.

On a GPU each read waits for the device and each build is a host-to-device copy; on
the CPU of CI nothing waits, but the same calls happen, so counting them here shows
what a GPU would do. The steady-state tests (test_steady_state.py) use it."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_accum

_PACKAGE = str(Path(fused_accum.__file__).parent)
_aten = torch.ops.aten
READS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default}
BUILDS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}

# Reads and builds that are documented and do not wait for a device, with the reason.
ALLOWED = {
    ("read", "adam._prepare_state"): (
        "Adam's step count is a host tensor (as in torch.optim without capturable); "
        "with loss_scaling it lives on the device and is not read"
    ),
    ("read", "_checks.check_weight"): "a tensor weight is read once per micro-step (README)",
    ("read", "_optimizer._grad_scaler_inputs"): "a GradScaler's per-micro-step read (README)",
    ("build", "triton_tables._new_address_table"): (
        "the addresses of fresh gradients, which autograd may place anywhere: uploaded "
        "from pinned memory without making the host wait"
    ),
}


OUTSIDE = "outside fused_accum"  # the model's or the test's own: not the optimizer's


def _culprit() -> str:
    """``module.function`` of the innermost frame in fused_accum."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE):
            module = Path(frame.filename).stem
            return f"{module}.{frame.name}"
    return OUTSIDE


class HostTraffic(TorchDispatchMode):
    """Inside it, ``events`` counts (kind, culprit) for kind "read" or "build"."""

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.events["read", _culprit()] += 1
        elif func in BUILDS:
            self.events["build", _culprit()] += 1
        return func(*args, **(kwargs or {}))

    def unexplained(self) -> dict[tuple[str, str], int]:
        """The optimizer's events that ALLOWED does not name."""
        return {
            event: n
            for event, n in self.events.items()
            if event not in ALLOWED and event[1] != OUTSIDE
        }
