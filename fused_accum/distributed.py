"""Data parallel training with torch.distributed: each rank accumulates its own
micro-batches locally, and at the window boundary the fp32 buffers are summed across
the ranks once, in buckets, before the update (``process_group=`` of the optimizers).

Helpers for the start of a run: :func:`broadcast_parameters` (every rank starts from
rank 0's weights) and :func:`check_ranks_agree` (the optimizers' construction calls
it: the ranks must hold the same parameters and window length).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

BUCKET_ELEMENTS = 1 << 22  # 16 MB of fp32 per all-reduce, several in flight at once


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group needs torch.distributed initialised first: call "
            "torch.distributed.init_process_group(...) before creating the optimizer"
        )
    return dist


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s values of ``params`` (for example ``model.parameters()``) to
    every rank of ``group``, so that all ranks start from the same weights."""
    dist = _dist()
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=src, group=group)


def check_ranks_agree(optimizer: Any, group: Any = None) -> None:
    """Raise ValueError on every rank if the ranks of ``group`` disagree on the
    optimizer's parameters (count, shapes, dtypes) or ``accumulation_steps``."""
    dist = _dist()
    mine = {
        "accumulation_steps": optimizer.accumulation_steps,
        "params": [
            (tuple(p.shape), str(p.dtype))
            for group_ in optimizer.param_groups
            for p in group_["params"]
        ],
    }
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs["accumulation_steps"] != first["accumulation_steps"]:
            raise ValueError(
                f"ranks disagree on accumulation_steps: rank 0 has "
                f"{first['accumulation_steps']}, rank {rank} has "
                f"{theirs['accumulation_steps']}; every rank must use the same window"
            )
        if theirs["params"] != first["params"]:
            where = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(first["params"], theirs["params"], strict=False))
                    if a != b
                ),
                min(len(first["params"]), len(theirs["params"])),
            )
            raise ValueError(
                f"ranks disagree on the parameters: rank 0 has {len(first['params'])}, rank "
                f"{rank} has {len(theirs['params'])}, first difference at parameter {where} "
                f"({first['params'][where] if where < len(first['params']) else 'none'} vs "
                f"{theirs['params'][where] if where < len(theirs['params']) else 'none'}); "
                f"build the same model on every rank"
            )


class WindowReducer:
    """The boundary of a data-parallel window: one small all-reduce of the window's
    bookkeeping (weight, overflow, which parameters hold sums, window length), read on
    the host, then the flat buffers summed across ranks in asynchronous buckets."""

    def __init__(self, group: Any) -> None:
        self.dist = _dist()
        self.group = group
        self.world_size = self.dist.get_world_size(group)

    def reduce_window(
        self,
        accumulation: Any,
        params: list[torch.Tensor],
        *,
        overflowed: bool,
        found_inf: torch.Tensor | None,
        accumulation_steps: int,
    ) -> tuple[float, bool]:
        """Sum the window over the ranks. Returns (the window's total weight over all
        ranks, whether any rank overflowed), after which every rank's buffers hold the
        same sums and ``accumulation.holds_sum`` the same parameters."""
        device = accumulation.devices[0]
        local = [
            accumulation.window_weight,
            float(overflowed),
            float(accumulation_steps),
            *(float(id(p) in accumulation.holds_sum) for p in params),
        ]
        meta = torch.tensor(local, dtype=torch.float64, device=device)
        if found_inf is not None:
            meta[1] += found_inf.to(meta.dtype).reshape(())
        self.dist.all_reduce(meta, group=self.group)
        total = meta.tolist()  # the one host read of a data-parallel window
        if total[2] != accumulation_steps * self.world_size:
            raise RuntimeError(
                f"ranks disagree on accumulation_steps (this rank: {accumulation_steps}); "
                f"change it on every rank at the same micro-step"
            )
        any_overflow = total[1] > 0
        if found_inf is not None:
            found_inf.fill_(float(any_overflow))
        if any_overflow:
            return total[0], True
        for param, count in zip(params, total[3:], strict=True):
            if count > 0 and id(param) not in accumulation.holds_sum:
                accumulation.buffer_view(param).zero_()  # a sum from other ranks only
                accumulation.holds_sum.add(id(param))
        self._all_reduce_buffers(accumulation)
        return total[0], False

    def _all_reduce_buffers(self, accumulation: Any) -> None:
        handles = []
        for flat_group in accumulation.groups.values():
            flat = flat_group.buffer
            for start in range(0, flat.numel(), BUCKET_ELEMENTS):
                bucket = flat[start : start + BUCKET_ELEMENTS]
                handles.append(self.dist.all_reduce(bucket, group=self.group, async_op=True))
        for handle in handles:
            handle.wait()
