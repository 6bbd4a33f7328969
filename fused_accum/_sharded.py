"""DTensor parameters, as FSDP2's ``fully_shard`` makes them: each rank accumulates and
updates its own shard. The flat groups, the backends and the kernels see only the
local shards (plain tensors); the optimizer's state is shown as DTensors over views of
the flat state, as torch.optim shows its own, so that torch.distributed.checkpoint
saves and reshards it."""

from __future__ import annotations

import torch

# what does not work with DTensor parameters yet, and what to do instead
_UNSUPPORTED = {
    "process_group": "FSDP2 already reduces the gradients: leave it out",
}


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torch.distributed DTensor (never, where torch has no
    distributed support)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return False  # the common case, without importing torch.distributed.tensor
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sharding_problem(param: torch.Tensor, options: dict[str, bool]) -> str | None:
    """Why the DTensor ``param`` cannot be served, or None. ``options``: which of the
    optimizer's options are on."""
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        return (
            f"is a DTensor with placements {placements} on a {param.device_mesh.ndim}-D "
            f"mesh; fused_accum serves FSDP2's sharding (Shard(0) on a 1-D mesh) only: use "
            f"torch.optim for tensor parallel or hybrid sharding"
        )
    for option, on in options.items():
        if on:
            return (
                f"is a DTensor (FSDP2), which does not work with {option} yet: "
                f"{_UNSUPPORTED[option]}"
            )
    return None


def mesh_problem(param: torch.Tensor, mesh) -> str | None:
    """Why the DTensor ``param`` cannot join DTensor parameters on ``mesh`` (None: the
    first), or None."""
    if mesh is None or param.device_mesh == mesh:
        return None
    return (
        f"is sharded over {param.device_mesh}, but other parameters over {mesh}; "
        f"fused_accum sums the gradient norm over one mesh: shard the model over one"
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard of a DTensor on this rank (a plain tensor); anything else as it is."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def shown_like(view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``view`` (this rank's part of some state of ``param``) as ``param`` shows it: a
    DTensor sharded as ``param`` is, when it is one."""
    if not is_dtensor(param):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        view,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
