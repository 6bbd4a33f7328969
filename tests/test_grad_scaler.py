"""torch.amp.GradScaler, unchanged, in the loops users write: an overflow in any
micro-batch of a window skips the whole window bit for bit, the scaler backs off, and the
next window trains normally."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW, FusedAccumSGD

STEPS = 4


def _model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batches(windows, poisoned=None):
    """Micro-batches; (window, micro_step, count) in ``poisoned`` puts ``count`` infs
    into that micro-batch's input, so that its gradients are not finite."""
    torch.manual_seed(8)
    batches = [[torch.randn(3, 6) for _ in range(STEPS)] for _ in range(windows)]
    if poisoned is not None:
        window, micro_step, count = poisoned
        batches[window][micro_step].view(-1)[:count] = math.inf
    return batches


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        i: {k: v.clone() for k, v in optimizer.state[p].items()}
        for i, p in enumerate(model.parameters())
    }
    return params, state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "optimizer_class", [FusedAccumSGD, FusedAccumAdamW], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("micro_step", range(STEPS))
@pytest.mark.parametrize("count", [1, 7], ids=["one-inf", "many-infs"])
def test_an_overflow_skips_the_whole_window(backend, optimizer_class, micro_step, count):
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update() every micro-step."""
    model, reference = _model(), _model()
    kwargs = dict(lr=0.05, accumulation_steps=STEPS, backend=backend)
    if optimizer_class is FusedAccumSGD:
        kwargs["momentum"] = 0.9
    optimizer = optimizer_class(model.parameters(), **kwargs)
    reference_optimizer = optimizer_class(reference.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    batches = _batches(3, poisoned=(1, micro_step, count))
    scales = []
    for window, micro_batches in enumerate(batches):
        if window == 2:
            after_skip = _snapshot(model, optimizer)
        for x in micro_batches:
            scaler.scale(model(x).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
        if window == 0:
            before_skip = _snapshot(model, optimizer)
        assert optimizer.last_step_applied == (window != 1)
    assert optimizer.update_count == 2
    # the poisoned window changed nothing, bit for bit; the scale backed off once
    for param, expected in zip(after_skip[0], before_skip[0], strict=True):
        assert torch.equal(param, expected)
    for index, state in before_skip[1].items():
        for key, value in state.items():
            assert torch.equal(after_skip[1][index][key], value), key
    assert scales.count(2.0**9) == len(scales) - (STEPS + micro_step)
    # and training goes on as if that window had never been: power-of-two loss scales
    # cancel exactly, so a run without a scaler that skips window 1 is the same
    for window in (0, 2):
        for x in batches[window]:
            reference(x).square().mean().backward()
            reference_optimizer.step()
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_classic_loop_with_scaler_equals_torch_optim():
    """Divide by N, scaler.step only at the boundary, accumulation_steps=1."""
    model, torch_model = _model(), _model()
    ours = FusedAccumSGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
    theirs = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    batches = [x for window in _batches(3, poisoned=(1, 2, 1)) for x in window]
    for net, optimizer in ((model, ours), (torch_model, theirs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for i, x in enumerate(batches):
            scaler.scale(net(x).square().mean() / STEPS).backward()
            if (i + 1) % STEPS == 0:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
    assert ours.update_count == 2  # the overflowing window reached our step(), which skipped it
    for param, expected in zip(model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_scaler_with_accumulate_in_backward_says_what_to_use():
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, accumulate_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 6)).sum()).backward()
    with pytest.raises(RuntimeError, match=r"cannot be used with accumulate_in_backward=True"):
        scaler.step(optimizer)


def test_an_overflow_in_progress_survives_a_checkpoint():
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=STEPS)
    scaler = torch.amp.GradScaler("cpu")
    x = _batches(1, poisoned=(0, 0, 1))[0][0]
    scaler.scale(model(x).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    resumed = FusedAccumSGD(_model().parameters(), lr=0.1, accumulation_steps=STEPS)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed._accumulation.overflowed and resumed.window_micro_steps == 1
