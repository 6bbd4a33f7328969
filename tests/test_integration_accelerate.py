"""fused_accum in a Hugging Face Accelerate loop (the README's recipe), on a tiny random
model on CPU, gradient_accumulation_steps=4: Accelerate's window, loss division and
scheduler, with the optimizer's fp32 accumulation and clipping. Held against an fp64
reference (fp32 parameters) and against ideal fp32 accumulation of the bf16 gradients
(bf16 parameters), which accumulating in bf16 ``.grad`` misses."""

from __future__ import annotations

import types

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from readme_recipes import run_recipe  # noqa: E402
from trainer_cases import (  # noqa: E402
    BATCH,
    CLIP,
    LR,
    MLP,
    UPDATES,
    ListDataset,
    N,
    bf16_ideal,
    check_fp32_run,
    fp64_reference,
    linear,
    make_data,
    model,
    moved_off,
    snapshot,
    token_loss,
    windows_of,
)

from fused_accum import FusedAccumAdamW  # noqa: E402
from fused_accum.integrations import unwrap_optimizer  # noqa: E402
from fused_accum.integrations.accelerate import check_accelerate_setup  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
LINEAR = [LR * (UPDATES - k) / UPDATES for k in range(UPDATES)]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps its state in process-wide singletons: each test its own."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _train(net, optimizer, clip_in_loop=False, linear=True):
    """The recipe's loop, with a linear schedule (else a constant one); returns the
    micro-batches seen and the logged norms."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=N, cpu=True)
    factor = (lambda k: (UPDATES - k) / UPDATES) if linear else (lambda k: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = torch.utils.data.DataLoader(
        ListDataset(make_data(N * BATCH * UPDATES)), batch_size=BATCH
    )
    net, optimizer, loader, schedule = accelerator.prepare(net, optimizer, loader, schedule)
    check_accelerate_setup(accelerator, optimizer)
    seen, norms = [], []
    for batch in loader:
        with accelerator.accumulate(net):
            seen.append((batch["x"], batch["labels"]))
            accelerator.backward(token_loss(net.logits(batch["x"]), batch["labels"]))
            if clip_in_loop and accelerator.sync_gradients:  # the classic recipe's clipping
                accelerator.clip_grad_norm_(net.parameters(), CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        inner = unwrap_optimizer(optimizer)
        if accelerator.sync_gradients and inner.grad_norm is not None:
            norms.append(float(inner.grad_norm))
    return seen, norms


def test_an_accelerate_loop_with_fused_accum_equals_exact_accumulation():
    net = model()
    init = snapshot(net)
    optimizer = FusedAccumAdamW(
        net.parameters(), lr=LR, weight_decay=0.0, accumulate_in_backward=True,
        max_grad_norm=CLIP, backend="torch",
    )  # fmt: skip
    seen, norms = _train(net, optimizer)
    assert optimizer.update_count == UPDATES
    expected, true_norms = fp64_reference(
        init, windows_of(seen), mode="mean_of_means", clip=CLIP, lrs=LINEAR
    )
    assert moved_off(snapshot(net), expected, init) < 1e-5
    assert norms == pytest.approx(true_norms, rel=1e-5)


def _bf16_distance(in_backward: bool) -> float:
    net = model(torch.bfloat16)
    init = snapshot(net)
    optimizer = FusedAccumAdamW(
        net.parameters(), lr=LR, weight_decay=0.0, accumulate_in_backward=in_backward,
        max_grad_norm=CLIP if in_backward else None, backend="torch",
    )  # fmt: skip
    seen, _ = _train(net, optimizer, clip_in_loop=not in_backward, linear=False)
    ideal = bf16_ideal(init, windows_of(seen), mode="mean_of_means", clip=CLIP)
    return moved_off(snapshot(net), ideal, init)


def test_bf16_parameters_get_exact_fp32_accumulation():
    assert _bf16_distance(in_backward=True) < 1e-3
    # the test tells them apart: autograd summing in bf16 .grad is far off the ideal
    assert _bf16_distance(in_backward=False) > 1e-3


def test_misconfigurations_are_refused():
    net = model()
    optimizer = FusedAccumAdamW(net.parameters(), accumulate_in_backward=True, accumulation_steps=N)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps\)=4 and the optimizer's"):
        _train(net, optimizer)
    # fp16's GradScaler (on a GPU) cannot check gradients folded in backward
    fp16 = types.SimpleNamespace(gradient_accumulation_steps=N, scaler=object(), num_processes=1)
    optimizer = FusedAccumAdamW(net.parameters(), accumulate_in_backward=True)
    with pytest.raises(ValueError, match=r"GradScaler, which cannot check gradients"):
        check_accelerate_setup(fp16, optimizer)
    # under DDP (accelerate launch on 2 processes) each rank would fold its own gradients
    ddp = types.SimpleNamespace(gradient_accumulation_steps=N, scaler=None, num_processes=2)
    with pytest.raises(ValueError, match=r"Accelerator.num_processes: 2 data-parallel proc"):
        check_accelerate_setup(ddp, optimizer)
    check_accelerate_setup(ddp, FusedAccumAdamW(net.parameters()))  # DDP averages .grad


def test_token_weights_with_windows_the_optimizer_owns():
    """The exact token mean over a window whose micro-batches hold different token
    counts: Accelerate does not accumulate, the optimizer does (accumulation_steps=4),
    each micro-batch weighted by its tokens; the scheduler steps only when an update
    was applied."""
    net = model()
    init = snapshot(net)
    optimizer = FusedAccumAdamW(
        net.parameters(), lr=LR, weight_decay=0.0, accumulate_in_backward=True,
        accumulation_steps=N, max_grad_norm=CLIP, backend="torch",
    )  # fmt: skip
    accelerator = accelerate.Accelerator(cpu=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (UPDATES - k) / UPDATES)
    loader = torch.utils.data.DataLoader(
        ListDataset(make_data(N * BATCH * UPDATES)), batch_size=BATCH
    )
    net, optimizer, loader, schedule = accelerator.prepare(net, optimizer, loader, schedule)
    check_accelerate_setup(accelerator, optimizer)
    inner, seen = unwrap_optimizer(optimizer), []
    for batch in loader:
        seen.append((batch["x"], batch["labels"]))
        inner.set_weight(int(batch["labels"].ne(-100).sum()))  # before its backward
        accelerator.backward(token_loss(net.logits(batch["x"]), batch["labels"]))
        optimizer.step()
        if inner.last_step_applied:
            schedule.step()
    assert inner.update_count == UPDATES
    expected, _ = fp64_reference(init, windows_of(seen), mode="tokens", clip=CLIP, lrs=LINEAR)
    assert moved_off(snapshot(net), expected, init) < 1e-5


class LossModel(MLP):
    """``model(**batch).loss`` is the batch's token mean, as the README's recipes take
    it. Records what it trains on."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.seen: list = []

    def forward(self, x, labels):
        if torch.is_grad_enabled():
            self.seen.append((x.detach().cpu(), labels.detach().cpu()))
        return types.SimpleNamespace(loss=token_loss(self.logits(x), labels))


