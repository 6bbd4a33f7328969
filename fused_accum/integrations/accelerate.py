"""fused_accum with Hugging Face Accelerate: the loop is yours, so the adapter is a check.

    accelerator = Accelerator(gradient_accumulation_steps=8)
    optimizer = FusedAccumAdamW(model.parameters(), lr=3e-4, accumulate_in_backward=True,
                                max_grad_norm=1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              scheduler)
    check_accelerate_setup(accelerator, optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)  # no clip_grad_norm_: the optimizer clips
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            grad_norm = unwrap_optimizer(optimizer).grad_norm  # the window's, before clipping

Accelerate divides each loss by the accumulation count and passes ``step()``,
``scheduler.step()`` and ``zero_grad()`` through once per window.
"""

from __future__ import annotations

from typing import Any

from . import check_data_parallel, check_trainer_accumulation, unwrap_optimizer

__all__ = ["check_accelerate_setup", "unwrap_optimizer"]


def check_accelerate_setup(accelerator: Any, optimizer: Any) -> None:
    """Raise on the combinations that would silently go wrong: Accelerate's and the
    optimizer's accumulation together, gradients folded in backward under DDP (before
    DDP averages them), and fp16's GradScaler with gradients folded in backward (the
    scaler checks ``.grad`` after they are gone)."""
    inner = unwrap_optimizer(optimizer)
    if inner is None:
        return
    check_trainer_accumulation(
        inner, accelerator.gradient_accumulation_steps, "Accelerator(gradient_accumulation_steps)"
    )
    check_data_parallel(inner, accelerator.num_processes, "Accelerator.num_processes")
    if getattr(accelerator, "scaler", None) is not None and inner.accumulate_in_backward:
        raise ValueError(
            "mixed_precision='fp16' brings a GradScaler, which cannot check gradients that "
            "accumulate_in_backward=True already folded: use Accelerator(mixed_precision="
            "'no') with autocast of your own, and the optimizer's loss_scaling=True "
            "(optimizer.scale_loss(loss) before backward) instead"
        )
