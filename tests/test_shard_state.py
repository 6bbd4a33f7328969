"""shard_state=True (ZeRO-1 on torch.distributed, gloo, CPU, 2 and 3 processes): each
rank keeps optimizer state for its chunk of every flat group, the window's buffers are
reduce-scattered and the parameters all-gathered, and the updates equal those of the
unsharded data parallel run (process_group alone): ragged weights, a parameter that
only one rank's micro-batches reach, bf16 parameters with master weights, a NaN on one
rank with loss scaling, clipping, gradient statistics, accumulate_in_backward. Bit for
bit at 2 ranks; at 3 the collectives may add an element's three terms in another order
(a ring sums each element starting from the rank that owns its chunk, and the chunks
of an all-reduce and of a reduce-scatter of a padded buffer differ), so there the
updates agree to a rounding. Clipping agrees to a rounding at any size: its norm is
summed over other pieces. The state dict is whole.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from process_groups import run_ranks

from fused_accum import FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD

# sizes that do not divide by 2 or 3; one channels_last parameter, one empty
SHAPES = [(7, 5), (1,), (300,), (0,), (2, 3, 2, 2), (33,)]
STEPS = 3
WINDOWS = 4
POISONED_WINDOW = 2
ONLY_RANK_0 = 1  # index of the parameter whose gradient only rank 0's micro-batches reach

CASES = {
    "adamw": (FusedAccumAdamW, dict(lr=0.01, weight_decay=0.05), torch.float32),
    "adam_amsgrad": (FusedAccumAdam, dict(lr=0.01, amsgrad=True), torch.float32),
    "sgd_nesterov": (
        FusedAccumSGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        torch.float32,
    ),
    # bf16 and fp32 parameters: two flat groups, each in chunks of its own
    "bf16_master": (FusedAccumAdamW, dict(lr=0.01, master_weights=True), "mixed"),
    "loss_scaling": (FusedAccumSGD, dict(lr=0.1, momentum=0.9, loss_scaling=True), torch.float32),
    "clipping": (FusedAccumAdamW, dict(lr=0.01, max_grad_norm=0.5), torch.float32),
    "stats": (FusedAccumAdamW, dict(lr=0.01, track_grad_stats=True), torch.float32),
}


def _params(dtype: torch.dtype | str) -> list[torch.Tensor]:
    """The parameters, in ``dtype``, or ``"mixed"``: bf16 and fp32 by turns."""
    generator = torch.Generator().manual_seed(0)
    dtypes = [dtype] * len(SHAPES)
    if dtype == "mixed":
        dtypes = [torch.bfloat16 if index % 2 else torch.float32 for index in range(len(SHAPES))]
    pairs = zip(SHAPES, dtypes, strict=True)
    params = [torch.randn(s, generator=generator).to(d) for s, d in pairs]
    params[4] = params[4].contiguous(memory_format=torch.channels_last)
    return [p.requires_grad_() for p in params]


def _micro_batches(world: int):
    """grads[window][micro_step][rank] (a list per parameter, None where no gradient)
    and their weights."""
    generator = torch.Generator().manual_seed(11)
    grads, weights = [], []
    for _ in range(WINDOWS):
        grads.append([[[torch.randn(s, generator=generator) for s in SHAPES]
                       for _ in range(world)] for _ in range(STEPS)])  # fmt: skip
        weights.append([[float(torch.randint(1, 9, (1,), generator=generator))
                         for _ in range(world)] for _ in range(STEPS)])  # fmt: skip
        for rank in range(1, world):
            for micro_step in range(STEPS):
                grads[-1][micro_step][rank][ONLY_RANK_0] = None
    return grads, weights


def _train(rank, world, optimizer, params, windows, *, micro_steps=range(STEPS)):
    grads, weights = _micro_batches(world)
    for window in windows:
        for micro_step in micro_steps:
            for param, grad in zip(params, grads[window][micro_step][rank], strict=True):
                param.grad = None if grad is None else grad.to(param.dtype)
            if optimizer.loss_scale is not None:
                for param in params:
                    if param.grad is not None:
                        param.grad *= optimizer.loss_scale.item()
                poisoned = window == POISONED_WINDOW and micro_step == 1
                if poisoned and rank == world - 1:
                    params[0].grad.view(-1)[3] = math.nan
            optimizer.step(weight=weights[window][micro_step][rank])


def _run(rank, world, name, shard_state, folder):
    cls, kwargs, dtype = CASES[name]
    params = _params(dtype)
    optimizer = cls(
        params, accumulation_steps=STEPS, process_group=dist.group.WORLD,
        shard_state=shard_state, **kwargs,
    )  # fmt: skip
    _train(rank, world, optimizer, params, range(WINDOWS))
    state_numel = sum(
        flat.numel() for group in optimizer._accumulation.groups.values()
        for flat in group.states.values()
    )  # fmt: skip
    state_dict = optimizer.state_dict()  # a collective with shard_state
    if shard_state and rank == 0:
        torch.save(state_dict, os.path.join(folder, f"{name}.pt"))
    return {
        "params": [p.detach().clone() for p in params],
        "state": state_dict["state"],
        "state_numel": state_numel,
        "loss_scale": None if optimizer.loss_scale is None else optimizer.loss_scale.item(),
        "stats": optimizer.grad_stats() if name == "stats" else None,
        "norms": (optimizer.micro_step_grad_norms(), optimizer.grad_norm_history())
        if name == "stats"
        else None,
    }


def _resume(rank, world, folder):
    """Save the whole state mid-window on every rank, load it into a fresh sharded
    optimizer, finish: the same parameters as the uninterrupted run."""
    cls, kwargs, dtype = CASES["adamw"]
    params = _params(dtype)
    group = dist.group.WORLD
    optimizer = cls(
        params, accumulation_steps=STEPS, process_group=group, shard_state=True, **kwargs
    )
    _train(rank, world, optimizer, params, [0, 1])
    _train(rank, world, optimizer, params, [2], micro_steps=[0])
    saved = optimizer.state_dict()
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(
        resumed_params, accumulation_steps=STEPS, process_group=group, shard_state=True,
        **kwargs,
    )  # fmt: skip
    resumed.load_state_dict(saved)
    _train(rank, world, resumed, resumed_params, [2], micro_steps=[1, 2])
    _train(rank, world, resumed, resumed_params, [3])
    return [p.detach().clone() for p in resumed_params]


def _in_backward(rank: int, shard_state: bool) -> list[torch.Tensor]:
    """A small model whose gradients are folded during backward (accumulate_in_backward)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = FusedAccumAdamW(
        model.parameters(), lr=0.01, accumulation_steps=STEPS, accumulate_in_backward=True,
        process_group=dist.group.WORLD, shard_state=shard_state,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(rank)
    for _ in range(WINDOWS * STEPS):
        model(torch.randn(4, 7, generator=generator)).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _errors() -> list[str]:
    group = dist.group.WORLD
    messages = []
    base = torch.zeros(4, 6)
    try:  # a view with gaps: its pieces would not be its own memory
        FusedAccumSGD([base[:, :3].requires_grad_()], lr=0.1, process_group=group,
                      shard_state=True)  # fmt: skip
    except ValueError as error:
        messages.append(str(error))
    params = [torch.ones(5, requires_grad=True)]
    optimizer = FusedAccumAdamW(params, process_group=group, shard_state=True)
    params[0].grad = torch.ones(5)
    optimizer.step()
    try:  # the chunks of state would move
        optimizer.add_param_group({"params": [torch.ones(3, requires_grad=True)]})
    except RuntimeError as error:
        messages.append(str(error))
    assert len(optimizer.param_groups) == 1  # refused before anything changed
    rank = dist.get_rank()
    try:  # ranks that would run different collectives at the boundary
        FusedAccumSGD([torch.ones(5, requires_grad=True)], lr=0.1, process_group=group,
                      shard_state=rank == 0)  # fmt: skip
    except ValueError as error:
        messages.append(str(error))
    return messages


def _worker(rank: int, world: int, folder: str) -> None:
    results = {}
    for name in CASES:
        results[name] = {
            "sharded": _run(rank, world, name, True, folder),
            "unsharded": _run(rank, world, name, False, folder),
        }
    results["resumed"] = _resume(rank, world, folder)
    results["in_backward"] = {
        "sharded": _in_backward(rank, True),
        "unsharded": _in_backward(rank, False),
    }
    results["errors"] = _errors()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


def _assert_equal(actual, expected, what, exact=True):
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if exact:
            assert torch.equal(a, e), f"{what}, parameter {index}: {(a - e).abs().max()}"
        else:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=f"{what}, {index}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_state_equals_the_unsharded_run(world, tmp_path):
    run_ranks(_worker, world, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in CASES:
        sharded, unsharded = ranks[0][name]["sharded"], ranks[0][name]["unsharded"]
        exact = world == 2 and name != "clipping"
        _assert_equal(sharded["params"], unsharded["params"], name, exact)
        for rank in range(1, world):  # every rank holds the same parameters, bit for bit
            _assert_equal(ranks[rank][name]["sharded"]["params"], sharded["params"], name)
        # the whole state, gathered: the same entries and values as unsharded
        assert sharded["state"].keys() == unsharded["state"].keys(), name
        for index, entries in unsharded["state"].items():
            assert sharded["state"][index].keys() == entries.keys(), (name, index)
            for key, value in entries.items():
                got = sharded["state"][index][key]
                assert got.shape == value.shape, (name, index, key)
                _assert_equal([got], [value], f"{name} state {index} {key}", exact)
        # each rank keeps 1/world of the state (every chunk aligned: a little padding)
        padding = world * 16 * 4 * len(SHAPES)
        assert sharded["state_numel"] * world <= unsharded["state_numel"] + padding, name
        assert sharded["state_numel"] < unsharded["state_numel"], name
    # the statistics of every rank's pieces, combined: the unsharded run's
    for rank in range(world):
        sharded, unsharded = ranks[rank]["stats"]["sharded"], ranks[rank]["stats"]["unsharded"]
        assert [row["name"] for row in sharded["stats"]] == [
            row["name"] for row in unsharded["stats"]
        ]
        for got, expected in zip(sharded["stats"], unsharded["stats"], strict=True):
            for key in ("mean_abs", "max_abs", "norm"):
                assert got[key] == pytest.approx(expected[key], rel=1e-6), (rank, got["name"])
        _assert_equal(sharded["norms"], unsharded["norms"], "norms", exact=False)
    # the NaN reached one rank only, and every rank skipped the window and backed off once
    for rank in range(world):
        assert ranks[rank]["loss_scaling"]["sharded"]["loss_scale"] == 2.0**15
    in_backward = ranks[0]["in_backward"]
    _assert_equal(in_backward["sharded"], in_backward["unsharded"], "in_backward", world == 2)
    for rank in range(world):
        _assert_equal(ranks[rank]["resumed"], ranks[0]["adamw"]["sharded"]["params"], "resumed")
    # the whole state loads where there is no process group, and into torch.optim
    saved = torch.load(tmp_path / "adamw.pt")
    for cls in (FusedAccumAdamW, torch.optim.AdamW):
        loaded = cls(_params(torch.float32), lr=0.01, weight_decay=0.05)
        loaded.load_state_dict(saved)
        for index, entries in saved["state"].items():
            for key, value in entries.items():
                assert torch.equal(loaded.state_dict()["state"][index][key], value), (cls, key)
    for rank in range(world):
        dense, moved, disagree = ranks[rank]["errors"]
        assert "non-contiguous view" in dense and "shard_state" in dense
        assert "Add every param group before the first update" in moved
        assert "ranks disagree on shard_state: rank 0 has True, rank 1 has False" in disagree


def test_shard_state_needs_a_process_group():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="pass process_group too"):
        FusedAccumAdamW(params, shard_state=True)
    with pytest.raises(ValueError, match="stochastic_rounding does not work with shard_state"):
        FusedAccumSGD(params, lr=0.1, shard_state=True, process_group=object(),
                      stochastic_rounding=True)  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint_partial_windows does not work with proc"):
        FusedAccumSGD(params, lr=0.1, process_group=object(), checkpoint_partial_windows=True)


def _one_rank_worker(rank: int, world: int, folder: str) -> None:
    results = [_run(0, 1, "adamw", shard_state, folder) for shard_state in (True, False)]
    torch.save(results, os.path.join(folder, "one_rank.pt"))


def test_shard_state_on_one_rank_is_the_unsharded_run(tmp_path):
    """Nothing to shard over one rank: the same script runs on one GPU."""
    run_ranks(_one_rank_worker, 1, tmp_path)
    sharded, unsharded = torch.load(tmp_path / "one_rank.pt")
    _assert_equal(sharded["params"], unsharded["params"], "one rank")
    assert sharded["state_numel"] == unsharded["state_numel"]
