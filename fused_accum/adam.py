"""FusedAccumAdam and FusedAccumAdamW: torch.optim.Adam/AdamW with exact fp32
gradient accumulation. One class holds both; AdamW only changes the default weight
decay and makes it decoupled."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import torch

from ._optimizer import ACCUMULATION_ARGS_DOC, FusedAccumOptimizer
from .backends import AdamHyperparams, Backend, StepBatch

_ACCUMULATION_DOC = r"""
    **Accumulation.** Each parameter has a persistent fp32 accumulation buffer (fp64
    for fp64 parameters), stored flat per (device, dtype). Every call of :meth:`step` is
    one micro-step: it adds ``weight * p.grad`` into the buffer, in fp32 whatever the
    parameter's dtype, and releases ``p.grad`` (sets it to None). Every
    ``accumulation_steps``-th call applies one update with the window's weighted mean
    gradient :math:`g = \sum_i w_i g_i / \sum_i w_i` and starts a new window. With the
    default ``weight=1`` this is the window's mean gradient, so the loss is *not*
    divided by ``accumulation_steps``; passing each micro-batch's item or token count as
    ``weight`` gives the exact large-batch gradient when micro-batches differ in size.
    A parameter whose ``.grad`` is None in a micro-step contributes zero to it; one with
    no gradient in the whole window is not updated (its step count does not advance),
    as torch.optim skips parameters whose grad is None. With ``accumulation_steps=1``
    (the default) every step() updates with torch.optim's results (bit for bit with
    ``backend="torch"``, within fp32 rounding on the fused backends).

    :meth:`flush` applies a partial window (the end of an epoch); :meth:`discard_window`
    drops it. ``zero_grad()`` only clears ``.grad``, never the buffers.

    The moments ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) are kept in fp32
    (fp64 for fp64 parameters) whatever the parameter's dtype; the update is computed in
    fp32 and the parameter rounded once.

    Args:
        params: parameters or param groups, as for torch.optim (also
            ``(name, parameter)`` pairs).
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam/AdamW.
        foreach, fused: accepted for compatibility and ignored: ``backend`` chooses the
            implementation.
        capturable, differentiable: must be False.
"""


def _check_adam_arguments(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """torch.optim.Adam's checks, with its messages."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        all(isinstance(beta, float) for beta in betas)
        or all(isinstance(beta, torch.Tensor) for beta in betas)
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")


class FusedAccumAdam(FusedAccumOptimizer):
    __doc__ = (
        r"""Adam that owns gradient accumulation. A drop-in replacement for
    :class:`torch.optim.Adam`: the same arguments, validation, param groups, LR
    schedulers and state dict. ``decoupled_weight_decay=True`` makes it AdamW.
    """
        + _ACCUMULATION_DOC
        + ACCUMULATION_ARGS_DOC
    )

    _flat_state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _count_state_names = ("step",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
        _check_adam_arguments(lr, betas, eps, weight_decay)
        self._step_history: dict[int, Hashable] = {}
        self._host_steps: dict[int, int] = {}  # id(param): its step count, as the host knows it
        if capturable:
            raise ValueError(
                f"{type(self).__name__} does not support capturable=True yet; its steps "
                f"take the learning rate and step count from the host"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
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
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": self.defaults["decoupled_weight_decay"],
        }

    def _prepare_state(
        self, group: dict[str, Any], param: torch.Tensor, for_checkpoint: bool = False
    ) -> Hashable:
        state = self.state[param]
        if "step" not in state:
            state["step"] = self._count_view(param, "step")
            state["step"].zero_()
            state["exp_avg"] = self._new_state_view(param, "exp_avg")
            state["exp_avg_sq"] = self._new_state_view(param, "exp_avg_sq")
            self._step_history[id(param)] = ("new",)
        if group["amsgrad"] and state.get("max_exp_avg_sq") is None:
            state["max_exp_avg_sq"] = self._new_state_view(param, "max_exp_avg_sq")
        if self._loss_scale is None:
            return self._host_step(param, state)
        return self._device_step_key(param, state)

    def _host_step(self, param: torch.Tensor, state: dict[str, Any]) -> int:
        """``param``'s step count, from the host's copy of it: the state's tensor is
        read once (new or loaded state), not at every update."""
        step = self._host_steps.get(id(param))
        if step is None:
            step = self._host_steps[id(param)] = int(state["step"].item())
        return step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._step_history.clear()  # the loaded step counts are read at the next update
        self._host_steps.clear()

    def _device_step_key(self, param: torch.Tensor, state: dict[str, Any]) -> Hashable:
        """With loss scaling a window may be skipped on the device, so the step count
        lives there (as torch's capturable Adam keeps it) and the host cannot batch
        parameters by its value. It batches them by their update history instead:
        parameters that took part in the same windows have the same device step."""
        key = self._step_history.get(id(param))
        if key is None:  # loaded state: read the count once
            key = self._step_history[id(param)] = ("loaded", int(state["step"].item()))
        return key

    def _step_batch(
        self,
        group: dict[str, Any],
        backend: Backend,
        batch: StepBatch,
        state_key: Hashable,
        window_scalars: torch.Tensor | None,
    ) -> None:
        states = [self.state[p] for p in batch.params]
        hyper = AdamHyperparams.from_group(group)
        device_steps = window_scalars is not None and self._loss_scale is not None
        if device_steps:
            # bias corrections of the device's step count, in float64 as the host's
            step = 1  # unused by the kernels
            applied = 1 - window_scalars[0]
            count = states[0]["step"].double() + applied
            corrections = torch.stack(
                [hyper.lr / (1 - hyper.beta1**count), (1 - hyper.beta2**count).sqrt()]
            )
            batch.device_scalars = torch.cat([window_scalars, corrections])
        else:
            step = state_key + 1
            if window_scalars is not None:  # filled on the device: no copy to wait for
                scalars = window_scalars.new_empty(4)
                scalars[:2] = window_scalars
                # fill_ passes the value to a kernel; item assignment would copy it from
                # pageable host memory, a blocking upload
                scalars[2].fill_(hyper.lr / (1 - hyper.beta1**step))
                scalars[3].fill_((1 - hyper.beta2**step) ** 0.5)
                batch.device_scalars = scalars
        backend.adam_step(
            *self._for_backend(
                batch,
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [state["max_exp_avg_sq"] for state in states] if hyper.amsgrad else None,
            ),
            hyper,
            step=step,
        )
        if device_steps:
            self._accumulation.advance_counts(batch.params, "step", applied.float())
            for param in batch.params:
                self._step_history[id(param)] = hash((state_key, self.update_count))
        else:
            # one add for the batch's counts, which the host keeps too
            self._accumulation.advance_counts(batch.params, "step", 1.0)
            for param in batch.params:
                self._host_steps[id(param)] = step


class FusedAccumAdamW(FusedAccumAdam):
    __doc__ = (
        r"""AdamW (Adam with decoupled weight decay) that owns gradient accumulation. A
    drop-in replacement for :class:`torch.optim.AdamW`: the same arguments (weight decay
    0.01 by default), validation, param groups, LR schedulers and state dict.
    """
        + _ACCUMULATION_DOC
        + ACCUMULATION_ARGS_DOC
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
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
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
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
