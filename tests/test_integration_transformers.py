"""fused_accum in the Hugging Face Trainer (fused_accum.integrations.transformers), on a
tiny random model on CPU, 4 micro-batches per update: the trainer's window, loss scaling
(num_items_in_batch) and schedule, with the optimizer's fp32 accumulation and clipping.
Held against an fp64 reference (fp32 parameters) and against ideal fp32 accumulation of
the bf16 gradients (bf16 parameters), which accumulating in bf16 ``.grad`` misses."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
from fused_accum.integrations.transformers import (  # noqa: E402
    FusedAccumCallback,
    FusedAccumTrainer,
)

pytestmark = pytest.mark.filterwarnings("ignore")


class TokenModel(MLP):
    """A forward with **kwargs: the Trainer passes num_items_in_batch (the window's
    counted tokens), and the loss is the token sum over it. Records what it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.logits(x)
        if self.training and torch.is_grad_enabled():
            self.seen.append((x.detach().cpu(), labels.detach().cpu()))
        return {"loss": token_loss(logits, labels, num_items_in_batch), "logits": logits}


def _model(dtype=torch.float32) -> TokenModel:
    torch.manual_seed(0)
    return TokenModel().to(dtype)


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=N, max_steps=UPDATES, max_grad_norm=CLIP,
        learning_rate=LR, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def _dataset():
    return ListDataset(make_data(N * BATCH * UPDATES))


# the linear schedule: update k runs at LR * (UPDATES - k) / UPDATES
LINEAR = [LR * (UPDATES - k) / UPDATES for k in range(UPDATES)]


def test_the_trainer_with_fused_accum_equals_exact_accumulation(tmp_path):
    model = _model()
    init = snapshot(model)
    trainer = FusedAccumTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(),
        fused_accum_kwargs={"backend": "torch"},
    )  # fmt: skip
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, FusedAccumAdamW) and optimizer.accumulate_in_backward
    assert optimizer.update_count == UPDATES  # one step per window
    expected, norms = fp64_reference(
        init, windows_of(model.seen), mode="tokens", clip=CLIP, lrs=LINEAR
    )
    assert moved_off(snapshot(model), expected, init) < 1e-5
    logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    assert logged == pytest.approx(norms, rel=1e-5)  # the true norm, not 0.0


def test_the_readme_recipe(tmp_path, monkeypatch):
    """The README's recipe as written, on TokenModel and 8 batches of 8 an epoch (inputs
    large enough that most windows clip at the recipe's 1.0)."""
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir="out"
    model = _model()
    init = snapshot(model)
    ran = run_recipe("transformers", model=model, dataset=ListDataset(make_data(64, scale=100)))
    trainer = ran["trainer"]
    args, updates = trainer.args, trainer.state.max_steps
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert optimizer.update_count == updates == 6
    norms = check_fp32_run(
        snapshot(model), init, windows_of(model.seen, args.gradient_accumulation_steps),
        mode="tokens", clip=args.max_grad_norm, lrs=linear(args.learning_rate, updates),
        weight_decay=args.weight_decay,
    )  # fmt: skip
    assert max(norms) > args.max_grad_norm  # the clipping mattered
    assert float(optimizer.grad_norm) == pytest.approx(norms[-1], rel=1e-5)


def test_a_trainer_of_ones_own_with_the_callback_clips_in_the_optimizer(tmp_path):
    model = _model()
    init = snapshot(model)
    optimizer = FusedAccumAdamW(
        model.parameters(), lr=LR, weight_decay=0.0, accumulate_in_backward=True, backend="torch"
    )
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(),
        optimizers=(optimizer, None), callbacks=[FusedAccumCallback()],
    )  # fmt: skip
    trainer.train()
    assert optimizer.max_grad_norm == CLIP  # routed from TrainingArguments.max_grad_norm
    expected, _ = fp64_reference(init, windows_of(model.seen), mode="tokens", clip=CLIP, lrs=LINEAR)
    assert moved_off(snapshot(model), expected, init) < 1e-5


def test_accumulating_in_the_trainer_and_the_optimizer_is_refused(tmp_path):
    model = _model()
    optimizer = FusedAccumAdamW(
        model.parameters(), lr=LR, accumulate_in_backward=True, accumulation_steps=N
    )
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(),
        optimizers=(optimizer, None), callbacks=[FusedAccumCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 and the optimizer's"):
        trainer.train()
    assert optimizer.update_count == 0 and optimizer.micro_step_count == 0


def _bf16_run(tmp_path, in_backward: bool):
    model = _model(torch.bfloat16)
    init = snapshot(model)
    args = _args(tmp_path, lr_scheduler_type="constant")
    if in_backward:
        trainer = FusedAccumTrainer(
            model=model, args=args, train_dataset=_dataset(),
            fused_accum_kwargs={"backend": "torch"},
        )  # fmt: skip
    else:  # autograd sums the micro-batches in bf16 .grad; the trainer clips it
        optimizer = FusedAccumAdamW(model.parameters(), lr=LR, weight_decay=0.0, backend="torch")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_dataset(), optimizers=(optimizer, None)
        )
    trainer.train()
    ideal = bf16_ideal(init, windows_of(model.seen), mode="tokens", clip=CLIP)
    return moved_off(snapshot(model), ideal, init)


