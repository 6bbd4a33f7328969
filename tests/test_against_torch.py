"""Each optimizer on the reference backend (which every other backend is held to)
against torch.optim with manual fp32 accumulation (the oracle), over 20 windows, every
hyperparameter flag, accumulation_steps in {1, 2, 3, 8}, four parameter dtypes, odd
sizes and a zero-size parameter last."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CONFIGS, OPTIMIZER_PAIRS, STATE_NAMES, Oracle, accumulation_dtype, max_error

SHAPES = [(1,), (31, 33), (278011,), (0,)]
WINDOWS = 20


def _random_grads(dtype):
    return [torch.randn(shape).to(dtype) for shape in SHAPES]


def _weight(window, micro_step):
    # Every other window has unequal micro-batch weights.
    return 1.0 if window % 2 else 0.5 + 0.25 * micro_step


def _run(name, kwargs, dtype, steps):
    """Ours, the oracle in the same dtype, and the oracle in fp64 (the truth)."""
    initial = [torch.randn(shape).to(dtype) for shape in SHAPES]
    params = [p.clone().requires_grad_() for p in initial]
    ours = OPTIMIZER_PAIRS[name][0](params, accumulation_steps=steps, backend="torch", **kwargs)
    oracle = Oracle(name, kwargs, initial, accumulation_dtype(dtype))
    truth = Oracle(name, kwargs, [p.double() for p in initial], torch.float64)
    for window in range(WINDOWS):
        for micro_step in range(steps):
            grads = _random_grads(dtype)
            weight = _weight(window, micro_step)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            ours.step(weight=weight)
            assert all(param.grad is None for param in params)
            oracle.micro_step(grads, weight)
            truth.micro_step(grads, weight)
        assert ours.last_step_applied
        oracle.apply()
        truth.apply()
    assert ours.update_count == WINDOWS
    return params, ours, oracle, truth


# Slack on top of "within 2x of torch's own error against fp64".
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize(
    "name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]
)
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
def test_matches_torch_optim(name, kwargs, dtype, steps):
    """With fp32/fp64 parameters and one micro-step per window we run torch's very
    operations: bitwise equal. Otherwise rounding differs (a multiply by 1/W, and for
    bf16/fp16 our fp32 state against torch's low-precision state), so our error
    against an fp64 run of the same steps must be within 2x of torch's own, plus a
    small atol. Parameters and every state tensor are compared."""
    params, ours, oracle, truth = _run(name, kwargs, dtype, steps)
    exact = steps == 1 and dtype in (torch.float32, torch.float64)
    for index, param in enumerate(params):
        assert param.dtype == dtype
        _check(param, oracle.params[index], truth.params[index], exact, ATOL[dtype], dtype, index)
        ours_state, oracle_state = ours.state[param], oracle.state(index)
        assert set(ours_state) == set(oracle_state), index
        for key in STATE_NAMES:
            if key not in ours_state:
                continue
            value = ours_state[key]
            if key == "step":
                assert value.dtype == torch.float32
                assert torch.equal(value, oracle_state[key]), index
                continue
            assert value.dtype == accumulation_dtype(dtype), (index, key)
            true = truth.state(index)[key]
            # Relative to the state's scale; for bf16/fp16 parameters one low-precision
            # ulp of it, as the rounded parameters feed back through weight decay.
            atol = ATOL[dtype] * max_error(true, torch.zeros_like(true))
            _check(value, oracle_state[key], true, exact, atol, dtype, (index, key))


def _check(value, expected, true, exact, atol, param_dtype, what):
    if exact:
        assert torch.equal(value, expected), what
        return
    ours_error, torch_error = max_error(value, true), max_error(expected, true)
    if not math.isfinite(torch_error):
        # torch's fp16 Adam can fail outright (its eps and exp_avg_sq underflow in
        # fp16, giving 0/0); then ours must stay within a few ulps of the parameter
        # dtype (its rounding is what feeds back, into the state too) of the truth.
        scale = max_error(true, torch.zeros_like(true))
        torch_error = 4 * torch.finfo(param_dtype).eps * scale
    assert ours_error <= 2 * torch_error + atol, (what, ours_error, torch_error)
