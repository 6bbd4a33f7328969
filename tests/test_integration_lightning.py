"""fused_accum in PyTorch Lightning (fused_accum.integrations.lightning), on a tiny
random model on CPU, accumulate_grad_batches=4: Lightning's window, loss division and
per-step schedule, with the optimizer's fp32 accumulation and clipping. Held against an
fp64 reference (fp32 parameters) and against ideal fp32 accumulation of the bf16
gradients (precision="bf16-true"), which accumulating in bf16 ``.grad`` misses."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

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
    moved_off,
    snapshot,
    token_loss,
    windows_of,
)

from fused_accum import FusedAccumAdamW  # noqa: E402
from fused_accum.integrations import unwrap_optimizer  # noqa: E402
from fused_accum.integrations.lightning import FusedAccumCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
LINEAR = [LR * (UPDATES - k) / UPDATES for k in range(UPDATES)]


class ListLogger(pl.loggers.Logger):
    """Keeps what is logged, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))


class Model(pl.LightningModule):
    """The user's module of the README's recipes: the per-batch token mean as the loss
    (Lightning divides it by the window length). Records what it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP()
        self.seen: list = []

    def training_step(self, batch, index):
        self.seen.append((batch["x"].detach().cpu(), batch["labels"].detach().cpu()))
        return token_loss(self.net.logits(batch["x"]), batch["labels"])


class Module(Model):
    """With fused_accum's AdamW (``optimizer_options``) and a linear schedule stepped per
    update."""

    def __init__(self, **optimizer_options) -> None:
        super().__init__()
        self.options = optimizer_options

    def configure_optimizers(self):
        options = {"accumulate_in_backward": True, "backend": "torch", **self.options}
        optimizer = FusedAccumAdamW(self.parameters(), lr=LR, weight_decay=0.0, **options)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (UPDATES - k) / UPDATES)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(module, precision="32-true", **trainer_options):
    logger = ListLogger()
    settings = dict(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=N,
        gradient_clip_val=CLIP, logger=logger, log_every_n_steps=1, precision=precision,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FusedAccumCallback()],
    )  # fmt: skip
    settings.update(trainer_options)
    trainer = pl.Trainer(**settings)
    trainer.fit(module, _loader())
    return trainer, logger


def _loader(scale: float = 1.0):
    data = ListDataset(make_data(N * BATCH * UPDATES, scale=scale))
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def test_lightning_with_fused_accum_equals_exact_accumulation():
    module = Module()
    init = snapshot(module.net)
    trainer, logger = _fit(module)
    optimizer = unwrap_optimizer(trainer.optimizers[0])
    assert optimizer.update_count == UPDATES  # one step per window
    assert optimizer.max_grad_norm == CLIP  # gradient_clip_val, routed
    expected, norms = fp64_reference(
        init, windows_of(module.seen), mode="mean_of_means", clip=CLIP, lrs=LINEAR
    )
    assert moved_off(snapshot(module.net), expected, init) < 1e-5
    logged = [float(row["grad_norm"]) for row in logger.rows if "grad_norm" in row]
    assert logged == pytest.approx(norms, rel=1e-5)


def _bf16_distance(**optimizer_options) -> float:
    module = Module(**optimizer_options)
    module.configure_optimizers = _constant_lr(module)
    _fit(module, precision="bf16-true")
    assert next(module.net.parameters()).dtype == torch.bfloat16
    init = {k: v.bfloat16() for k, v in _initial_state().items()}
    ideal = bf16_ideal(init, windows_of(module.seen), mode="mean_of_means", clip=CLIP)
    return moved_off(snapshot(module.net), ideal, init)


def _initial_state():
    torch.manual_seed(0)
    return snapshot(MLP())


def _constant_lr(module):
    def configure_optimizers():
        options = {"accumulate_in_backward": True, "backend": "torch", **module.options}
        return FusedAccumAdamW(module.parameters(), lr=LR, weight_decay=0.0, **options)

    return configure_optimizers


def test_bf16_parameters_get_exact_fp32_accumulation():
    assert _bf16_distance() < 1e-3
    # the test tells them apart: autograd summing in bf16 .grad is far off the ideal
    assert _bf16_distance(accumulate_in_backward=False) > 1e-3


def test_accumulating_twice_and_clipping_by_value_are_refused():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches\)=4 and the optimizer's"):
        _fit(Module(accumulation_steps=N))
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='value' cannot be applied"):
        _fit(Module(), gradient_clip_algorithm="value")


def test_a_second_fit_clips_too():
    """The callback holds gradient_clip_val only for the length of a fit."""
    trainer, _ = _fit(Module())
    assert trainer.gradient_clip_val == CLIP  # put back
    trainer.fit_loop.max_epochs = 2
    module = Module()
    trainer.fit(module, _loader())
    optimizer = unwrap_optimizer(trainer.optimizers[0])
    assert optimizer.update_count > 0 and optimizer.max_grad_norm == CLIP  # the new fit's


class TorchModule(Module):
    """torch.optim's AdamW with the same schedule."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (UPDATES - k) / UPDATES)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("in_backward", [True, False])
