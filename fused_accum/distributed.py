"""Data parallel training with torch.distributed: each rank accumulates its own
micro-batches locally, and at the window boundary the fp32 buffers are summed across
the ranks once, in buckets, before the update (``process_group=`` of the optimizers).
With ``shard_state=True`` the boundary is a reduce-scatter instead: each rank sums and
updates only its chunk of every flat group, keeping optimizer state for that chunk
alone, and the updated parameters are then all-gathered (ZeRO stage 1: the buffers
stay whole, as each rank accumulates its own micro-batches).

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


def processes_in_run() -> int:
    """The size of torch.distributed's default group; 1 when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s values of ``params`` (for example ``model.parameters()``) to
    every rank of ``group``, so that all ranks start from the same weights."""
    dist = _dist()
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=src, group=group)


def check_ranks_agree(
    optimizer: Any, group: Any = None, settings: dict[str, Any] | None = None
) -> None:
    """Raise ValueError on every rank if the ranks of ``group`` disagree on the
    optimizer's parameters (count, shapes, dtypes), ``accumulation_steps`` or any of
    ``settings`` (options that decide which collectives a window runs: ranks that
    differ there would wait on each other forever)."""
    dist = _dist()
    mine = {
        "settings": settings or {},
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
        for name, value in first["settings"].items():
            if theirs["settings"].get(name) != value:
                raise ValueError(
                    f"ranks disagree on {name}: rank 0 has {value!r}, rank {rank} has "
                    f"{theirs['settings'].get(name)!r}; every rank must create the "
                    f"optimizer with the same options"
                )
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


def _collective(dist: Any, name: str, deprecated: str) -> Any:
    # torch 2.14 deprecates reduce_scatter_tensor and all_gather_into_tensor for these
    # names (same arguments); torch 2.11 has only the old ones
    return getattr(dist, name, None) or getattr(dist, deprecated)


class WindowReducer:
    """The boundary of a data-parallel window: one small all-reduce of the window's
    bookkeeping (weight, overflow, which parameters hold sums, window length), read on
    the host, then the flat buffers summed across ranks: all-reduced in asynchronous
    buckets, or with ``shard_state`` reduce-scattered, one chunk per rank."""

    def __init__(self, group: Any) -> None:
        self.dist = _dist()
        self.group = group
        self.world_size = self.dist.get_world_size(group)
        self.rank = self.dist.get_rank(group)
        self._reduce_scatter = _collective(
            self.dist, "reduce_scatter_single", "reduce_scatter_tensor"
        )
        self._all_gather = _collective(self.dist, "all_gather_single", "all_gather_into_tensor")

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
        if accumulation.state_shard is not None:
            self._reduce_scatter_buffers(accumulation)
        else:
            self._all_reduce_buffers(accumulation)
        return total[0], False

    def _reduce_scatter_buffers(self, accumulation: Any) -> None:
        """Each rank's chunk of every flat buffer becomes the sum of that chunk over the
        ranks, in place (the rest of the buffer is dead afterwards)."""
        handles = []
        for flat_group in accumulation.groups.values():
            low, high = flat_group.chunk
            flat = flat_group.buffer
            handles.append(
                self._reduce_scatter(flat[low:high], flat, group=self.group, async_op=True)
            )
        for handle in handles:
            handle.wait()

    def gather_params(self, accumulation: Any) -> None:
        """After each rank updated its pieces (``shard_state``): every parameter whole
        again on every rank. The pieces are gathered through the flat buffer's memory,
        dead once the update has read it, taken in the parameters' dtype (half the
        bytes of an fp32 all-reduce for bf16 parameters), then copied out."""
        for flat_group in accumulation.groups.values():
            indices = range(len(flat_group.params))
            scratch = flat_group.buffer.view(flat_group.param_dtype)[: flat_group.numel]
            low, high = flat_group.chunk
            torch._foreach_copy_(  # this rank's pieces (empty ones too) into its chunk
                [flat_group.flat_piece(scratch, i) for i in indices],
                [flat_group.param_piece(i) for i in indices],
            )
            self._all_gather(scratch, scratch[low:high], group=self.group)
            torch._foreach_copy_(flat_group.params, [flat_group.view(scratch, i) for i in indices])

    def gather_states(self, accumulation: Any) -> dict[int, dict[str, torch.Tensor]]:
        """With ``shard_state``, a collective: id(param) -> {name: its whole state}, on
        the host, every rank's chunks of the flat states gathered (in the same order on
        every rank: the groups and their states are made alike everywhere). One whole
        flat state at a time is on the device, so a checkpoint needs 4 bytes per
        element of device memory beside the shards, not the whole state."""
        whole: dict[int, dict[str, torch.Tensor]] = {}
        for flat_group in accumulation.groups.values():
            for name, chunk in flat_group.states.items():
                flat = chunk.new_empty(flat_group.numel)
                self._all_gather(flat, chunk, group=self.group)
                flat = flat.cpu()
                for index, param in enumerate(flat_group.params):
                    whole.setdefault(id(param), {})[name] = flat_group.view(flat, index)
        return whole

    def _all_reduce_buffers(self, accumulation: Any) -> None:
        handles = []
        for flat_group in accumulation.groups.values():
            flat = flat_group.buffer
            for start in range(0, flat.numel(), BUCKET_ELEMENTS):
                bucket = flat[start : start + BUCKET_ELEMENTS]
                handles.append(self.dist.all_reduce(bucket, group=self.group, async_op=True))
        for handle in handles:
            handle.wait()
