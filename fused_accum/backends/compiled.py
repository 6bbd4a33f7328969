"""The compiled backends: the ops of csrc/ (torch.ops.fused_accum.*), CPU and CUDA.

The extension fused_accum._C is imported on first use, never at package import; a
build without a compiler or toolkit leaves it out and these backends unavailable. So
does a build whose step ops take other arguments than the calls here pass (a build from
older sources): the hyperparameters go positionally, in the order of the records'
fields, and are checked against the schemas once, when the extension is loaded.
"""

from __future__ import annotations

from dataclasses import fields
from itertools import zip_longest

import torch

from .layout import like_buffer, write_back
from .spec import AdamHyperparams, SgdHyperparams, StepBatch

_import_error: str | None = None
_schema_error: str | None = None  # how the loaded ops disagree with this package's calls
_loaded = False


def _load() -> str | None:
    """Import the extension once and check its schemas; return why the import failed,
    or None."""
    global _import_error, _schema_error, _loaded
    if not _loaded:
        try:
            from .. import _C  # noqa: F401  (registers the ops)
        except ImportError as error:
            _import_error = str(error)
        else:
            _register_fakes()
            _schema_error = schema_mismatch(torch.ops.fused_accum)
        _loaded = True
    return _import_error


# The step ops take their hyperparameters positionally: after these arguments, the
# fields of the record, in order. CompiledBackend's calls pass them so.
_STEP_ARGUMENTS = {
    "sgd_step": (
        ("params", "buffers", "grads", "momentum_buffers", "masters", "use_buffer",
         "normaliser", "grad_weight"),
        SgdHyperparams,
    ),
    "adam_step": (
        ("params", "buffers", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters",
         "use_buffer", "normaliser", "grad_weight", "step"),
        AdamHyperparams,
    ),
}  # fmt: skip


def schema_mismatch(ops) -> str | None:
    """Where the step ops of the library ``ops`` (a torch.ops namespace) take other
    arguments than the calls pass, up to the last hyperparameter; None if nowhere. A
    build from older sources would otherwise get, say, momentum as dampening."""
    problems = []
    for op_name, (leading, record) in _STEP_ARGUMENTS.items():
        schema = getattr(ops, op_name).default._schema
        expected = [*leading, *(field.name for field in fields(record))]
        actual = [argument.name for argument in schema.arguments][: len(expected)]
        for position, (passed, taken) in enumerate(zip_longest(expected, actual)):
            if passed != taken:
                if position >= len(leading):
                    passed = f"{record.__name__}.{passed}"
                taken = "missing" if taken is None else repr(taken)
                problems.append(
                    f"argument {position} of {schema.name} is {taken} but the call passes "
                    f"{passed} there"
                )
    if not problems:
        return None
    return (
        f"the compiled kernels do not match this fused_accum ({'; '.join(problems)}): "
        f"they were built from other sources; rebuild them (reinstall fused_accum, see "
        f"README.md)"
    )


def _register_fakes() -> None:
    """Shape functions for torch.compile: the ops only mutate their inputs."""

    def mutates_only(*args, **kwargs) -> None:
        return None

    for op in ("accumulate", "sgd_step", "adam_step"):
        torch.library.register_fake(f"fused_accum::{op}", mutates_only)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the compiled kernels cannot run on ``device``, or None if they can."""
    error = _load()
    if error is not None:
        return (
            f"the compiled kernels are not built ({error}); reinstall fused_accum on a "
            f"machine with a C++ compiler (see README.md)"
        )
    if _schema_error is not None:
        return _schema_error
    if device.type not in ("cpu", "cuda"):
        return f"there are no compiled kernels for {device.type} tensors"
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_accum::accumulate", key):
        return (
            f"this build of fused_accum has no {key} kernels (for CUDA: build where a CUDA "
            f"toolkit is found, or with FUSED_ACCUM_CUDA=1 and CUDA_HOME set)"
        )
    return None


def _seed(batch: StepBatch) -> int:
    """The ops' rounding_seed: -1 for round-to-nearest."""
    return -1 if batch.rounding_seed is None else batch.rounding_seed


class CompiledBackend:
    """torch.ops.fused_accum on CPU (vectorised, multi-threaded) or CUDA. ``ops`` is
    another library of the same schemas (the tests give the CUDA kernels built for
    their emulator, torch.ops.fused_accum_emulated)."""

    # the ops check every operand (dtype, shape, layout, device) before writing anything
    checks_operands = True

    def __init__(self, name: str, ops=None) -> None:
        self.name = name
        if ops is None:
            ops = torch.ops.fused_accum  # checked when loaded (unavailable_reason)
        else:
            mismatch = schema_mismatch(ops)
            if mismatch is not None:
                raise RuntimeError(mismatch)
        self._ops = ops

    def accumulate(
        self,
        buffers: list[torch.Tensor],
        grads: list[torch.Tensor],
        *,
        scale: float,
        overwrite: bool,
        found_inf: torch.Tensor | None = None,
        sum_sq: torch.Tensor | None = None,
        grad_sum_sq: torch.Tensor | None = None,
    ) -> None:
        args = (float(scale), overwrite, found_inf, sum_sq, grad_sum_sq)
        try:
            self._ops.accumulate(buffers, grads, *args)
        except ValueError:
            # a gradient in another layout than its buffer's (the ops check layouts
            # first, before writing anything, and say so with a ValueError): again on
            # copies in the buffer's layout
            grads = [like_buffer(g, b) for g, b in zip(grads, buffers, strict=True)]
            self._ops.accumulate(buffers, grads, *args)

    def _step(self, op, batch: StepBatch, *args) -> None:
        """``op(params, buffers, grads, *args)``; as accumulate, on copies in the buffers'
        layout (written back after) when a parameter or gradient has another."""
        try:
            op(batch.params, batch.buffers, batch.grads, *args)
            return
        except ValueError:
            pass
        params = [like_buffer(p, b) for p, b in zip(batch.params, batch.buffers, strict=True)]
        grads = None
        if batch.grads is not None:
            grads = [like_buffer(g, b) for g, b in zip(batch.grads, batch.buffers, strict=True)]
        op(params, batch.buffers, grads, *args)
        write_back(batch.params, params)

    def sgd_step(
        self,
        batch: StepBatch,
        momentum_buffers: list[torch.Tensor] | None,
        hyper: SgdHyperparams,
        *,
        init_momentum: bool,
    ) -> None:
        self._step(
            self._ops.sgd_step, batch, momentum_buffers or [], batch.masters or [],
            batch.use_buffer, float(batch.normaliser), float(batch.grad_weight),
            *hyper.as_tuple(), init_momentum, _seed(batch), batch.device_scalars,
            batch.grad_stats,
        )  # fmt: skip

    def adam_step(
        self,
        batch: StepBatch,
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor] | None,
        hyper: AdamHyperparams,
        *,
        step: int,
    ) -> None:
        self._step(
            self._ops.adam_step, batch, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [],
            batch.masters or [], batch.use_buffer, float(batch.normaliser),
            float(batch.grad_weight), int(step), *hyper.as_tuple(), _seed(batch),
            batch.device_scalars, batch.grad_stats,
        )  # fmt: skip