@pytest.mark.parametrize("name", ["accelerate", "accelerate-tokens"])
def test_the_readme_recipes(name):
    """The README's recipes as written, on LossModel and 20 batches of 2 (inputs large
    enough that most windows clip at the recipes' 1.0)."""
    net = LossModel()
    init = snapshot(net)
    loader = torch.utils.data.DataLoader(
        ListDataset(make_data(N * BATCH * UPDATES, scale=100)), batch_size=BATCH
    )
    ran = run_recipe(name, model=net, loader=loader)
    optimizer = unwrap_optimizer(ran["optimizer"])
    window = ran["accelerator"].gradient_accumulation_steps * optimizer.accumulation_steps
    assert optimizer.update_count == ran["updates"] == UPDATES
    norms = check_fp32_run(
        snapshot(net), init, windows_of(net.seen, window),
        mode="tokens" if name.endswith("tokens") else "mean_of_means",
        clip=optimizer.max_grad_norm, lrs=linear(optimizer.defaults["lr"], UPDATES),
        weight_decay=optimizer.defaults["weight_decay"],
    )  # fmt: skip
    assert max(norms) > optimizer.max_grad_norm  # the clipping mattered
    assert float(optimizer.grad_norm) == pytest.approx(norms[-1], rel=1e-5)
    if name == "accelerate":
        assert ran["grad_norm"] is optimizer.grad_norm
