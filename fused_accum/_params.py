"""Parameter checks of the fused_accum optimizers, as a mixin of FusedAccumOptimizer:
what a new param group may hold, where its parameters may live, and how to name one
in an error message."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from ._accumulation import AccumulationState
from ._sharded import is_dtensor, mesh_problem, sharding_problem, shown_like
from ._storage import dense_strides


class ParameterChecks:
    """Needs ``_accumulation``, ``_loss_scaling``, ``_process_group``,
    ``max_grad_norm``, ``_grad_stats``, ``_flat_state_names``, ``state`` and
    ``param_groups`` from the optimizer."""

    _accumulation: AccumulationState
    max_grad_norm: float | None
    _grad_stats: Any
    _loss_scaling: Any
    _process_group: Any
    _flat_state_names: tuple[str, ...]
    state: Any
    param_groups: list[dict[str, Any]]

    def _check_new_params(self, params: list[torch.Tensor], group_index: int) -> None:
        seen: set[torch.Tensor] = set()
        mesh = self._accumulation.shard_mesh  # of the DTensor parameters: one for all
        for index, param in enumerate(params):
            if not isinstance(param, torch.Tensor):
                continue  # torch.optim raises its own TypeError for these
            where = f"parameter {index} of param group {group_index}"
            if param in seen:
                raise ValueError(f"{where} appears twice in the group; pass each parameter once")
            seen.add(param)
            if param.is_complex():
                raise ValueError(
                    f"{where} is complex ({param.dtype}); {type(self).__name__} supports "
                    f"real floating-point parameters only: keep the real and imaginary "
                    f"parts as two real parameters, or use torch.optim"
                )
            if not param.is_floating_point():
                raise ValueError(
                    f"{where} has dtype {param.dtype}; only floating-point parameters "
                    f"can be optimized"
                )
            if is_dtensor(param):
                problem = sharding_problem(param, self._options_not_for_dtensors())
                problem = problem or mesh_problem(param, mesh)
                if problem is not None:
                    raise ValueError(f"{where} {problem}")
                mesh = param.device_mesh
            if param.layout != torch.strided:
                raise ValueError(
                    f"{where} has layout {param.layout}; only dense (strided) parameters "
                    f"are supported"
                )
        self._check_not_mixed(params)

    def _check_not_mixed(self, params: list[torch.Tensor]) -> None:
        """Clipping and the statistics sum each rank's part over the DTensors' mesh: a
        plain parameter beside them (replicated on every rank) would count once per
        rank."""
        if self.max_grad_norm is None and self._grad_stats is None:
            return
        kinds = {is_dtensor(p) for p in params if isinstance(p, torch.Tensor)}
        if self._accumulation.slots:
            kinds.add(bool(self._accumulation.shards))
        if len(kinds) > 1:
            option = "max_grad_norm" if self.max_grad_norm is not None else "track_grad_stats"
            raise ValueError(
                f"the parameters mix DTensors (FSDP2) with plain tensors, and {option} "
                f"sums each rank's shards over the mesh, where a plain parameter, the same "
                f"on every rank, would count once per rank: shard every parameter "
                f"(fully_shard the root module too), or give the plain ones an optimizer "
                f"of their own"
            )

    def _check_dense(self, params: list[torch.Tensor], group_index: int) -> None:
        """With ``shard_state`` a rank updates a flat range of a parameter's memory, so
        that memory must be the parameter's alone and gapless."""
        for index, param in enumerate(params):
            if param.stride() != dense_strides(param):
                raise ValueError(
                    f"parameter {index} of param group {group_index} is a non-contiguous "
                    f"view (shape {tuple(param.shape)}, strides {param.stride()}); "
                    f"shard_state needs every parameter to own dense memory: make it a "
                    f"parameter of its own (nn.Parameter(t.clone()))"
                )

    def _options_not_for_dtensors(self) -> dict[str, bool]:
        return {
            "process_group": self._process_group is not None,
        }

    def _check_one_device(self, params: list[torch.Tensor]) -> None:
        """With loss scaling or data parallel, every parameter must live on one device:
        the window's overflow flag, the scale and the reduced tensors are one device's."""
        if self._loss_scaling is None and self._process_group is None:
            return
        devices = set(self._accumulation.devices)
        devices |= {p.device for p in params if isinstance(p, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(
                f"loss_scaling and process_group need all parameters on one device, got "
                f"{sorted(str(d) for d in devices)}; use one device per process (and "
                f"torch.amp.GradScaler for a model spread over devices)"
            )

    def _all_params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(group["params"] for group in self.param_groups))

    def _describe(self, param: torch.Tensor) -> str:
        for group_index, group in enumerate(self.param_groups):
            for index, member in enumerate(group["params"]):
                if member is param:
                    names = group.get("param_names")
                    name = f" ({names[index]})" if names else ""
                    return f"parameter {index}{name} of param group {group_index}"
        return "a parameter"

    def _rebind_state_views(self, params: list[torch.Tensor]) -> None:
        """Point state entries at the current flat tensors (after a group grew)."""
        for param in params:
            state = self.state.get(param)
            if not state:
                continue
            for name in self._flat_state_names:
                if isinstance(state.get(name), torch.Tensor):
                    view = self._accumulation.state_view(param, name)
                    state[name] = shown_like(view, param)
            for name in self._count_state_names:
                if isinstance(state.get(name), torch.Tensor):
                    state[name] = self._count_view(param, name)