def test_bf16_mixed_precision_with_clipping(in_backward):
    """Lightning refuses its own clipping for optimizers that unscale themselves, as ours
    say they do (without accumulate_in_backward too, where autograd sums .grad); the
    callback has the optimizer clip instead, as Lightning clips for torch.optim."""
    ours = Module(accumulate_in_backward=in_backward)
    trainer, _ = _fit(ours, precision="bf16-mixed")
    optimizer = unwrap_optimizer(trainer.optimizers[0])
    assert optimizer.update_count == UPDATES and optimizer.max_grad_norm == CLIP
    theirs = TorchModule()
    _fit(theirs, precision="bf16-mixed", callbacks=[])
    for name, value in snapshot(theirs.net).items():
        torch.testing.assert_close(snapshot(ours.net)[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lightning", "lightning-tokens"])
def test_the_readme_recipes(name, tmp_path, monkeypatch):
    """The README's recipes as written (3 epochs of 20 batches of 2, inputs large enough
    that most windows clip at the recipes' 1.0), on Model and Lightning's defaults."""
    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints
    init = snapshot(Model().net)
    trainer = run_recipe(name, Model=Model, loader=_loader(scale=100))["trainer"]
    module, optimizer = trainer.lightning_module, unwrap_optimizer(trainer.optimizers[0])
    window = trainer.accumulate_grad_batches * optimizer.accumulation_steps
    updates = 3 * UPDATES
    assert optimizer.update_count == updates
    norms = check_fp32_run(
        snapshot(module.net), init, windows_of(module.seen, window),
        mode="tokens" if name.endswith("tokens") else "mean_of_means",
        clip=optimizer.max_grad_norm, lrs=linear(optimizer.defaults["lr"], updates),
        weight_decay=optimizer.defaults["weight_decay"],
    )  # fmt: skip
    assert max(norms) > optimizer.max_grad_norm  # the clipping mattered
    assert float(trainer.callback_metrics["grad_norm"]) == pytest.approx(norms[-1], rel=1e-5)


class WeightedModule(Module):
    """Windows the optimizer owns: each micro-batch weighted by its tokens, the schedule
    stepped only when an update was applied."""

    def training_step(self, batch, index):
        tokens = int(batch["labels"].ne(-100).sum())
        unwrap_optimizer(self.optimizers()).set_weight(tokens)  # before its backward
        return super().training_step(batch, index)

    def lr_scheduler_step(self, scheduler, metric):
        if unwrap_optimizer(self.optimizers()).last_step_applied:
            scheduler.step()


def test_token_weights_with_windows_the_optimizer_owns():
    module = WeightedModule(accumulation_steps=N)
    init = snapshot(module.net)
    trainer, _ = _fit(module, accumulate_grad_batches=1)
    assert unwrap_optimizer(trainer.optimizers[0]).update_count == UPDATES
    expected, _ = fp64_reference(
        init, windows_of(module.seen), mode="tokens", clip=CLIP, lrs=LINEAR
    )
    assert moved_off(snapshot(module.net), expected, init) < 1e-5


def test_settings_through_lightnings_wrapper_are_refused():
    """LightningOptimizer forwards reads but keeps writes: a weight set on it was lost."""

    class Wrapped(WeightedModule):
        def training_step(self, batch, index):
            self.optimizers().set_weight(2.0)
            return Module.training_step(self, batch, index)

    with pytest.raises(RuntimeError, match=r"set_weight\(\) was called on a wrapper"):
        _fit(Wrapped(accumulation_steps=N), accumulate_grad_batches=1)


def test_a_failed_fit_gives_the_clipping_back():
    """A fit that raises skips teardown; the next fit clips all the same."""

    class Failing(Module):
        def training_step(self, batch, index):
            if index == 2:
                raise RuntimeError("a failing step")
            return super().training_step(batch, index)

    trainer, _ = _fit(Module())
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.fit(Failing(), _loader())
    assert trainer.gradient_clip_val == CLIP


def test_gradients_folded_in_backward_under_ddp_are_refused(monkeypatch):
    """Under DDP (world size 2) the fold in backward would take each rank's own
    gradients, before DDP averages them."""
    monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"Trainer.world_size: 2 data-parallel processes"):
        _fit(Module())
