"""Checks of the optimizers' arguments that need no optimizer."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


def check_accumulation_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"accumulation_steps must be an integer >= 1 (the number of micro-steps per "
            f"update), got {value!r}"
        )
    return int(value)


def check_weight(weight: Any) -> float:
    """A micro-batch weight as a Python float: a positive, finite real number."""
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1 or weight.is_complex():
            raise ValueError(
                f"weight must be a real number or a one-element tensor, got a tensor of "
                f"shape {tuple(weight.shape)} and dtype {weight.dtype}"
            )
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight must be a real number, got {type(weight).__name__}")
    weight = float(weight)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"weight must be positive and finite (for example the micro-batch's item or "
            f"token count), got {weight}; to drop a micro-batch, do not call step() for it"
        )
    return weight


def param_tensors(params: Iterable[Any]) -> list[torch.Tensor]:
    """The tensors of a params list that may hold (name, tensor) pairs."""
    return [item[1] if isinstance(item, tuple) else item for item in params]


def check_max_grad_norm(value: Any) -> float | None:
    """``max_grad_norm``: None (no clipping) or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"max_grad_norm must be a number or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"max_grad_norm must be positive and finite, got {value}")
    return float(value)


def check_partial_windows(checkpoint_partial_windows: Any, process_group: Any) -> None:
    """Data parallel ranks each hold their own partial sums, which DCP would keep one
    rank's copy of (it saves a plain tensor once)."""
    if checkpoint_partial_windows and process_group is not None:
        raise ValueError(
            "checkpoint_partial_windows does not work with process_group: each rank's "
            "window holds its own micro-batches, and torch.distributed.checkpoint keeps "
            "one rank's copy. Save each rank's optimizer.state_dict() with torch.save "
            "(it keeps the window and resumes bit for bit), or checkpoint at a boundary"
        )


def check_shard_state(shard_state: Any, process_group: Any, stochastic_rounding: bool) -> None:
    """``shard_state`` shards over a process group; stochastic rounding's noise follows
    flat positions that a chunk does not keep."""
    if not shard_state:
        return
    if process_group is None:
        raise ValueError(
            "shard_state=True shards the optimizer state over the ranks of a process "
            "group: pass process_group too (for example torch.distributed.group.WORLD)"
        )
    if stochastic_rounding:
        raise ValueError(
            "stochastic_rounding does not work with shard_state=True yet (each rank's "
            "noise would follow its chunk's positions, not the parameters'): use "
            "master_weights=True, whose masters are sharded too"
        )
