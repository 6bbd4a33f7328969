"""max_grad_norm: the window's mean gradient clipped as torch.nn.utils.clip_grad_norm_
would clip it, on every backend, with the norm left on the device."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, Oracle

from fused_accum import FusedAccumAdamW, FusedAccumSGD

SHAPES = [(7, 5), (1,), (1023,), (0,)]
STEPS = 3
CASES = [
    ("sgd", FusedAccumSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adamw", FusedAccumAdamW, dict(lr=1e-2, weight_decay=0.1)),
]


def _clipped_oracle_apply(oracle: Oracle, max_norm: float) -> torch.Tensor:
    """The oracle's update, with torch's clipping of the mean gradient first."""
    for param, buffer, seen in zip(oracle.params, oracle.buffers, oracle.seen, strict=True):
        param.grad = (buffer / oracle.weight).to(param.dtype) if seen else None
    norm = torch.nn.utils.clip_grad_norm_(oracle.params, max_norm, foreach=False)
    oracle.optimizer.step()
    oracle._reset()
    return norm


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipping", "not-clipping"])
def test_clipping_equals_clip_grad_norm_on_the_mean_gradient(backend, name, cls, kwargs, max_norm):
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in SHAPES]
    oracle = Oracle(name, kwargs, params)
    optimizer = cls(
        params, accumulation_steps=STEPS, max_grad_norm=max_norm, backend=backend, **kwargs
    )
    for window in range(4):
        for micro_step in range(STEPS):
            weight = 1.0 + micro_step
            grads = [torch.randn(shape) for shape in SHAPES]
            if micro_step == STEPS - 1 and window % 2:
                grads[0] = None  # a sum the last micro-step does not touch
            oracle.micro_step(grads, weight)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            optimizer.step(weight=weight)
        expected_norm = _clipped_oracle_apply(oracle, max_norm)
        assert optimizer.grad_norm is not None
        torch.testing.assert_close(
            optimizer.grad_norm.reshape(()), expected_norm, rtol=1e-5, atol=0
        )
        for param, expected in zip(params, oracle.params, strict=True):
            torch.testing.assert_close(param.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    if max_norm < 1:
        assert expected_norm > 10 * max_norm, "the test must clip"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flush_clips_a_partial_window(backend):
    torch.manual_seed(1)
    params = [torch.randn(shape, requires_grad=True) for shape in SHAPES]
    kwargs = dict(lr=0.1)
    oracle = Oracle("sgd", kwargs, params)
    optimizer = FusedAccumSGD(
        params, accumulation_steps=5, max_grad_norm=0.1, backend=backend, **kwargs
    )
    for _ in range(2):
        grads = [torch.randn(shape) for shape in SHAPES]
        oracle.micro_step(grads)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()
    assert optimizer.flush()
    expected_norm = _clipped_oracle_apply(oracle, 0.1)
    torch.testing.assert_close(optimizer.grad_norm.reshape(()), expected_norm, rtol=1e-5, atol=0)
    for param, expected in zip(params, oracle.params, strict=True):
        torch.testing.assert_close(param.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_bad_max_grad_norm_is_refused(value):
    with pytest.raises(ValueError, match="max_grad_norm must be positive and finite"):
        FusedAccumSGD([torch.zeros(2, requires_grad=True)], lr=0.1, max_grad_norm=value)
    with pytest.raises(TypeError, match="max_grad_norm must be a number or None"):
        FusedAccumSGD([torch.zeros(2, requires_grad=True)], lr=0.1, max_grad_norm="1")


def test_without_clipping_there_is_no_norm():
    param = torch.zeros(2, requires_grad=True)
    optimizer = FusedAccumSGD([param], lr=0.1)
    param.grad = torch.ones(2)
    optimizer.step()
    assert optimizer.grad_norm is None
