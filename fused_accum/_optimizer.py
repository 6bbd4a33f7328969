"""The optimizer layer shared by SGD, Adam and AdamW: the public API and the window's
bookkeeping (micro-steps, weights, when an update is applied). Its parts are mixins,
one responsibility each: parameter checks (_params.py), gradient intake in step() or
during backward (_intake.py), the update at the boundary (_update.py), gradient
statistics (_grad_stats.py) and the state dict (_state_dict.py).

Subclasses say which per-parameter state lives in flat storage, how to prepare a
parameter's state before an update, and how to run an update on a batch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ._accumulation import AccumulationState
from ._checkpoint import called_by_checkpoint
from ._checks import (
    check_accumulation_steps,
    check_max_grad_norm,
    check_partial_windows,
    check_shard_state,
    check_weight,
    param_tensors,
)
from ._docs import ACCUMULATION_ARGS_DOC
from ._grad_stats import GradStatsAccess, GradStatsTracker
from ._intake import _REDO_WINDOW, GradientIntake
from ._loss_scaling import DeviceLossScale, loss_scaling_settings
from ._params import ParameterChecks
from ._state_dict import StateDictMixin
from ._update import WindowUpdate
from .backends import check_backend_name
from .distributed import WindowReducer, check_ranks_agree

__all__ = ["ACCUMULATION_ARGS_DOC", "FusedAccumOptimizer"]


class FusedAccumOptimizer(
    ParameterChecks, GradientIntake, WindowUpdate, GradStatsAccess, StateDictMixin, Optimizer
):
    """Base class of the fused_accum optimizers; not used directly."""

    _flat_state_names: tuple[str, ...] = ()
    # per-parameter counts kept as views of one tensor per group (see _count_view)
    _count_state_names: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        accumulation_steps: int,
        backend: str,
        accumulate_in_backward: bool,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        loss_scaling: Any = False,
        process_group: Any = None,
        shard_state: bool = False,
        checkpoint_partial_windows: bool = False,
        track_grad_stats: bool = False,
    ) -> None:
        check_backend_name(backend)
        check_shard_state(shard_state, process_group, stochastic_rounding)
        check_partial_windows(checkpoint_partial_windows, process_group)
        self._grad_stats = GradStatsTracker() if track_grad_stats else None
        self._process_group = process_group
        self._reducer: WindowReducer | None = None
        self._max_grad_norm = check_max_grad_norm(max_grad_norm)
        self._loss_scaling = loss_scaling_settings(loss_scaling)
        self._loss_scale: DeviceLossScale | None = None
        self._grad_norm: torch.Tensor | None = None
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True; use the "
                f"torch.optim optimizer for differentiating through the update"
            )
        self._accumulation_steps = check_accumulation_steps(accumulation_steps)
        self.checkpoint_partial_windows = bool(checkpoint_partial_windows)
        self.backend = backend
        self.accumulate_in_backward = bool(accumulate_in_backward)
        if master_weights and stochastic_rounding:
            raise ValueError(
                "master_weights and stochastic_rounding are two answers to one problem; "
                "choose one (master weights cost 4 bytes per parameter, stochastic "
                "rounding none)"
            )
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        # Drawn from torch's generator, so torch.manual_seed makes runs repeatable; only
        # when asked for, so that a drop-in optimizer leaves the generator alone.
        self._rounding_seed = (
            int(torch.randint(0, 2**31, (1,)).item()) if stochastic_rounding else 0
        )
        self._accumulation = AccumulationState(backend)
        if process_group is not None:
            self._reducer = WindowReducer(process_group)
            if shard_state and self._reducer.world_size > 1:  # one rank: nothing to shard
                self._accumulation.state_shard = (self._reducer.rank, self._reducer.world_size)
        self._hooks: dict[torch.Tensor, torch.utils.hooks.RemovableHandle] = {}
        self._hooked_ids: set[int] = set()
        self._pending_weight = 1.0
        self._folded_since_step = False
        self._folded_ids: set[int] = set()
        # a fold in backward failed after others of its micro-batch had run
        self._incomplete_micro_batch = False
        self._drop_held()  # no gradients taken in backward yet
        self._warned_no_gradients = False
        super().__init__(params, defaults)
        if self._loss_scaling is not None:
            self._loss_scale = DeviceLossScale(self._loss_scaling, self._accumulation.devices[0])
        if process_group is not None:
            self._accumulation.adoption = False  # the all-reduce sums the flat buffers
            check_ranks_agree(
                self,
                process_group,
                settings={
                    "shard_state": bool(shard_state),
                    "max_grad_norm": self.max_grad_norm,
                    "loss_scaling": self._loss_scaling is not None,
                    "track_grad_stats": track_grad_stats,
                    "master_weights": self.master_weights,
                },
            )

    # ----------------------------------------------------------------- parameters

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group as torch.optim does; its parameters get accumulation
        buffers (and, with ``accumulate_in_backward``, backward hooks) at once."""
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = params = [params]
        elif not isinstance(params, set):  # torch.optim rejects sets with its own error
            param_group["params"] = params = list(params)
        if isinstance(params, list):
            self._check_new_params(param_tensors(params), len(self.param_groups))
            self._check_one_device(param_tensors(params))
            if self._accumulation.state_shard is not None:
                self._check_dense(param_tensors(params), len(self.param_groups))
                self._accumulation.check_chunks_stay(param_tensors(params))
        super().add_param_group(param_group)
        new_params = self.param_groups[-1]["params"]
        for flat_group in self._accumulation.add_params(new_params):
            self._rebind_state_views(flat_group.params)
        if self.accumulate_in_backward:
            self._register_hooks(new_params)
        if self._grad_stats is not None:
            self._grad_stats.partial_over = self._ranks_seeing_part()

    def _ranks_seeing_part(self) -> tuple[Any, bool] | None:
        """(process group, whether the micro-steps' gradients are partial too) where
        each rank's kernels see part of the gradients: FSDP2's shards, or shard_state's
        chunks of the window's sums; None where they see them whole."""
        mesh = self._accumulation.shard_mesh
        if mesh is not None:
            return mesh.get_group(), True
        if self._accumulation.state_shard is not None:
            return self._reducer.group, False
        return None

    # ------------------------------------------------------------------ the window

    @property
    def backends(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """The backend each (device, dtype) group of parameters runs on, as ``backend``
        (what was asked for, ``"auto"`` by default) resolved for it."""
        return {key: backend.name for key, backend in self._accumulation.backends.items()}

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping threshold of the window's mean gradient (None: no clipping). May
        be set between windows, for example by a trainer integration that routes the
        trainer's own clipping setting here."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._refuse_if_wrapped("max_grad_norm = ...")
        value = check_max_grad_norm(value)
        accumulation = self._accumulation
        mixed = bool(accumulation.shards) and len(accumulation.shards) < len(accumulation.slots)
        if value is not None and mixed:
            raise ValueError(
                "the parameters mix DTensors (FSDP2) with plain tensors: max_grad_norm sums "
                "each rank's shards over the mesh, where a plain parameter would count once "
                "per rank"
            )
        self._max_grad_norm = value

    @property
    def accumulation_steps(self) -> int:
        """Micro-steps per update; may be changed between micro-steps."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
        self._refuse_if_wrapped("accumulation_steps = ...")
        self._accumulation_steps = check_accumulation_steps(value)

    @property
    def micro_step_count(self) -> int:
        """Calls of step() so far."""
        return self._accumulation.micro_step_count

    @property
    def window_micro_steps(self) -> int:
        """Micro-steps accumulated in the current window."""
        return self._accumulation.window_micro_steps

    @property
    def window_weight(self) -> float:
        """Sum of the weights of the current window's micro-steps."""
        return self._accumulation.window_weight

    @property
    def last_step_applied(self) -> bool:
        """Whether the last step() or flush() ended a window and applied an update."""
        return self._accumulation.last_step_applied

    @property
    def loss_scale(self) -> torch.Tensor | None:
        """With ``loss_scaling``: the current loss scale, a one-element fp32 tensor on
        the parameters' device (read it only when you need it: ``.item()`` waits for
        the device). None without."""
        return None if self._loss_scale is None else self._loss_scale.scale

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """With ``max_grad_norm``: the global L2 norm of the last window's mean gradient
        before clipping, as ``clip_grad_norm_`` returns it (a device tensor, fp32; not
        finite for a window skipped for an overflow of this rank's gradients). None
        before the first update or without clipping."""
        return self._grad_norm

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale, to call backward on (with
        ``loss_scaling``). The gradients are unscaled inside the update."""
        if self._loss_scale is None:
            raise RuntimeError(
                "scale_loss() needs loss_scaling=True (or a LossScaling) when the "
                "optimizer is created"
            )
        return loss * self._loss_scale.scale.reshape(()).to(loss.device)

    def _found_inf(self) -> torch.Tensor | None:
        return None if self._loss_scale is None else self._loss_scale.found_inf

    @property
    def update_count(self) -> int:
        """Updates applied so far, by step() or flush(). With ``loss_scaling`` this
        counts the windows ended, including those skipped on the device."""
        return self._accumulation.update_count

    def set_weight(self, weight: float | torch.Tensor) -> None:
        """Set the weight of the current micro-batch: the one whose backward comes next
        with ``accumulate_in_backward=True``, or the next step() without ``weight=``.
        It applies to one micro-step; then the weight is 1 again.

        With ``accumulate_in_backward=True``, once backward has folded gradients of the
        micro-batch its weight can no longer change (they were folded with it): a
        different weight then raises an error."""
        self._refuse_if_wrapped("set_weight()")
        weight = check_weight(weight)
        if self._folded_since_step and weight != self._pending_weight:
            raise RuntimeError(
                f"backward already folded this micro-batch's gradients with weight "
                f"{self._pending_weight}; give the weight before its backward "
                f"(set_weight(), then backward, then step())"
            )
        self._pending_weight = weight

    def _refuse_if_wrapped(self, what: str) -> None:
        """A wrapper that forwards reads to us but keeps writes for itself (Lightning's
        ``LightningOptimizer`` subclasses our class) would silently keep the setting."""
        if "_accumulation" not in vars(self):
            raise RuntimeError(
                f"{what} was called on a wrapper of the optimizer ({type(self).__name__}), "
                f"which would keep the setting itself and leave the optimizer as it was: call "
                f"it on fused_accum.integrations.unwrap_optimizer(...) (in Lightning, "
                f"unwrap_optimizer(self.optimizers()))"
            )

    def _refuse_if_incomplete(self) -> None:
        if self._incomplete_micro_batch:
            raise RuntimeError(
                f"a fold in backward failed after others of the same micro-batch had "
                f"run: {_REDO_WINDOW}"
            )

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        weight: float | torch.Tensor | None = None,
    ) -> Any:
        """One micro-step: fold every present ``.grad`` into the accumulation buffers
        (weighted by ``weight``, default 1) and release it; on every
        ``accumulation_steps``-th call, apply the update with the window's weighted
        mean gradient and start a new window. Returns the closure's loss, if any.

        A window's first gradient of an fp32 parameter that nothing else references
        (as backward makes it) is not copied but kept as the parameter's buffer until
        the window ends, as autograd keeps the first gradient as ``.grad``.

        Step hooks (``register_step_pre_hook``, ``register_step_post_hook``) run around
        every micro-step, as torch.optim runs them around its step."""
        if not self.state and called_by_checkpoint("_init_optim_state"):
            # torch.distributed.checkpoint's dummy step (see _checkpoint.py): the state
            # it would create, and the window left alone
            self._create_state_for_checkpoint()
            return None
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        ):
            return self._traced_micro_step(closure, weight=weight)
        return self._micro_step(closure, weight=weight)

    def _patch_step_function(self) -> None:
        """torch.optim wraps ``step`` in its step hooks and a profiler range, about 7 us
        a call, which a micro-step on every batch pays: here step() goes through that
        wrapper (``_traced_micro_step``) only when there are hooks or a profiler."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    @torch.no_grad()
    def _micro_step(
        self, closure: Callable[[], Any] | None, *, weight: float | torch.Tensor | None
    ) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if weight is not None and self.accumulate_in_backward:
            raise ValueError(
                "with accumulate_in_backward=True the gradients are folded in during "
                "backward; give the micro-batch weight before backward with "
                "optimizer.set_weight(weight) instead of step(weight=...)"
            )
        self._fold_held()  # normally done at the end of backward already
        self._refuse_if_incomplete()
        weight = self._pending_weight if weight is None else check_weight(weight)
        if weight != 1.0 and self._accumulation.shards:
            raise ValueError(
                "micro-batch weights do not work with DTensor (FSDP2) parameters yet: FSDP2 "
                "averages each micro-batch's gradients over the ranks (and without "
                "gradient sync sums the window's micro-batches itself) before step() sees "
                "them; weigh the loss instead"
            )
        inverse_loss_scale, overflow = self._grad_scaler_inputs()
        accumulation = self._accumulation
        factor = weight * inverse_loss_scale
        boundary = accumulation.window_micro_steps + 1 >= self.accumulation_steps
        grad_squares = self._micro_step_squares(inverse_loss_scale)
        pairs = self._take_micro_batch(factor, grad_squares, boundary, overflow)
        if not boundary and self._grad_stats is not None:
            self._grad_stats.close_micro_step()
        # the micro-batch is taken: its weight and its folds in backward are counted now
        self._pending_weight = 1.0
        self._folded_since_step = False
        self._folded_ids.clear()
        if self.accumulate_in_backward:  # parameters unfrozen since: fold them in backward
            self._register_hooks(self._accumulation.ordered)
        accumulation.micro_step_count += 1
        accumulation.window_micro_steps += 1
        accumulation.window_weight += weight
        applied = False
        # data parallel: every rank takes part in the boundary's collectives
        if boundary and (self._reducer is not None or not accumulation.overflowed):
            applied = self._apply_window(pairs, factor)
        elif boundary:
            accumulation.end_window()
            if self._grad_stats is not None:
                self._grad_stats.discard()
        accumulation.last_step_applied = applied
        return loss

    # torch.optim's wrapper of step(): hooks and the profiler's range around a micro-step
    _traced_micro_step = Optimizer.profile_hook_step(_micro_step)

    # torch.amp.GradScaler.step() then hands us the loss scale and its inf check as the
    # attributes grad_scale and found_inf, and leaves skipping to us.
    _step_supports_amp_scaling = True

    def _grad_scaler_inputs(self) -> tuple[float, bool]:
        """(1 / loss scale, whether this micro-batch's gradients overflowed): (1, False)
        unless step() is called by a GradScaler. Reads two scalars on the host."""
        if not hasattr(self, "found_inf"):
            return 1.0, False
        if self._loss_scale is not None:
            raise RuntimeError(
                "this optimizer scales the loss itself (loss_scaling); a "
                "torch.amp.GradScaler on top would scale twice: use one or the other"
            )
        if self._accumulation.shards:
            raise RuntimeError(
                "torch.amp.GradScaler's overflow check is per rank, and a non-finite value "
                "reaches only the rank holding that shard: with DTensor (FSDP2) parameters "
                "use loss_scaling=True, whose check covers every rank"
            )
        if self.accumulate_in_backward:
            raise RuntimeError(
                "torch.amp.GradScaler cannot be used with accumulate_in_backward=True: the "
                "backward hooks fold the scaled gradients before the scaler checks them; "
                "use accumulate_in_backward=False with a GradScaler"
            )
        overflow = bool(self.found_inf)
        grad_scale = getattr(self, "grad_scale", None)  # None: unscale_() was called
        return (1.0 if grad_scale is None else 1.0 / float(grad_scale)), overflow

    @torch.no_grad()
    def flush(self) -> bool:
        """Apply the current partial window now, normalised by the weight it holds (the
        end of an epoch whose micro-batch count is not a multiple of
        ``accumulation_steps``). Returns whether an update was applied; with no
        micro-step in the window it does nothing."""
        self._refuse_if_incomplete()
        if self._folded_since_step:
            raise RuntimeError(
                "gradients were folded in by backward after the last step(); call "
                "step() for that micro-batch before flush()"
            )
        if self._accumulation.window_micro_steps == 0:
            return False
        if self._accumulation.overflowed and self._reducer is None:
            self.discard_window()  # a GradScaler saw an overflow: the window is skipped whole
            self._accumulation.last_step_applied = False
            return False
        applied = self._apply_window([], 0.0)
        self._accumulation.last_step_applied = applied
        return applied

    def discard_window(self) -> None:
        """Drop everything accumulated since the last update (buffers, micro-step count
        and weight, the weight given by :meth:`set_weight`, and any part of a
        micro-batch folded in backward) without applying it. zero_grad() never does
        this.

        After a fold in backward failed part-way through a micro-batch, the gradients
        that backward left in ``.grad`` (the refused ones) belong to that micro-batch
        and are dropped too, so that redoing it does not add them in again."""
        if self._incomplete_micro_batch:
            for param in self._hooks:
                param.grad = None
        self._drop_held()
        self._accumulation.end_window()
        if self._grad_stats is not None:
            self._grad_stats.discard()
        if self._loss_scale is not None:
            self._loss_scale.found_inf.zero_()
        self._pending_weight = 1.0
        self._folded_since_step = False
        self._folded_ids.clear()
        self._incomplete_micro_batch = False

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled or deep-copied: its accumulation "
            f"buffers and backward hooks do not travel that way. Save state_dict() and "
            f"load it into a new optimizer instead"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_setdefaults().items():
                group.setdefault(key, value)
        self.state = defaultdict(dict, self.state)

    def _group_setdefaults(self) -> dict[str, Any]:
        """Group keys a loaded state dict may lack, with the value to assume."""
        return {}
