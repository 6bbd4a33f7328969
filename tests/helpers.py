"""Shared pieces of the tests: the torch.optim oracle with manual fp32 accumulation,
tolerance checks and random inputs."""

from __future__ import annotations

import torch

import fused_accum

# (our class, the torch.optim class it replaces, extra torch kwargs)
OPTIMIZER_PAIRS = {
    "sgd": (fused_accum.FusedAccumSGD, torch.optim.SGD),
    "adam": (fused_accum.FusedAccumAdam, torch.optim.Adam),
    "adamw": (fused_accum.FusedAccumAdamW, torch.optim.AdamW),
}

# Every hyperparameter flag of each optimizer appears in at least one configuration.
CONFIGS = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02, maximize=True)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, amsgrad=True, maximize=True)),
]

STATE_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Oracle:
    """torch.optim with manual accumulation in ``dtype`` (fp32, or fp64 for the truth):
    the weighted mean of a window's gradients, cast to the parameter dtype, set as
    .grad before torch's step."""

    def __init__(self, name, kwargs, params, accum_dtype=torch.float32):
        self.params = [p.detach().clone().requires_grad_() for p in params]
        self.optimizer = OPTIMIZER_PAIRS[name][1](self.params, foreach=False, **kwargs)
        self.accum_dtype = accum_dtype
        self._reset()

    def _reset(self):
        self.buffers = [torch.zeros_like(p, dtype=self.accum_dtype) for p in self.params]
        self.weight = 0.0
        self.seen = [False] * len(self.params)

    def micro_step(self, grads, weight=1.0):
        for i, grad in enumerate(grads):
            if grad is not None:
                self.buffers[i] += grad.to(self.accum_dtype) * weight
                self.seen[i] = True
        self.weight += weight

    def apply(self):
        for param, buffer, seen in zip(self.params, self.buffers, self.seen, strict=True):
            param.grad = (buffer / self.weight).to(param.dtype) if seen else None
        self.optimizer.step()
        self._reset()

    def state(self, index):
        return self.optimizer.state[self.params[index]]


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.double() - truth.double()).abs().max().item()


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    actual, expected = actual.double().flatten(), expected.double().flatten()
    differ = ~torch.isclose(actual, expected, equal_nan=True)
    where = differ.nonzero().flatten()[:5].tolist()
    return (
        f"{int(differ.sum())} of {actual.numel()} elements differ, first at {where}: "
        f"{actual[where].tolist()} vs {expected[where].tolist()}"
    )


def _backend_param(name: str):
    """``name`` as a pytest parameter, skipped where that backend cannot run on CPU
    (the compiled kernels not built, Triton outside its interpreter or with one that
    cannot follow address tables), unless CI says it is expected
    (FUSED_ACCUM_EXPECT_COMPILED=1, FUSED_ACCUM_EXPECT_TRITON=1): then the tests fail."""
    import os

    import pytest

    from fused_accum.backends import resolve_backend

    try:
        resolve_backend(name, torch.device("cpu"), torch.float32)
        reason = None
    except (ValueError, RuntimeError) as error:
        reason = str(error)
    if name == "cpu" and os.environ.get("FUSED_ACCUM_EXPECT_COMPILED") == "1":
        reason = None
    if name == "triton" and os.environ.get("FUSED_ACCUM_EXPECT_TRITON") == "1":
        reason = None
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


# Every backend that can run on CPU: the reference, the compiled kernels, and Triton
# under its interpreter.
CPU_BACKENDS = [_backend_param(name) for name in ("torch", "cpu", "triton")]
