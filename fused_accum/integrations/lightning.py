"""fused_accum with PyTorch Lightning's automatic optimization.

    from fused_accum.integrations.lightning import FusedAccumCallback

    class Model(pl.LightningModule):
        def configure_optimizers(self):
            return FusedAccumAdamW(self.parameters(), lr=3e-4, accumulate_in_backward=True)

    trainer = pl.Trainer(accumulate_grad_batches=8, gradient_clip_val=1.0,
                         callbacks=[FusedAccumCallback()])

Lightning divides each loss by ``accumulate_grad_batches`` and calls ``step()`` (and the
scheduler) once per window. The callback refuses double accumulation and gradients
folded in backward under DDP, moves a by-norm ``gradient_clip_val`` into the
optimizer's ``max_grad_norm`` for the length of a fit (with ``accumulate_in_backward``
Lightning's clipping would find no ``.grad``; in every mode that also spares mixed
precision Lightning's refusal of clipping with optimizers that unscale themselves, as
ours do), and logs the optimizer's gradient norm as ``grad_norm`` after each update.
"""

from __future__ import annotations

from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified "lightning" package alone
    import lightning.pytorch as pl

from . import check_data_parallel, check_trainer_accumulation, route_clipping, unwrap_optimizer

__all__ = ["FusedAccumCallback"]


class FusedAccumCallback(pl.Callback):
    """Checks, ``gradient_clip_val`` routing and ``grad_norm`` logging (under
    ``log_name``) for fused_accum optimizers in a Lightning ``Trainer``."""

    def __init__(self, log_name: str = "grad_norm") -> None:
        self.log_name = log_name
        self._clip_value: Any = None  # the trainer's gradient_clip_val while we hold it

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._clip_value = trainer.gradient_clip_val
        routed = False
        for wrapped in trainer.optimizers:
            optimizer = unwrap_optimizer(wrapped)
            if optimizer is None:
                continue
            check_trainer_accumulation(
                optimizer, trainer.accumulate_grad_batches, "Trainer(accumulate_grad_batches)"
            )
            check_data_parallel(optimizer, trainer.world_size, "Trainer.world_size")
            if not self._clip_value:
                continue
            algorithm = trainer.gradient_clip_algorithm
            if str(getattr(algorithm, "value", algorithm)) == "value":
                if not optimizer.accumulate_in_backward:
                    continue  # Lightning clamps the .grad that is there
                raise ValueError(
                    "gradient_clip_algorithm='value' cannot be applied with "
                    "accumulate_in_backward=True (there is no .grad to clamp); clip by norm"
                )
            # by norm the optimizer clips in every mode: with accumulate_in_backward
            # Lightning would find no .grad, and under mixed precision it refuses to clip
            # for optimizers that unscale gradients themselves, as ours say they do
            route_clipping(optimizer, self._clip_value, "Trainer(gradient_clip_val)")
            routed = True
        if routed:
            trainer.gradient_clip_val = None  # the optimizer clips now (put back at the end)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._give_back_clipping(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._give_back_clipping(trainer)  # a failed fit() skips teardown

    def _give_back_clipping(self, trainer: Any) -> None:
        if self._clip_value is not None:
            trainer.gradient_clip_val = self._clip_value  # for a later fit()
            self._clip_value = None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizer = unwrap_optimizer(trainer.optimizers[0]) if trainer.optimizers else None
        if optimizer is None or not optimizer.last_step_applied:
            return  # mid-window, or no fused_accum optimizer
        if optimizer.grad_norm is not None:
            pl_module.log(self.log_name, optimizer.grad_norm, on_step=True, on_epoch=False)
