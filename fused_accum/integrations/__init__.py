"""fused_accum inside the trainers people use: Hugging Face ``transformers.Trainer``
(:mod:`fused_accum.integrations.transformers`), Accelerate
(:mod:`fused_accum.integrations.accelerate`) and PyTorch Lightning
(:mod:`fused_accum.integrations.lightning`). Each module imports its trainer, so import
the one you use.

One way of working for all three: **the trainer owns the window** (its gradient
accumulation count, its loss scaling, its learning-rate schedule and step counting), and
the optimizer is made with ``accumulate_in_backward=True`` and ``accumulation_steps=1``.
Every backward of the trainer's window then folds its gradients into the optimizer's
fp32 buffers, ``.grad`` stays None, and the trainer's one ``optimizer.step()`` per
window applies their sum: the trainer's loss scaling (HF's ``num_items_in_batch``, or
the division by the window length) makes that sum the window's exact mean gradient.

The trainers' own gradient clipping reads ``.grad``, which is not there: it would
silently clip nothing. The optimizer clips instead (``max_grad_norm``), and the
adapters here route the trainer's setting to it, take the logged gradient norm from it,
and refuse configurations that would accumulate twice or fold each rank's gradients
before DDP averages them.
"""

from __future__ import annotations

from typing import Any

from .._optimizer import FusedAccumOptimizer
from .._sharded import is_dtensor

__all__ = [
    "check_data_parallel",
    "check_trainer_accumulation",
    "route_clipping",
    "unwrap_optimizer",
]


def unwrap_optimizer(optimizer: Any) -> FusedAccumOptimizer | None:
    """The fused_accum optimizer inside a trainer's wrappers (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or None if there is
    none. The wrappers are walked through their own attributes: Lightning's forwards
    reads to the optimizer but keeps writes (``set_weight``, ``max_grad_norm = ...``)
    for itself, so set those on what this returns."""
    for _ in range(8):
        attributes = getattr(optimizer, "__dict__", None)
        if attributes is None:  # None (no optimizer yet), or not an object with attributes
            return None
        if isinstance(optimizer, FusedAccumOptimizer) and "_accumulation" in attributes:
            return optimizer
        inner = attributes.get("optimizer", attributes.get("_optimizer"))
        if inner is None or inner is optimizer:
            return None
        optimizer = inner
    return None


def check_trainer_accumulation(
    optimizer: FusedAccumOptimizer, trainer_steps: int, setting: str
) -> None:
    """Raise if the trainer and the optimizer would both accumulate."""
    if trainer_steps > 1 and optimizer.accumulation_steps > 1:
        raise ValueError(
            f"{setting}={trainer_steps} and the optimizer's accumulation_steps="
            f"{optimizer.accumulation_steps} would both accumulate: one update every "
            f"{trainer_steps * optimizer.accumulation_steps} micro-batches, while the "
            f"trainer counts (and schedules the learning rate for) one every "
            f"{trainer_steps}. Keep the trainer's setting and make the optimizer with "
            f"accumulation_steps=1 and accumulate_in_backward=True"
        )


def check_data_parallel(optimizer: FusedAccumOptimizer, world_size: int, setting: str) -> None:
    """Raise if the trainer runs ``world_size`` > 1 data-parallel processes (DDP) while
    the optimizer folds plain (not FSDP2) gradients in backward: the fold takes each
    rank's own gradient before DDP averages ``.grad``, so every rank would update with
    its own gradients and the replicas drift apart."""
    if world_size <= 1 or not optimizer.accumulate_in_backward:
        return
    # with process_group too: the trainer's DDP still writes its average into .grad
    # after the fold, which step() then refuses; better said before training starts
    if all(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        return  # FSDP2 reduce-scatters before the fold
    raise ValueError(
        f"{setting}: {world_size} data-parallel processes, and the optimizer was made with "
        f"accumulate_in_backward=True, which folds each rank's own gradient before DDP "
        f"averages .grad: every rank would update with its own gradients. Make the "
        f"optimizer without accumulate_in_backward under DDP (autograd sums .grad, DDP "
        f"averages it, the optimizer clips and updates), or shard the model with FSDP2"
    )


def route_clipping(optimizer: FusedAccumOptimizer, threshold: Any, setting: str) -> bool:
    """Make the optimizer clip the window's gradient at the trainer's ``threshold``, in
    place of the trainer (whose clipping reads ``.grad``, absent with
    ``accumulate_in_backward``). Returns whether it did; raises if the optimizer already
    clips at another threshold."""
    if not threshold or threshold <= 0:
        return False  # the trainer does not clip
    threshold = float(threshold)
    if optimizer.max_grad_norm is None:
        optimizer.max_grad_norm = threshold
    elif optimizer.max_grad_norm != threshold:
        raise ValueError(
            f"{setting}={threshold} but the optimizer has max_grad_norm="
            f"{optimizer.max_grad_norm}: the optimizer clips in place of the trainer "
            f"(with accumulate_in_backward=True there is no .grad for the trainer to "
            f"clip); give the threshold in one place"
        )
    return True
