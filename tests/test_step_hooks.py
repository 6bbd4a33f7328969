"""torch.optim's step machinery around a micro-step: step hooks run at every step()
call, the profiler sees a range per call, and an LR scheduler sees the optimizer step.
(Without hooks or a profiler, step() skips torch's wrapper: about 7 us a micro-step.)"""

from __future__ import annotations

import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fused_accum import FusedAccumSGD


def _optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    return param, FusedAccumSGD([param], lr=0.1, accumulation_steps=2)


def test_step_hooks_run_at_every_micro_step():
    param, optimizer = _optimizer()
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
    assert calls == ["pre", "post"] * 3
    assert optimizer.update_count == 1


def test_a_global_step_hook_runs_too():
    param, optimizer = _optimizer()
    calls = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append(type(opt).__name__)
    )
    try:
        param.grad = torch.ones(3)
        optimizer.step()
    finally:
        handle.remove()
    assert calls == ["FusedAccumSGD"]


def test_the_profiler_sees_each_micro_step():
    param, optimizer = _optimizer()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(2):
            param.grad = torch.ones(3)
            optimizer.step()
    names = [event.name for event in profile.events()]
    assert names.count("Optimizer.step#FusedAccumSGD.step") == 2


def test_an_lr_scheduler_sees_the_optimizer_step():
    param, optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            param.grad = torch.ones(3)
            optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.05
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.9))
