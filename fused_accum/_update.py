"""The update at a window's boundary, as a mixin of FusedAccumOptimizer: the window's
scalars decided on the device (clipping, loss scaling), the parameters gathered into
batches, and each batch handed to the subclass's update (SGD, Adam)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

import torch

from ._accumulation import AccumulationState
from ._sharded import local_tensor, shown_like
from ._sums import sum_in_fixed_order
from .backends import Backend, StepBatch


class WindowUpdate:
    """Needs ``_accumulation``, ``_grad_stats``, ``_reducer``, ``_loss_scale``,
    ``max_grad_norm``, ``master_weights``, ``stochastic_rounding``,
    ``_rounding_seed``, ``accumulation_steps``, ``_all_params``, ``_found_inf``,
    ``state`` and ``param_groups`` from the optimizer; subclasses define
    ``_prepare_state`` and ``_step_batch``."""

    _accumulation: AccumulationState
    _grad_stats: Any
    _reducer: Any
    _loss_scale: Any
    _grad_norm: torch.Tensor | None
    max_grad_norm: float | None
    master_weights: bool
    stochastic_rounding: bool
    _rounding_seed: int
    _warned_no_gradients: bool
    state: Any
    param_groups: list[dict[str, Any]]

    def _apply_window(
        self, fresh: list[tuple[torch.Tensor, torch.Tensor]], fresh_factor: float
    ) -> bool:
        """Apply the window: the buffers' sums and the last micro-step's gradients
        ``fresh`` (scaled by ``fresh_factor``), divided by the window's weight (over
        all ranks, when data parallel). Returns False if the host skipped it (a
        GradScaler overflow on some rank)."""
        accumulation = self._accumulation
        total_weight = accumulation.window_weight
        window_scalars = None
        decided_on_device = self.max_grad_norm is not None or self._loss_scale is not None
        grad_squares = None if self._grad_stats is None else self._grad_stats.open_sums()
        if self._reducer is not None:
            accumulation.fold(fresh, fresh_factor, self._found_inf(), grad_sum_sq=grad_squares)
            fresh = []
            total_weight, overflowed = self._reducer.reduce_window(
                accumulation,
                self._all_params(),
                overflowed=accumulation.overflowed,
                found_inf=self._found_inf(),
                accumulation_steps=self.accumulation_steps,
            )
            if overflowed and self._loss_scale is None:
                accumulation.end_window()
                if self._grad_stats is not None:
                    self._grad_stats.discard()
                return False
            if decided_on_device:
                squares = self._squares_of_sums() if self.max_grad_norm is not None else None
                window_scalars = self._window_scalars(squares, total_weight)
        elif decided_on_device:
            squares = self._fold_last(fresh, fresh_factor, grad_squares)
            fresh = []
            window_scalars = self._window_scalars(squares, total_weight)
        if not accumulation.holds_sum and not fresh:
            self._warn_window_without_gradients()
        fresh_grads = {id(param): grad for param, grad in fresh}
        # with shard_state the buffers' sums are whole in this rank's chunk only, and
        # the whole parameters come from every rank's chunk after the update
        holds_sum, slots = accumulation.holds_sum, accumulation.slots
        for group in self.param_groups:
            batches: dict[Hashable, StepBatch] = {}
            for param in group["params"]:
                key = id(param)  # by id: hashing a tensor runs Python code
                use_buffer = key in holds_sum
                grad = fresh_grads.get(key)
                if not use_buffer and grad is None:
                    continue  # no gradient in the whole window: skipped, as torch does
                state_key = self._prepare_state(group, param)
                master = self._master_param(param) if self.master_weights else None
                flat_group = slots[key][0]
                batch_key = (flat_group, use_buffer, grad is not None, state_key)
                batch = batches.get(batch_key)
                if batch is None:
                    batch = batches[batch_key] = StepBatch(
                        params=[],
                        buffers=[],
                        grads=None if grad is None else [],
                        use_buffer=use_buffer,
                        # without a sum to complete, the fresh gradient's share is
                        # one factor: exactly 1 for a window of one micro-step
                        normaliser=1.0 / total_weight if use_buffer else 1.0,
                        grad_weight=fresh_factor if use_buffer else fresh_factor / total_weight,
                        masters=None if master is None else [],
                        rounding_seed=self._update_rounding_seed(param),
                    )
                batch.params.append(param)
                if master is not None:
                    batch.masters.append(master)
                batch.buffers.append(accumulation.step_buffer(param, grad))
                if grad is not None:
                    batch.grads.append(grad)
            for (flat_group, *_, state_key), batch in batches.items():
                device = flat_group.device
                backend = accumulation.backends[(device, flat_group.param_dtype)]
                scalars = None if window_scalars is None else window_scalars[device]
                if self._grad_stats is not None:
                    batch.grad_stats = self._grad_stats.table(batch.params, device)
                self._step_batch(group, backend, batch, state_key, scalars)
        if accumulation.state_shard is not None:
            self._reducer.gather_params(accumulation)
        accumulation.end_window()
        if self._grad_stats is not None:
            skip = None
            if window_scalars is not None and self._loss_scale is not None:
                skip = next(iter(window_scalars.values()))[0]
            self._grad_stats.end_window(applied=True, skip=skip)
        accumulation.update_count += 1
        if self._loss_scale is not None:
            self._loss_scale.end_window()
        return True

    def _warn_window_without_gradients(self) -> None:
        """Once: a whole window in which no parameter got a gradient, most likely
        because the model's parameters were replaced after the optimizer was made."""
        if self._warned_no_gradients:
            return
        self._warned_no_gradients = True
        warnings.warn(
            "a whole window ended without a gradient for any of the optimizer's "
            "parameters, so nothing was updated. If the model was wrapped after the "
            "optimizer was created (FSDP2's fully_shard, or anything else that replaces "
            "its parameters), create the optimizer afterwards, from model.parameters()",
            stacklevel=_first_caller_outside(("fused_accum.", "torch.")),
        )

    def _squares_of_sums(
        self, leaving_out: set[int] = frozenset()
    ) -> dict[torch.device, torch.Tensor]:
        """Per device, the sum of the squares of the window's sums, but for the
        parameters (ids) ``leaving_out``: one pass over those buffers (over this rank's
        pieces of them, with shard_state)."""
        accumulation = self._accumulation
        view = accumulation.buffer_view
        if accumulation.state_shard is not None:
            view = accumulation.buffer_piece
        squares = {device: torch.zeros(1, device=device) for device in accumulation.devices}
        for param in self._all_params():
            if id(param) in accumulation.holds_sum and id(param) not in leaving_out:
                buffer = view(param)
                squares[param.device].add_(sum_in_fixed_order(buffer.double().square()).float())
        return squares

    def _fold_last(
        self,
        fresh: list[tuple[torch.Tensor, torch.Tensor]],
        fresh_factor: float,
        grad_squares: dict[torch.device, torch.Tensor] | None = None,
    ) -> dict[torch.device, torch.Tensor] | None:
        """Fold the last micro-step's gradients like the others' (checking them for
        non-finite values and, when clipping, summing the squares of the window's sums
        on the way; the sums it does not touch are squared apart). Returns the sums of
        squares per device, or None without clipping."""
        squares = None
        if self.max_grad_norm is not None:
            squares = self._squares_of_sums(leaving_out={id(param) for param, _ in fresh})
        self._accumulation.fold(fresh, fresh_factor, self._found_inf(), squares, grad_squares)
        return squares

    def _window_scalars(
        self, squares: dict[torch.device, torch.Tensor] | None, weight: float
    ) -> dict[torch.device, torch.Tensor]:
        """Decide on the device whether the window is skipped and the factor on its
        mean gradient (clipping coefficient over loss scale): ``[skip, factor]`` as
        float64, per device. Nothing is read on the host."""
        devices = self._accumulation.devices
        home = devices[0]
        skip = torch.zeros((), device=home)
        factor = torch.ones((), device=home)
        mesh = self._accumulation.shard_mesh
        # the ranks that each hold part of the gradients: FSDP2's, or shard_state's
        norm_group = None if mesh is None else mesh.get_group()
        if self._accumulation.state_shard is not None:
            norm_group = self._reducer.group
        if self._loss_scale is not None:
            self._overflow_of_every_shard()
            skip = self._loss_scale.found_inf.reshape(()).clone()
            factor = self._loss_scale.scale.reshape(()).reciprocal()  # exact: a power of 2
        if squares is not None:
            total = torch.stack([squares[device].to(home) for device in devices]).sum()
            if norm_group is not None:  # the other ranks' shards too
                torch.distributed.all_reduce(total, group=norm_group)
            # the buffers hold sum(w * g) times the loss scale; the mean is that / weight
            norm = total.sqrt() / weight * factor
            coefficient = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            factor = coefficient * factor
            self._grad_norm = norm
        scalars = torch.stack([skip, factor]).double()
        return {device: scalars.to(device) for device in devices}

    def _overflow_of_every_shard(self) -> None:
        """With DTensor parameters, the loss scale's overflow flag raised on every rank
        if a non-finite value reached any rank's shard (one all-reduce, on the device)."""
        mesh = self._accumulation.shard_mesh
        if mesh is not None:
            torch.distributed.all_reduce(
                self._loss_scale.found_inf, torch.distributed.ReduceOp.MAX, group=mesh.get_group()
            )

    def _for_backend(
        self, batch: StepBatch, *states: list[torch.Tensor] | None
    ) -> tuple[StepBatch, ...]:
        """``batch`` and the state lists of its update as the backends take them: for
        DTensor parameters, their shards and the shards of their state; with
        shard_state, the pieces of the parameters and buffers in this rank's chunk (the
        state holds its pieces already)."""
        accumulation = self._accumulation
        if accumulation.state_shard is not None:
            params = [accumulation.param_piece(param) for param in batch.params]
            buffers = [accumulation.buffer_piece(param) for param in batch.params]
            return (replace(batch, params=params, buffers=buffers), *states)
        if not accumulation.shards:
            return (batch, *states)
        params = [accumulation.shard_of(param) for param in batch.params]
        masters = None if batch.masters is None else [local_tensor(m) for m in batch.masters]
        local = [None if state is None else [local_tensor(t) for t in state] for state in states]
        return (replace(batch, params=params, masters=masters), *local)

    def _create_state_for_checkpoint(self) -> None:
        """Every parameter's state as its first update would create it (and its master
        copy), without a micro-step: what torch.distributed.checkpoint's dummy step is
        for, so that a load has tensors to load into. Nothing an update reads changes:
        new state is zero, and a momentum made here is still started by the first
        update (``_momentum_not_started``)."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    self._prepare_state(group, param, for_checkpoint=True)
                    self._master_param(param)

    def _prepare_state(
        self, group: dict[str, Any], param: torch.Tensor, for_checkpoint: bool = False
    ) -> Hashable:
        """Create ``param``'s state if it has none yet (as torch.optim does, at its
        first update) and return what, besides the group, its update depends on.
        ``for_checkpoint``: created ahead of the first update (see
        ``_create_state_for_checkpoint``)."""
        raise NotImplementedError

    def _step_batch(
        self,
        group: dict[str, Any],
        backend: Backend,
        batch: StepBatch,
        state_key: Hashable,
        window_scalars: torch.Tensor | None,
    ) -> None:
        """Run one update on ``batch``; ``window_scalars`` is None, or ``[skip,
        factor]`` decided on the device (float64, on the batch's device), which the
        update must honour (see spec.StepBatch.device_scalars)."""
        raise NotImplementedError

    def _update_rounding_seed(self, param: torch.Tensor) -> int | None:
        """With ``stochastic_rounding``, the seed of this update for a bf16 parameter
        (a new one every update); else None."""
        if not self.stochastic_rounding or param.dtype != torch.bfloat16:
            return None
        return (self._rounding_seed + self._accumulation.update_count * 0x9E3779B9) % 2**31

    def _master_param(self, param: torch.Tensor) -> torch.Tensor | None:
        """With ``master_weights``, the fp32 master copy of a bf16/fp16 parameter,
        made from the parameter at its first update (or loaded); else None."""
        if not self.master_weights or param.dtype not in (torch.bfloat16, torch.float16):
            return None
        state = self.state[param]
        master = state.get("master_param")
        if master is None:
            accumulation = self._accumulation
            master = accumulation.state_view(param, "master_param")
            if accumulation.state_shard is not None:
                master.copy_(accumulation.param_piece(param))
            else:
                master.copy_(accumulation.shard_of(param))  # a DTensor's: its shard
            master = state["master_param"] = shown_like(master, param)
        return master

    def _count_view(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """``param``'s count ``name`` (see ``_count_state_names``): a 0-dim float32 view
        of its group's counts, on the host, or on the parameter's device with loss
        scaling (which decides on the device whether a window counts)."""
        device = param.device if self._loss_scale is not None else torch.device("cpu")
        return self._accumulation.count_view(param, name, device)

    def _new_state_view(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """A zeroed view of flat state ``name`` for ``param``, shown as ``param`` is
        (a DTensor for a DTensor parameter)."""
        view = self._accumulation.state_view(param, name)
        view.zero_()
        return shown_like(view, param)


def _first_caller_outside(packages: tuple[str, ...]) -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by our caller that names the first
    frame outside ``packages``: the user's call, whichever of our entry points (and
    torch's wrappers of them) it went through."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(packages):
        level, frame = level + 1, frame.f_back
    return level
