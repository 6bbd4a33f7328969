"""With ``accumulate_in_backward`` the hooks take each gradient as autograd finishes it
and fold them in buckets: one backend call per bucket (at the end of each backward, or
once ``FOLD_BUCKET_BYTES`` are held), not one kernel launch per parameter. The sums
equal the step-time intake's bit for bit, whatever the bucket size."""

from __future__ import annotations

import pytest
import torch

import fused_accum._intake as intake
from fused_accum import FusedAccumAdamW, FusedAccumSGD

LAYERS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(LAYERS)))


def _count_folds(optimizer, monkeypatch) -> list[int]:
    """The number of gradients in each of the optimizer's folds that has any (step()
    makes one of none when backward took them all), as they come."""
    sizes: list[int] = []
    accumulation = optimizer._accumulation
    fold = accumulation.fold

    def counted(pairs, *args, **kwargs):
        if pairs:
            sizes.append(len(pairs))
        return fold(pairs, *args, **kwargs)

    monkeypatch.setattr(accumulation, "fold", counted)
    return sizes


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_one_fold_per_backward(backend, monkeypatch):
    model = _model()
    optimizer = FusedAccumSGD(
        model.parameters(), lr=0.1, accumulation_steps=4, accumulate_in_backward=True,
        backend=backend,
    )  # fmt: skip
    sizes = _count_folds(optimizer, monkeypatch)
    x = torch.randn(3, 8)
    for micro_step in range(3):
        model(x).square().sum().backward()
        assert all(p.grad is None for p in model.parameters())
        assert sizes == [2 * LAYERS] * (micro_step + 1)  # every weight and bias at once
        optimizer.step()
    assert len(sizes) == 3


def test_buckets_bound_what_is_held_and_change_no_bit(monkeypatch):
    """Buckets of one layer's gradients (its bias, then its 8 x 8 fp32 weight: the
    hooks run from the last layer back) give one fold per layer, and the same sums, bit
    for bit, as one bucket per backward and as the step-time intake."""
    models = [_model() for _ in range(3)]
    options = [{}, {"accumulate_in_backward": True}, {"accumulate_in_backward": True}]
    optimizers = [
        FusedAccumAdamW(model.parameters(), lr=0.01, accumulation_steps=3, **kwargs)
        for model, kwargs in zip(models, options, strict=True)
    ]
    sizes = _count_folds(optimizers[2], monkeypatch)
    torch.manual_seed(1)
    for micro_step in range(7):
        x = torch.randn(5, 8)
        weight = 1.0 + micro_step % 2
        for index, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            cap = 8 * 8 * 4 if index == 2 else 32 * 2**20
            monkeypatch.setattr(intake, "FOLD_BUCKET_BYTES", cap)
            if index:
                optimizer.set_weight(weight)
            model(x).tanh().sum().backward()
            optimizer.step(**({} if index else {"weight": weight}))
        assert sizes[-LAYERS:] == [2] * LAYERS
        if micro_step % 3 == 1:  # mid-window: every sum, bit for bit
            for params in zip(*(m.parameters() for m in models), strict=True):
                sums = [
                    o._accumulation.buffer_view(p) for o, p in zip(optimizers, params, strict=True)
                ]
                assert torch.equal(sums[0], sums[1]) and torch.equal(sums[1], sums[2])
    assert len(sizes) == 7 * LAYERS
    for params in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(params[1], params[2])
        # the step-time intake adds a window's last gradients inside the update
        torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)


def test_a_hook_run_outside_backward_folds_at_once(monkeypatch):
    """No backward in progress to call back at its end (the hook run by other means):
    the gradient is folded at once, not held."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = FusedAccumSGD(
        [param], lr=0.1, accumulation_steps=2, accumulate_in_backward=True, backend="torch"
    )
    sizes = _count_folds(optimizer, monkeypatch)
    param.grad = torch.ones(3)
    optimizer._take_in_backward(param)
    assert sizes == [1] and param.grad is None
    assert torch.equal(optimizer._accumulation.buffer_view(param), torch.ones(3))
