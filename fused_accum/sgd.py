"""FusedAccumSGD: torch.optim.SGD with exact fp32 gradient accumulation."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import torch

from ._optimizer import ACCUMULATION_ARGS_DOC, FusedAccumOptimizer
from .backends import Backend, SgdHyperparams, StepBatch


class FusedAccumSGD(FusedAccumOptimizer):
    __doc__ = (
        r"""Stochastic gradient descent (optionally with momentum) that owns gradient
    accumulation. A drop-in replacement for :class:`torch.optim.SGD`: the same
    arguments, validation, param groups, LR schedulers and state dict.

    **Accumulation.** Each parameter has a persistent fp32 accumulation buffer (fp64
    for fp64 parameters), stored flat per (device, dtype). Every call of :meth:`step` is
    one micro-step: it adds ``weight * p.grad`` into the buffer, in fp32 whatever the
    parameter's dtype, and releases ``p.grad`` (sets it to None). Every
    ``accumulation_steps``-th call applies one update with the window's weighted mean
    gradient

    .. math::
        g = \frac{\sum_i w_i g_i}{\sum_i w_i}

    and starts a new window. With the default ``weight=1`` this is the mean gradient of
    the window, so the loss is *not* divided by ``accumulation_steps``; passing each
    micro-batch's item or token count as ``weight`` gives the exact large-batch gradient
    when micro-batches differ in size. A parameter whose ``.grad`` is None in a
    micro-step contributes zero to it; one with no gradient in the whole window is not
    updated at all (as torch.optim skips parameters whose grad is None). With
    ``accumulation_steps=1`` (the default) every step() updates with torch.optim.SGD's
    results (bit for bit with ``backend="torch"``, within fp32 rounding on the fused
    backends), so the classic loop that divides the loss by N and calls step() only
    every N micro-batches works unchanged.

    :meth:`flush` applies a partial window (the end of an epoch); :meth:`discard_window`
    drops it. ``zero_grad()`` only clears ``.grad``, never the buffers.

    **Update** (torch.optim.SGD's, on the applied gradient g, in fp32, with the
    parameter rounded once to its dtype):

    .. math::
        g \leftarrow \pm g + \lambda \theta, \quad
        b \leftarrow \mu b + (1 - \tau) g \ (b = g \text{ at the first update}), \quad
        \theta \leftarrow \theta - \gamma (g + \mu b \text{ if nesterov else } b)

    Momentum buffers are kept in fp32 (fp64 for fp64 parameters).

    Args:
        params: parameters or param groups, as for torch.optim.SGD (also
            ``(name, parameter)`` pairs).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        foreach, fused: accepted for compatibility and ignored: ``backend`` chooses the
            implementation.
        differentiable: must be False.
"""
        + ACCUMULATION_ARGS_DOC
    )

    _flat_state_names = ("momentum_buffer", "master_param")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        accumulation_steps: int = 1,
        backend: str = "auto",
        accumulate_in_backward: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        loss_scaling: Any = False,
        process_group: Any = None,
        shard_state: bool = False,
        checkpoint_partial_windows: bool = False,
        track_grad_stats: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        # ids of momentum buffers made ahead of the first update (for a checkpoint)
        self._momentum_not_started: set[int] = set()
        super().__init__(
            params,
            defaults,
            accumulation_steps=accumulation_steps,
            backend=backend,
            accumulate_in_backward=accumulate_in_backward,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            max_grad_norm=max_grad_norm,
            loss_scaling=loss_scaling,
            process_group=process_group,
            shard_state=shard_state,
            checkpoint_partial_windows=checkpoint_partial_windows,
            track_grad_stats=track_grad_stats,
        )

    def _group_setdefaults(self) -> dict[str, Any]:
        return {
            "nesterov": False,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }

    def _prepare_state(
        self, group: dict[str, Any], param: torch.Tensor, for_checkpoint: bool = False
    ) -> Hashable:
        if group["momentum"] == 0:
            return None
        state = self.state[param]
        if state.get("momentum_buffer") is not None:
            if id(param) in self._momentum_not_started:
                self._momentum_not_started.discard(id(param))
                return True
            return False
        state["momentum_buffer"] = self._new_state_view(param, "momentum_buffer")
        if for_checkpoint:
            # made before any update: the first one still starts it from its gradient
            self._momentum_not_started.add(id(param))
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._momentum_not_started.clear()  # the loaded buffers are what they say

    def _step_batch(
        self,
        group: dict[str, Any],
        backend: Backend,
        batch: StepBatch,
        state_key: Hashable,
        window_scalars: torch.Tensor | None,
    ) -> None:
        hyper = SgdHyperparams.from_group(group)
        init_momentum = bool(state_key)
        batch.device_scalars = window_scalars
        # A first update that is skipped must leave the momentum to be initialised by
        # the next one; with dampening that is another formula, so here (the first
        # update of SGD with dampening and loss scaling, only) the flag is read on the host.
        first_may_skip = init_momentum and hyper.dampening != 0 and self._loss_scale is not None
        if first_may_skip and bool(window_scalars[0] != 0):
            for param in batch.params:
                del self.state[param]["momentum_buffer"]
            return
        momentum_buffers = None
        if hyper.momentum:
            momentum_buffers = [self.state[p]["momentum_buffer"] for p in batch.params]
        backend.sgd_step(
            *self._for_backend(batch, momentum_buffers),
            hyper,
            init_momentum=init_momentum,
        )
