"""Adam's step counts: each parameter's ``state["step"]`` is a 0-dim view of one count
tensor per (device, dtype) group, so that a window's batch of consecutive parameters
advances its counts with one add. The counts must still follow torch.optim exactly
where a window leaves parameters out, across param groups added later, and through a
state dict."""

from __future__ import annotations

import copy

import pytest
import torch

from fused_accum import FusedAccumAdamW

SHAPES = [(3,), (2, 2), (5,), (1,), (4,)]


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


def _steps(optimizer, params):
    return [float(optimizer.state[p]["step"]) if "step" in optimizer.state[p] else 0.0
            for p in params]  # fmt: skip


# which parameters get a gradient in each window: all, some with gaps, all again
WINDOWS = [[0, 1, 2, 3, 4], [0, 2, 4], [1, 3], [0, 1, 2, 3, 4], [4], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("loss_scaling", [False, True], ids=["host counts", "device counts"])
def test_counts_follow_torch_when_windows_leave_parameters_out(loss_scaling):
    ours, theirs = _params(), _params()
    groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.02}]  # noqa: E731
    optimizer = FusedAccumAdamW(
        groups(ours), lr=0.01, accumulation_steps=2, loss_scaling=loss_scaling
    )
    reference = torch.optim.AdamW(groups(theirs), lr=0.01)
    for members in WINDOWS:
        for _ in range(2):
            for index in members:
                ours[index].grad = torch.ones(SHAPES[index])
            optimizer.step()
        for index in members:
            theirs[index].grad = torch.ones(SHAPES[index])
        reference.step()
        reference.zero_grad()
        assert _steps(optimizer, ours) == _steps(reference, theirs)
    # the property the one add relies on: the counts of a group share a tensor
    storages = {optimizer.state[p]["step"].untyped_storage().data_ptr() for p in ours}
    assert len(storages) == 1
    assert all(optimizer.state[p]["step"].dim() == 0 for p in ours)


def test_counts_survive_a_param_group_added_later():
    params = _params()
    optimizer = FusedAccumAdamW([{"params": params[:2]}], lr=0.01)
    for _ in range(3):
        for param in params[:2]:
            param.grad = torch.ones_like(param)
        optimizer.step()
    optimizer.add_param_group({"params": params[2:]})  # the group's counts grow
    for _ in range(2):
        for param in params:
            param.grad = torch.ones_like(param)
        optimizer.step()
    assert _steps(optimizer, params) == [5.0, 5.0, 2.0, 2.0, 2.0]
    storages = {optimizer.state[p]["step"].untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1  # the old views were rebound to the grown counts


def test_loaded_counts_advance_and_a_saved_dict_keeps_its_values():
    params = _params()
    optimizer = FusedAccumAdamW(params, lr=0.01)
    torch_params = _params()
    reference = torch.optim.AdamW(torch_params, lr=0.01)
    for count in range(4):
        for index, param in enumerate(torch_params):
            if index <= count:
                param.grad = torch.ones_like(param)
        reference.step()
        reference.zero_grad()
    optimizer.load_state_dict(reference.state_dict())
    assert _steps(optimizer, params) == [4.0, 3.0, 2.0, 1.0, 0.0]
    saved = copy.deepcopy(optimizer.state_dict())
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert _steps(optimizer, params) == [5.0, 4.0, 3.0, 2.0, 1.0]
    optimizer.load_state_dict(saved)  # back: the counts are written into the views
    assert _steps(optimizer, params) == [4.0, 3.0, 2.0, 1.0, 0.0]
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert _steps(optimizer, params) == [5.0, 4.0, 3.0, 2.0, 1.0]
