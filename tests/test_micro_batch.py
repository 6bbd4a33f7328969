"""The micro-batch in progress: its weight, checkpoints taken between a backward and its
step(), folds in backward that fail part-way, refused steps that must change nothing,
and windows whose weighted sum cancels exactly. Each test is a defect that the
property-based test (test_api_fuzz.py) found, in its smallest form."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD


def _reloaded(optimizer, make):
    """A new optimizer from ``make()``, loaded with ``optimizer``'s state dict through
    torch.save and torch.load."""
    file = io.BytesIO()
    torch.save(optimizer.state_dict(), file)
    file.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(file, weights_only=True))
    return fresh


def test_a_checkpoint_between_backward_and_step_keeps_the_weight():
    """accumulate_in_backward: backward has folded the weighted gradients, step() has
    not yet counted the weight; a checkpoint then must carry it."""
    param = torch.nn.Parameter(torch.ones(3))

    def make():
        return FusedAccumSGD(
            [param], lr=1.0, accumulation_steps=2, accumulate_in_backward=True, backend="torch"
        )

    optimizer = make()
    optimizer.set_weight(1)
    (param * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    optimizer.step()
    optimizer.set_weight(3)
    (param * 5).sum().backward()
    optimizer = _reloaded(optimizer, make)
    with pytest.raises(RuntimeError, match="call step"):
        optimizer.flush()  # the folded micro-batch is still waiting for its step()
    optimizer.step()
    # (1 * [1, 2, 3] + 3 * 5) / (1 + 3) = [4, 4.25, 4.5]
    torch.testing.assert_close(param.detach(), torch.tensor([-3.0, -3.25, -3.5]))


def test_a_checkpoint_keeps_the_weight_given_for_the_next_step():
    param = torch.nn.Parameter(torch.ones(2))

    def make():
        return FusedAccumSGD([param], lr=1.0, accumulation_steps=2, backend="torch")

    optimizer = make()
    param.grad = torch.tensor([2.0, 4.0])
    optimizer.step()
    optimizer.set_weight(3)
    optimizer = _reloaded(optimizer, make)
    param.grad = torch.tensor([6.0, 8.0])
    optimizer.step()
    # (2 + 3 * 6) / 4 = 5 and (4 + 3 * 8) / 4 = 7
    torch.testing.assert_close(param.detach(), torch.tensor([-4.0, -6.0]))


def test_a_refused_step_keeps_the_weight_and_the_gradients():
    param, other = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = FusedAccumSGD([param, other], lr=1.0, accumulation_steps=2, backend="torch")
    optimizer.set_weight(2)
    param.grad = torch.tensor([2.0, 4.0])
    other.grad = torch.zeros(2)
    other.grad.data = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="nothing was accumulated"):
        optimizer.step()
    assert optimizer.micro_step_count == 0 and param.grad is not None
    other.grad = None
    optimizer.step()
    assert optimizer.window_weight == 2.0
    param.grad = torch.tensor([5.0, 1.0])
    optimizer.step()
    # (2 * [2, 4] + [5, 1]) / 3 = [3, 3]
    torch.testing.assert_close(param.detach(), torch.tensor([-2.0, -2.0]))


def test_the_weight_of_a_folded_micro_batch_cannot_change():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = FusedAccumSGD(
        [param], lr=1.0, accumulation_steps=2, accumulate_in_backward=True, backend="torch"
    )
    optimizer.set_weight(2)
    param.sum().backward()
    optimizer.set_weight(2)  # the same weight again is harmless
    with pytest.raises(
        RuntimeError, match=r"with weight 2\.0; give the weight before its backward"
    ):
        optimizer.set_weight(3)
    optimizer.step()
    assert optimizer.window_weight == 2.0


def _two_layers():
    torch.manual_seed(3)
    return torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))


def test_a_fold_that_fails_after_others_ran_makes_the_window_be_discarded():
    """Backward stops at the hook that refuses a gradient, but the hooks before it have
    folded theirs: repeating the micro-batch would count them twice, so the optimizer
    refuses to go on until the window is discarded, and a checkpoint keeps that."""
    first, second = _two_layers()

    def make():
        return FusedAccumSGD(
            [first, second], lr=0.5, accumulation_steps=2, accumulate_in_backward=True,
            backend="torch",
        )  # fmt: skip

    optimizer = make()
    (first * 2).sum().backward()  # folded
    kept = second.data
    second.data = kept.double()  # cast behind the optimizer's back
    with pytest.raises(RuntimeError, match=r"already folded other gradients.*discard_window"):
        (second * 3).sum().backward()
    second.data, second.grad = kept, None
    for refused in (optimizer.step, optimizer.flush, (first * 2).sum().backward):
        with pytest.raises(RuntimeError, match="discard_window"):
            refused()
    optimizer = _reloaded(optimizer, make)
    with pytest.raises(RuntimeError, match="discard_window"):
        optimizer.step()
    assert first.grad is not None  # the refused gradient stayed where backward put it
    optimizer.discard_window()
    assert first.grad is None  # and goes with the micro-batch it belongs to
    start = (first.detach().clone(), second.detach().clone())
    for _ in range(2):  # the window again, whole
        ((first * 2).sum() + (second * 3).sum()).backward()
        optimizer.step()
    torch.testing.assert_close(first.detach(), start[0] - 0.5 * 2)
    torch.testing.assert_close(second.detach(), start[1] - 0.5 * 3)


def test_a_fold_that_fails_first_leaves_the_window_as_it_was():
    first, second = _two_layers()
    optimizer = FusedAccumSGD([first, second], lr=0.5, accumulate_in_backward=True, backend="torch")
    kept = second.data
    second.data = kept.double()
    with pytest.raises(RuntimeError, match="nothing was accumulated"):
        (second * 3).sum().backward()
    second.data, second.grad = kept, None
    start = second.detach().clone()
    (second * 3).sum().backward()
    optimizer.step()
    torch.testing.assert_close(second.detach(), start - 0.5 * 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer_class", [FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD])
def test_a_window_that_cancels_exactly_moves_nothing(backend, optimizer_class):
    """(1, g) then (2, -g/2): the weighted sum is exactly zero, and so must be the
    applied gradient, also when the last micro-step is fused into the update. Adam
    would turn a rounding remainder into a step of about lr."""
    torch.manual_seed(5)
    param = torch.nn.Parameter(torch.randn(1023))
    start = param.detach().clone()
    optimizer = optimizer_class([param], lr=0.01, accumulation_steps=2, backend=backend)
    grad = torch.randn(1023)
    param.grad = grad.clone()
    optimizer.step()
    param.grad = -grad / 2
    optimizer.step(weight=2)
    assert optimizer.update_count == 1
    if optimizer_class is FusedAccumAdamW:  # decoupled weight decay still applies
        start = start * (1 - 0.01 * 0.01)
    torch.testing.assert_close(param.detach(), start, rtol=0, atol=0)


def test_a_refused_step_registers_no_backward_hooks():
    """With accumulate_in_backward, step() hooks parameters unfrozen since; a step()
    refused for bad input must not do that either (found by test_api_fuzz.py)."""
    param = torch.nn.Parameter(torch.ones(3))
    param.requires_grad_(False)
    optimizer = FusedAccumSGD([param], lr=0.1, accumulate_in_backward=True, backend="torch")
    param.requires_grad_(True)
    param.grad = torch.zeros(3)
    param.grad.data = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="nothing was accumulated"):
        optimizer.step()
    param.grad = None
    (param * 2).sum().backward()
    assert param.grad is not None  # not folded: the hook comes with the next step()
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.8))
    (param * 2).sum().backward()
    assert param.grad is None  # folded by the hook step() registered


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight", [3.0, 0.1, 7.0])
def test_a_weighted_window_of_one_micro_step_applies_its_gradient_exactly(backend, weight):
    """With accumulation_steps=1 the weight cancels exactly (w * g / w would round
    twice): the update equals the unweighted one bit for bit on every backend, and
    torch.optim's on the reference."""
    torch.manual_seed(6)
    start = torch.randn(1023)
    grad = torch.randn(1023)
    results = []
    for given in (weight, 1.0):
        param = torch.nn.Parameter(start.clone())
        optimizer = FusedAccumSGD([param], lr=0.1, backend=backend)
        param.grad = grad.clone()
        optimizer.step(weight=given)
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    if backend == "torch":
        twin = torch.nn.Parameter(start.clone())
        twin.grad = grad.clone()
        torch.optim.SGD([twin], lr=0.1).step()
        torch.testing.assert_close(results[0], twin.detach(), rtol=0, atol=0)