def test_bf16_parameters_get_exact_fp32_accumulation(tmp_path):
    assert _bf16_run(tmp_path, in_backward=True) < 1e-3
    # the test tells them apart: bf16 .grad accumulation is far off the ideal
    assert _bf16_run(tmp_path, in_backward=False) > 1e-3


def test_log_before_training_and_clipping_off(tmp_path):
    """No optimizer yet: logging works. HF's max_grad_norm <= 0 means no clipping: the
    optimizer does not clip, and no grad_norm is logged (HF's would be 0.0)."""
    trainer = FusedAccumTrainer(
        model=_model(), args=_args(tmp_path, max_grad_norm=-1.0), train_dataset=_dataset()
    )
    trainer.log({"loss": 1.0})
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).max_grad_norm is None
    assert not any("grad_norm" in row for row in trainer.state.log_history)


def test_each_build_reads_the_arguments_afresh(tmp_path):
    """model_init (as hyperparameter search uses it) makes a new optimizer per train()."""
    trainer = FusedAccumTrainer(model_init=_model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    trainer.args.learning_rate = 0.5
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).defaults["lr"] == 0.5


def test_options_that_the_trainer_would_ignore_are_refused(tmp_path):
    model = _model()
    optimizer = FusedAccumAdamW(model.parameters(), accumulate_in_backward=True)
    trainer = FusedAccumTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(),
        optimizers=(optimizer, None), fused_accum_kwargs={"master_weights": True},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"give the options to it instead"):
        trainer.train()
    for optim in ("sgd", "adamw_8bit"):  # another optimizer, if its name says AdamW too
        trainer = FusedAccumTrainer(
            model=_model(), args=_args(tmp_path, optim=optim), train_dataset=_dataset()
        )
        with pytest.raises(ValueError, match=r"TrainingArguments.optim is"):
            trainer.train()


def test_the_optimizer_is_made_as_hf_makes_adamw(tmp_path):
    args = _args(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)
    trainer = FusedAccumTrainer(model=_model(), args=args, train_dataset=_dataset())
    optimizer = unwrap_optimizer(trainer.create_optimizer())
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.dim() for p in decay["params"]] == [2, 2]  # weights decay, biases do not
    assert decay["betas"] == (0.8, 0.99) and decay["eps"] == 1e-6 and decay["lr"] == LR
    assert optimizer.accumulate_in_backward and optimizer.max_grad_norm == CLIP


def test_resuming_from_a_checkpoint_is_bit_for_bit(tmp_path):
    """HF saves the optimizer's state_dict() at its save steps (window boundaries) and
    loads it on resume."""
    straight = _model()
    FusedAccumTrainer(
        model=straight, args=_args(tmp_path / "straight"), train_dataset=_dataset()
    ).train()
    first = _model()
    args = _args(tmp_path / "saved", save_strategy="steps", save_steps=2)
    FusedAccumTrainer(model=first, args=args, train_dataset=_dataset()).train()
    resumed = _model()
    trainer = FusedAccumTrainer(model=resumed, args=args, train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "saved" / "checkpoint-2"))
    assert unwrap_optimizer(trainer.optimizer).update_count == UPDATES
    for name, value in snapshot(straight).items():
        assert torch.equal(snapshot(resumed)[name], value), name


def test_a_second_train_keeps_the_optimizer_it_made(tmp_path):
    """Without model_init HF keeps its optimizer for a later train(); the one
    FusedAccumTrainer made with fused_accum_kwargs is not someone else's."""
    trainer = FusedAccumTrainer(
        model=_model(), args=_args(tmp_path), train_dataset=_dataset(),
        fused_accum_kwargs={"backend": "torch"},
    )  # fmt: skip
    trainer.train()
    first = unwrap_optimizer(trainer.optimizer)
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is first
    assert first.update_count == 2 * UPDATES


def test_gradients_folded_in_backward_under_ddp_are_refused(tmp_path, monkeypatch):
    """Under DDP (world_size 2) the fold in backward would take each rank's own
    gradients, before DDP averages them."""
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    trainer = FusedAccumTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset())
    with pytest.raises(ValueError, match=r"world_size: 2 data-parallel processes, and the opt"):
        trainer.train()
