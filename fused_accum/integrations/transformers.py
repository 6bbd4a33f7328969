"""fused_accum with the Hugging Face ``transformers.Trainer``.

    from fused_accum.integrations.transformers import FusedAccumTrainer

    args = TrainingArguments(..., gradient_accumulation_steps=8, max_grad_norm=1.0)
    trainer = FusedAccumTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()

``FusedAccumTrainer`` is a ``Trainer`` whose default optimizer is
``FusedAccumAdamW(accumulate_in_backward=True)``, made from the arguments as HF makes
its AdamW (learning rate, betas, epsilon, weight decay on the same parameters), that
clips at ``max_grad_norm`` itself and logs its gradient norm as ``grad_norm``. Give
extra optimizer options with ``fused_accum_kwargs={...}`` (``master_weights=True`` for
bf16 models, for example).

With a Trainer subclass of your own, add ``FusedAccumCallback()`` to its callbacks: it
refuses double accumulation and routes ``max_grad_norm`` to the optimizer; only the
logged ``grad_norm`` then stays HF's (0.0: it is the norm of the absent ``.grad``).
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from . import check_data_parallel, check_trainer_accumulation, route_clipping, unwrap_optimizer

__all__ = ["FusedAccumCallback", "FusedAccumTrainer"]

# TrainingArguments.optim values that mean torch's own AdamW, which FusedAccumAdamW
# replaces; the others (8-bit, GaLore, schedule-free, ...) are different optimizers
HF_ADAMW = ("adamw_torch", "adamw_torch_fused")


class FusedAccumCallback(TrainerCallback):
    """At the start of training: refuses the Trainer's and the optimizer's accumulation
    together and gradients folded in backward under DDP, and makes a fused_accum
    optimizer clip at ``max_grad_norm`` (HF's own clipping finds no ``.grad`` with
    ``accumulate_in_backward`` and would clip nothing)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = unwrap_optimizer(kwargs.get("optimizer"))
        if optimizer is None:
            return
        check_trainer_accumulation(
            optimizer, args.gradient_accumulation_steps, "gradient_accumulation_steps"
        )
        check_data_parallel(optimizer, args.world_size, "TrainingArguments.world_size")
        if optimizer.accumulate_in_backward:  # else HF clips the .grad that is there
            route_clipping(optimizer, args.max_grad_norm, "TrainingArguments.max_grad_norm")


class FusedAccumTrainer(Trainer):
    """A ``Trainer`` with ``FusedAccumAdamW(accumulate_in_backward=True)`` as its default
    optimizer, clipping in the optimizer and the optimizer's norm logged as
    ``grad_norm``. ``fused_accum_kwargs``: more options for the optimizer."""

    def __init__(self, *args: Any, fused_accum_kwargs: dict | None = None, **kwargs: Any) -> None:
        self.fused_accum_kwargs = dict(fused_accum_kwargs or {})
        self._made_optimizer: Any = None  # the optimizer this class made, kept by HF
        super().__init__(*args, **kwargs)
        self.add_callback(FusedAccumCallback())

    def create_optimizer(self, model: Any = None) -> Any:
        made = self._made_optimizer
        if made is not None and unwrap_optimizer(self.optimizer) is made:
            return self.optimizer  # a later train() without model_init keeps it, as HF does
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            if self.fused_accum_kwargs:
                raise ValueError(
                    "fused_accum_kwargs configure the optimizer FusedAccumTrainer makes; with "
                    "an optimizer of your own (optimizers= or optimizer_cls_and_kwargs=) give "
                    "the options to it instead"
                )
            return self._create_optimizer(model)
        from .. import FusedAccumAdamW

        if str(getattr(self.args.optim, "value", self.args.optim)) not in HF_ADAMW:
            raise ValueError(
                f"FusedAccumTrainer makes FusedAccumAdamW, but TrainingArguments.optim is "
                f"{self.args.optim!r}: leave optim at its AdamW default, or pass an optimizer "
                f"of your own with optimizers=(optimizer, scheduler)"
            )
        clip = self.args.max_grad_norm
        kwargs = {
            "lr": self.args.learning_rate,
            "betas": (self.args.adam_beta1, self.args.adam_beta2),
            "eps": self.args.adam_epsilon,
            "accumulate_in_backward": True,
            "max_grad_norm": clip if clip and clip > 0 else None,  # HF: <= 0 is no clipping
            **self.fused_accum_kwargs,
        }
        # for this build only: HF makes its decay / no-decay groups around these, and a
        # later build (model_init, hyperparameter search) reads the arguments afresh
        self.optimizer_cls_and_kwargs = (FusedAccumAdamW, kwargs)
        try:
            optimizer = self._create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None
        self._made_optimizer = unwrap_optimizer(optimizer)
        return optimizer

    def _create_optimizer(self, model: Any) -> Any:
        # transformers before 5 has create_optimizer(self), without the model
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """HF's log, with ``grad_norm`` the optimizer's: the norm of the window's mean
        gradient before clipping (HF's own is that of the absent ``.grad``, 0.0)."""
        optimizer = unwrap_optimizer(self.optimizer)
        if optimizer is not None and optimizer.accumulate_in_backward and "grad_norm" in logs:
            if optimizer.grad_norm is not None:
                logs["grad_norm"] = float(optimizer.grad_norm)
            else:  # the optimizer does not clip, so it has no norm: log none, not 0.0
                del logs["grad_norm"]
        if start_time is None:  # transformers before 4.47 has log(self, logs)
            super().log(logs)
        else:
            super().log(logs, start_time)
