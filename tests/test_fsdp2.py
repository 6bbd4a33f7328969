"""FSDP2 (``fully_shard``) models with the fused_accum optimizers, on CPU with gloo:
each rank accumulates and updates its shards, and the result equals torch.optim's on
the same FSDP2 model with its classic loop (the loss divided by the micro-step count,
FSDP2 accumulating into ``.grad``). Layer sizes are not divisible by the world size,
so shards are uneven, and with 3 ranks one is empty."""

from __future__ import annotations

import pytest
import torch
from process_groups import run_ranks

from fused_accum import FusedAccumAdamW, FusedAccumSGD

STEPS = 3
WINDOWS = 3
OPTIMIZERS = {
    "adamw": (FusedAccumAdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.05)),
    "sgd": (FusedAccumSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
}
CLIP = 0.05  # below the windows' gradient norms (about 0.1 to 0.4): every window clips


def _model(mixed: bool = False) -> torch.nn.Module:
    """Sharded per Linear and at the root; ``mixed``: bf16 compute, fp32 reductions
    (the sharded parameters stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
        torch.nn.Linear(4, 1),
    )  # fmt: skip
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def _bf16_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same values twice: sharded in bf16 (computing and reducing in bf16), and
    sharded in fp32 computing and reducing in bf16, the classic recipe whose fp32
    parameters master weights stand for."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    models = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
            torch.nn.Linear(4, 1),
        ).to(torch.bfloat16).to(dtype)  # fmt: skip
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mp_policy=policy)
        models.append(fully_shard(model, mp_policy=policy))
    return models[0], models[1]


def _batch(rank: int, window: int, micro_step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * window + 10 * micro_step + rank)
    return torch.randn(6, 7, generator=generator)


def _train(
    model,
    optimizer,
    rank: int,
    ours: bool,
    no_sync: bool,
    clip: bool = False,
    mixed: bool = False,
    record: list | None = None,
) -> None:
    """WINDOWS windows of STEPS micro-batches: ours steps at each; torch.optim's classic
    loop divides the loss by STEPS (with bf16 compute: the fp32 gradients' sum, as
    rounding bf16 gradients of the divided loss would differ) and steps once.
    ``record``: receives the classic loop's whole ``.grad`` after each micro-step of
    the last window."""
    for window in range(WINDOWS):
        for micro_step in range(STEPS):
            if no_sync:
                model.set_requires_gradient_sync(micro_step == STEPS - 1)
            loss = model(_batch(rank, window, micro_step)).square().mean()
            if ours:
                loss.backward()
                optimizer.step()
            elif mixed:
                loss.backward()
            else:
                (loss / STEPS).backward()
            if record is not None and window == WINDOWS - 1:
                record.append([param.grad.full_tensor() for param in model.parameters()])
        if not ours:
            if mixed:
                for param in model.parameters():
                    param.grad.div_(STEPS)
            if clip:  # on the DTensor gradients: one all-reduce of the norm
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                assert norm.full_tensor() > CLIP
            optimizer.step()
            optimizer.zero_grad()


def _worker(
    rank: int,
    world: int,
    folder: str,
    name: str,
    no_sync: bool = False,
    clip: bool = False,
    in_backward: bool = False,
    mixed: bool = False,
    stats: bool = False,
    master: bool = False,
) -> None:
    ours_class, torch_class, kwargs = OPTIMIZERS[name]
    model, reference = _bf16_models() if master else (_model(mixed), _model(mixed))
    mixed = mixed or master  # the classic loop sums bf16 gradients in fp32 .grad
    options = {"max_grad_norm": CLIP} if clip else {}
    if master:
        options["master_weights"] = True
    if in_backward:  # FSDP2 runs the hooks once it has reduce-scattered a gradient
        options["accumulate_in_backward"] = True
    if stats:
        options["track_grad_stats"] = True
    optimizer = ours_class(model.parameters(), accumulation_steps=STEPS, **options, **kwargs)
    expected = torch_class(reference.parameters(), **kwargs)
    _train(model, optimizer, rank, ours=True, no_sync=no_sync)
    record: list = []
    _train(
        reference, expected, rank, ours=False, no_sync=no_sync, clip=clip, mixed=mixed,
        record=record if stats else None,
    )  # fmt: skip
    assert optimizer.update_count == WINDOWS
    if stats:
        _check_stats(optimizer, record)
    for (key, param), other in zip(model.named_parameters(), reference.parameters(), strict=True):
        if master:  # the fp32 masters follow the fp32 parameters; bf16 rounds them
            master_param = optimizer.state[param]["master_param"].full_tensor()
            torch.testing.assert_close(
                master_param, other.full_tensor(), rtol=1e-5, atol=1e-6, msg=key
            )
            assert torch.equal(param.full_tensor(), master_param.bfloat16()), key
        else:
            torch.testing.assert_close(
                param.full_tensor(), other.full_tensor(), rtol=1e-5, atol=1e-6, msg=key
            )
        # the state is shown sharded as torch.optim shows its own (for DCP)
        for state_name, value in optimizer.state[param].items():
            if value.dim():
                assert tuple(value.placements) == tuple(param.placements), state_name
                assert value.shape == param.shape, state_name


def _check_stats(optimizer, record: list) -> None:
    """The statistics of the last window and its micro-steps, every rank's shards
    combined, against the classic loop's whole gradients: ``.grad`` after the last
    micro-step is the window's mean, and each micro-step added its gradient / STEPS."""
    mean = record[-1]
    rows = optimizer.grad_stats()
    assert len(rows) == len(mean)
    for row, gradient in zip(rows, mean, strict=True):
        expected = {
            "mean_abs": gradient.abs().mean().item(),
            "max_abs": gradient.abs().max().item(),
            "norm": gradient.norm().item(),
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (row["name"], key)
    whole = torch.cat([gradient.flatten() for gradient in mean])
    history = optimizer.grad_norm_history()
    assert history[-1].item() == pytest.approx(whole.norm().item(), rel=1e-5)
    previous = [torch.zeros_like(gradient) for gradient in mean]
    expected_norms = []
    for after in record:
        step = torch.cat([(a - b).flatten() for a, b in zip(after, previous, strict=True)])
        expected_norms.append(step.norm() * STEPS)
        previous = after
    torch.testing.assert_close(
        optimizer.micro_step_grad_norms(), torch.stack(expected_norms), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_equals_torch_optim_on_the_same_model(world, name, tmp_path):
    run_ranks(_worker, world, tmp_path, name)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_clipping_equals_clip_grad_norm(world, tmp_path):
    """max_grad_norm's norm covers every rank's shards, as clip_grad_norm_ on the
    DTensor gradients does."""
    run_ranks(_worker, world, tmp_path, "sgd", clip=True)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_with_bf16_compute_and_fp32_reductions(world, tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards and
    gradients reach the optimizer."""
    run_ranks(_worker, world, tmp_path, "adamw", mixed=True)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_gradient_statistics_cover_every_shard(world, tmp_path):
    """track_grad_stats: each rank's shard statistics combined, equal to those of the
    whole gradients."""
    run_ranks(_worker, world, tmp_path, "adamw", stats=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_with_bf16_parameters_and_master_weights(name, tmp_path):
    """bf16 shards with fp32 masters: the masters follow torch.optim's fp32 parameters
    sharded beside them (both computing and reducing in bf16), the shards are the
    masters rounded."""
    run_ranks(_worker, 2, tmp_path, name, master=True)


def test_fsdp2_with_accumulate_in_backward(tmp_path):
    run_ranks(_worker, 2, tmp_path, "adamw", in_backward=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["adamw"])
def test_fsdp2_without_gradient_sync_between_boundaries(name, world, tmp_path):
    """``set_requires_gradient_sync(False)`` on non-boundary micro-steps: FSDP2 keeps the
    sum of the window's gradients and hands it over at the boundary, whose mean the
    optimizer applies (unit weights)."""
    run_ranks(_worker, world, tmp_path, name, no_sync=True)


def _partial_window(model, optimizer, rank: int, micro_steps) -> None:
    """Micro-steps of the window after the WINDOWS that _train runs."""
    for micro_step in micro_steps:
        model(_batch(rank, WINDOWS, micro_step)).square().mean().backward()
        optimizer.step()


def _whole_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Parameters, optimizer state and (mid-window) the window's sums, whole: DCP's
    view of them, through collectives (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    whole = {f"{key}.param": param.full_tensor() for key, param in model.named_parameters()}
    for key, entries in get_optimizer_state_dict(model, optimizer)["state"].items():
        for name, value in entries.items():
            is_dtensor = isinstance(value, torch.Tensor) and value.dim()
            whole[f"{key}.{name}"] = value.full_tensor() if is_dtensor else torch.tensor(value)
    return whole


def _checkpoint_worker(rank: int, world: int, folder: str, phase: str, partial: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _model()
    optimizer = FusedAccumAdamW(
        model.parameters(), lr=0.02, accumulation_steps=STEPS,
        checkpoint_partial_windows=partial,
    )  # fmt: skip
    if phase == "save":
        _train(model, optimizer, rank, ours=True, no_sync=False)
        if partial:  # and the next window's first micro-step
            _partial_window(model, optimizer, rank, [0])
    # an optimizer without state gets it here (DCP's dummy step, recognised)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    if phase == "save":
        dcp.save(state, checkpoint_id=f"{folder}/checkpoint")
    else:
        dcp.load(state, checkpoint_id=f"{folder}/checkpoint")
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    assert optimizer.window_micro_steps == int(partial)
    whole = _whole_state(model, optimizer)
    if partial and world == 2:  # the window finished, as if nothing had happened
        _partial_window(model, optimizer, rank, range(1, STEPS))
        assert optimizer.last_step_applied
        whole.update({f"after.{k}": v for k, v in _whole_state(model, optimizer).items()})
    if rank == 0:
        if phase == "save":
            torch.save(whole, f"{folder}/whole.pt")
        else:
            saved = torch.load(f"{folder}/whole.pt")
            if world != 2:
                saved = {k: v for k, v in saved.items() if not k.startswith("after.")}
            assert saved.keys() == whole.keys()
            for key, value in whole.items():
                assert torch.equal(value, saved[key]), key


@pytest.mark.filterwarnings("ignore")
def test_a_dcp_checkpoint_loads_bit_for_bit_into_another_world_size(tmp_path):
    """Saved by 2 ranks at a window boundary, loaded by 3: parameters, moments and
    step counts equal, whole, bit for bit."""
    run_ranks(_checkpoint_worker, 2, tmp_path, "save", partial=False)
    run_ranks(_checkpoint_worker, 3, tmp_path, "load", partial=False)


@pytest.mark.filterwarnings("ignore")
def test_a_dcp_checkpoint_mid_window_resumes_bit_for_bit(tmp_path):
    """With checkpoint_partial_windows: saved by 2 ranks after a window's first
    micro-step; loaded by 3, the window's sums too are equal, whole, bit for bit;
    loaded by 2, the window finishes as the run that saved finished it, bit for bit.
    (At 3 ranks a micro-batch is split otherwise, so its gradients differ by a
    rounding: FSDP2 averages the ranks' gradients.)"""
    run_ranks(_checkpoint_worker, 2, tmp_path, "save", partial=True)
    for world in (3, 2):
        run_ranks(_checkpoint_worker, world, tmp_path, "load", partial=True)


def _no_sync_checkpoint_worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model()
    optimizer = FusedAccumAdamW(
        model.parameters(), accumulation_steps=STEPS, checkpoint_partial_windows=True
    )
    model.set_requires_gradient_sync(False)  # the window's sum stays FSDP2's
    model(_batch(rank, 0, 0)).square().mean().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"FSDP2 without gradient sync keeps them"):
        get_optimizer_state_dict(model, optimizer)


@pytest.mark.filterwarnings("ignore")
def test_a_dcp_checkpoint_mid_window_without_gradient_sync_is_refused(tmp_path):
    """The window is in FSDP2's unsharded gradients, which DCP does not save."""
    run_ranks(_no_sync_checkpoint_worker, 2, tmp_path)


def _weight_worker(rank: int, world: int, folder: str) -> None:
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=STEPS)
    model(_batch(rank, 0, 0)).sum().backward()
    with pytest.raises(ValueError, match="weigh the loss instead"):
        optimizer.step(weight=2.0)
    assert all(p.grad is not None for p in model.parameters())  # nothing taken
    optimizer.step()
    assert optimizer._accumulation.window_micro_steps == 1


def test_micro_batch_weights_are_refused_with_fsdp2(tmp_path):
    run_ranks(_weight_worker, 2, tmp_path)


def _poison_worker(rank: int, world: int, folder: str) -> None:
    model = _model()
    optimizer = FusedAccumAdamW(
        model.parameters(), lr=0.02, accumulation_steps=STEPS, loss_scaling=True
    )
    last = list(model.parameters())[-2]  # the last layer's weight: (1, 4), on rank 0 only
    for window in range(2):
        start = [p.full_tensor() for p in model.parameters()]
        scale = float(optimizer.loss_scale)
        for micro_step in range(STEPS):
            loss = model(_batch(rank, window, micro_step)).square().mean()
            optimizer.scale_loss(loss).backward()
            if window == 1 and micro_step == 1 and last.grad.to_local().numel():
                last.grad.to_local()[0, 0] = float("nan")  # one shard of one rank
            optimizer.step()
        after = [p.full_tensor() for p in model.parameters()]
        moved = any(not torch.equal(a, b) for a, b in zip(start, after, strict=True))
        assert moved == (window == 0), (rank, window)  # skipped on every rank
        assert float(optimizer.loss_scale) == (scale if window == 0 else scale / 2)


def test_a_nan_in_one_shard_skips_the_window_on_every_rank(tmp_path):
    run_ranks(_poison_worker, 2, tmp_path)
