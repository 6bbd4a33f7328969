"""The optimizer layer shared by SGD, Adam and AdamW: window bookkeeping, gradient
intake (in step() or during backward) and parameter checks; state_dict comes from
_state_dict.StateDictMixin.

Subclasses say which per-parameter state lives in flat storage, how to prepare a
parameter's state before an update, and how to run an update on a batch."""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from ._accumulation import AccumulationState
from ._checks import check_accumulation_steps, check_max_grad_norm, check_weight, param_tensors
from ._grad_stats import GradStatsTracker
from ._loss_scaling import DeviceLossScale, loss_scaling_settings
from ._ownership import is_private
from ._state_dict import StateDictMixin
from ._sums import sum_in_fixed_order
from .backends import Backend, StepBatch, check_backend_name
from .distributed import WindowReducer, check_ranks_agree

# The arguments every fused_accum optimizer adds to torch.optim's, for their docstrings.
ACCUMULATION_ARGS_DOC = """        accumulation_steps: micro-steps per update (>= 1).
        backend: ``"auto"`` (the fastest available per (device, dtype) group),
            ``"torch"`` (the pure-PyTorch reference), ``"triton"``, ``"cpu"`` or
            ``"cuda"``; an explicit one that cannot serve a group raises an error.
        accumulate_in_backward: fold each gradient into its buffer during backward, as
            soon as autograd produces it, and free it, so the whole model's ``.grad``
            never exists at once. step() then only counts and applies; give a
            micro-batch's weight with :meth:`set_weight` before its backward.
        master_weights: keep an fp32 master copy of every bf16/fp16 parameter (state
            ``"master_param"``, saved in the state dict): the update is applied to the
            master and the parameter receives it rounded, so that updates smaller than
            the parameter's precision are not lost. No effect on fp32/fp64 parameters.
        stochastic_rounding: round bf16 parameters stochastically after each update
            (unbiased: small updates survive on average, at no memory cost), with a
            seed drawn from torch's generator at construction and saved in the state
            dict. The alternative to ``master_weights``; fp16 parameters still round to
            nearest.
        max_grad_norm: clip the window's mean gradient to this global L2 norm before
            the update, as ``torch.nn.utils.clip_grad_norm_`` on it would; the norm
            (before clipping) is then :attr:`grad_norm`, a device tensor. The squares
            are summed by the last micro-step's accumulate pass and the clipping
            factor applied by the step, so no host synchronisation is needed.
        loss_scaling: built-in dynamic loss scaling for fp16 training, without a
            GradScaler and without host synchronisation: ``True`` (GradScaler's
            defaults) or a :class:`LossScaling`. Call ``optimizer.scale_loss(loss)
            .backward()``; a non-finite gradient in any micro-batch skips the whole
            window on the device, and the scale backs off or grows there. All
            parameters must be on one device.
        process_group: data parallel training on torch.distributed: each rank
            accumulates its own micro-batches, and at the window boundary the fp32
            buffers are summed over the ranks of this group (for example
            ``torch.distributed.group.WORLD``) once, in asynchronous buckets, and the
            window weights too, so the update is the weighted mean over every
            micro-batch of every rank. None (the default): one process.
        track_grad_stats: keep gradient statistics on the device, computed by the
            kernels that already read the gradients (the one extra read is of adopted
            first gradients, in place of their copy): per parameter mean |g|, max |g|
            and L2 norm of each window's applied gradient, each micro-step's gradient
            norm, and the history of the window norms.
            Read them with :meth:`grad_stats`, :meth:`micro_step_grad_norms` and
            :meth:`grad_norm_history`; plot them with ``fused_accum.plot_grad_flow``.
"""


# What to do when a fold in backward failed after others of its micro-batch had run.
_REDO_WINDOW = (
    "the window holds part of a micro-batch, which repeating it cannot mend; call "
    "discard_window() (which also drops the .grad backward left) and redo the window's "
    "micro-batches"
)


class FusedAccumOptimizer(StateDictMixin, Optimizer):
    """Base class of the fused_accum optimizers; not used directly."""

    _flat_state_names: tuple[str, ...] = ()

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
        track_grad_stats: bool = False,
    ) -> None:
        check_backend_name(backend)
        self._grad_stats = GradStatsTracker() if track_grad_stats else None
        self._process_group = process_group
        self._reducer: WindowReducer | None = None
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self._loss_scaling = loss_scaling_settings(loss_scaling)
        self._loss_scale: DeviceLossScale | None = None
        self._grad_norm: torch.Tensor | None = None
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True; use the "
                f"torch.optim optimizer for differentiating through the update"
            )
        self._accumulation_steps = check_accumulation_steps(accumulation_steps)
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
        self._hooks: dict[torch.Tensor, torch.utils.hooks.RemovableHandle] = {}
        self._pending_weight = 1.0
        self._folded_since_step = False
        # a fold in backward failed after others of its micro-batch had run
        self._incomplete_micro_batch = False
        super().__init__(params, defaults)
        if self._loss_scaling is not None:
            self._loss_scale = DeviceLossScale(self._loss_scaling, self._accumulation.devices[0])
        if process_group is not None:
            self._reducer = WindowReducer(process_group)
            self._accumulation.adoption = False  # the all-reduce sums the flat buffers
            check_ranks_agree(self, process_group)

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
        super().add_param_group(param_group)
        new_params = self.param_groups[-1]["params"]
        for flat_group in self._accumulation.add_params(new_params):
            self._rebind_state_views(flat_group.params)
        if self.accumulate_in_backward:
            self._register_hooks(new_params)

    def _check_new_params(self, params: list[torch.Tensor], group_index: int) -> None:
        seen: set[torch.Tensor] = set()
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
            if param.layout != torch.strided:
                raise ValueError(
                    f"{where} has layout {param.layout}; only dense (strided) parameters "
                    f"are supported"
                )

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
                    state[name] = self._accumulation.state_view(param, name)

    # -------------------------------------------------------------- gradient intake

    def _check_grad(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        consequence: str = "nothing was accumulated",
    ) -> None:
        group, index = self._accumulation.slots[id(param)]
        shape = group.shapes[index]
        # the common case, cheaply: every micro-step checks every parameter
        if (
            grad.layout is torch.strided
            and grad.dtype is param.dtype is group.param_dtype
            and grad.shape == param.shape == shape
            and grad.device == param.device == group.device
        ):
            return
        problem = None
        if (param.device, param.dtype, param.shape) != (
            group.device,
            group.param_dtype,
            shape,
        ):
            problem = (
                f"is now {param.dtype} of shape {tuple(param.shape)} on {param.device} but "
                f"was {group.param_dtype} of shape {tuple(shape)} "
                f"on {group.device} when the optimizer took it; create the optimizer after "
                f"moving, casting or resizing the model"
            )
        elif grad.is_sparse or grad.layout != torch.strided:
            problem = (
                f"has a sparse gradient ({grad.layout}); fused_accum accumulates dense "
                f"gradients only: build the embedding with sparse=False, or use "
                f"torch.optim.SparseAdam for it"
            )
        elif grad.dtype != param.dtype:
            problem = f"has a gradient of dtype {grad.dtype} but is {param.dtype}"
        elif grad.shape != param.shape:
            problem = (
                f"has a gradient of shape {tuple(grad.shape)} but has shape {tuple(param.shape)}"
            )
        elif grad.device != param.device:
            problem = f"has a gradient on {grad.device} but lives on {param.device}"
        if problem is not None:
            raise RuntimeError(f"{self._describe(param)} {problem}; {consequence}")

    def _take_grads(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], set[int]]:
        """Every present .grad, checked first and only then released (set to None),
        and the ids of the parameters whose gradient is now referenced nowhere else."""
        params = [param for param in self._all_params() if param.grad is not None]
        for param in params:
            self._check_grad(param, param.grad)
        pairs, private = [], set()
        accumulation = self._accumulation
        for param in params:
            grad = param.grad
            param.grad = None
            # only a window's first gradient of a parameter may be adopted
            first = id(param) not in accumulation.holds_sum
            if accumulation.adoption and first and is_private(grad):
                private.add(id(param))
            pairs.append((param, grad))
        return pairs, private

    def _register_hooks(self, params: list[torch.Tensor]) -> None:
        optimizer_ref = weakref.ref(self)

        def fold_in_backward(param: torch.Tensor) -> None:
            optimizer = optimizer_ref()
            if optimizer is None or param.grad is None:
                return
            optimizer._refuse_if_incomplete()
            # Backward stops at the first error, but the hooks that ran before folded
            # their gradients: the window then holds part of a micro-batch, which no
            # repetition can mend, so it must be discarded.
            partial = optimizer._folded_since_step
            consequence = "nothing was accumulated"
            if partial:
                consequence = (
                    f"its gradient was not accumulated, but backward had already folded "
                    f"other gradients of this micro-batch: {_REDO_WINDOW} (step(), "
                    f"flush() and backward refuse until then)"
                )
            grad = param.grad
            try:
                optimizer._check_grad(param, grad, consequence)
                param.grad = None
                private = {id(param)} if is_private(grad) else ()  # before a list holds it
                optimizer._accumulation.fold(
                    [(param, grad)],
                    optimizer._pending_weight,
                    optimizer._found_inf(),
                    grad_sum_sq=optimizer._micro_step_squares(1.0),
                    private=private,
                )
            except BaseException:
                param.grad = grad  # not folded: the gradient stays where it was
                optimizer._incomplete_micro_batch = partial
                raise
            optimizer._folded_since_step = True

        for param in params:
            if param.requires_grad and param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(fold_in_backward)

    # ------------------------------------------------------------------ the window

    @property
    def accumulation_steps(self) -> int:
        """Micro-steps per update; may be changed between micro-steps."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value: int) -> None:
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

    def _micro_step_squares(self, inverse_loss_scale: float) -> dict | None:
        """With ``track_grad_stats``, where this micro-step's gradients leave the sums
        of their squares (per device); else None."""
        if self._grad_stats is None:
            return None
        scale: Any = inverse_loss_scale
        if self._loss_scale is not None:
            scale = self._loss_scale.scale.reshape(()).reciprocal()
        return self._grad_stats.micro_step_sums(self._accumulation.devices, scale)

    def grad_stats(self) -> list[dict[str, Any]]:
        """With ``track_grad_stats``: per parameter updated by the last applied window,
        in model order, ``{"name", "mean_abs", "max_abs", "norm"}`` of its applied
        gradient (the window's mean, after clipping and unscaling). Names come from
        ``named_parameters()`` when the optimizer was given them, else "group.index".
        Reads the device (a host synchronisation), so call it when you need it."""
        tracker = self._require_grad_stats()
        rows: dict[int, torch.Tensor] = {}
        for params, table in tracker.last_tables:
            values = table.cpu()
            for param, row in zip(params, values, strict=True):
                rows[id(param)] = row
        stats = []
        for group_index, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                row = rows.get(id(param))
                if row is None:
                    continue
                stats.append({
                    "name": names[index] if names else f"{group_index}.{index}",
                    "mean_abs": row[0].item() / max(param.numel(), 1),
                    "max_abs": row[2].item(),
                    "norm": row[1].sqrt().item(),
                })  # fmt: skip
        return stats

    def micro_step_grad_norms(self) -> torch.Tensor | None:
        """With ``track_grad_stats``: the L2 norm of each micro-step's gradient in the
        last applied window (unweighted, unscaled; this rank's), a device tensor."""
        return self._require_grad_stats().micro_step_norms()

    def grad_norm_history(self) -> torch.Tensor:
        """With ``track_grad_stats``: the global L2 norm of the applied gradient of
        every window so far that reached the step, a device tensor (NaN for a window
        skipped on the device by ``loss_scaling``)."""
        return self._require_grad_stats().history()

    def _require_grad_stats(self) -> GradStatsTracker:
        if self._grad_stats is None:
            raise RuntimeError(
                "gradient statistics need track_grad_stats=True when the optimizer is created"
            )
        return self._grad_stats

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
        weight = check_weight(weight)
        if self._folded_since_step and weight != self._pending_weight:
            raise RuntimeError(
                f"backward already folded this micro-batch's gradients with weight "
                f"{self._pending_weight}; give the weight before its backward "
                f"(set_weight(), then backward, then step())"
            )
        self._pending_weight = weight

    def _refuse_if_incomplete(self) -> None:
        if self._incomplete_micro_batch:
            raise RuntimeError(
                f"a fold in backward failed after others of the same micro-batch had "
                f"run: {_REDO_WINDOW}"
            )

    @torch.no_grad()
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
        the window ends, as autograd keeps the first gradient as ``.grad``."""
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
        self._refuse_if_incomplete()
        weight = self._pending_weight if weight is None else check_weight(weight)
        inverse_loss_scale, overflow = self._grad_scaler_inputs()
        pairs, private = self._take_grads()
        accumulation = self._accumulation
        accumulation.overflowed |= overflow
        if accumulation.overflowed:
            pairs = []  # a window with a non-finite gradient is skipped whole
        factor = weight * inverse_loss_scale
        boundary = accumulation.window_micro_steps + 1 >= self.accumulation_steps
        grad_squares = self._micro_step_squares(inverse_loss_scale)
        if not boundary:
            try:
                accumulation.fold(
                    pairs, factor, self._found_inf(), grad_sum_sq=grad_squares, private=private
                )
            except BaseException:
                for param, grad in pairs:
                    param.grad = grad  # not folded: the gradients stay where they were
                raise
            if self._grad_stats is not None:
                self._grad_stats.close_micro_step()
        # the micro-batch is taken: its weight and its folds in backward are counted now
        self._pending_weight = 1.0
        self._folded_since_step = False
        if self.accumulate_in_backward:  # parameters unfrozen since: fold them in backward
            self._register_hooks(self._all_params())
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
        self._accumulation.end_window()
        if self._grad_stats is not None:
            self._grad_stats.discard()
        if self._loss_scale is not None:
            self._loss_scale.found_inf.zero_()
        self._pending_weight = 1.0
        self._folded_since_step = False
        self._incomplete_micro_batch = False

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
        fresh_grads = {id(param): grad for param, grad in fresh}
        for group in self.param_groups:
            batches: dict[Hashable, StepBatch] = {}
            for param in group["params"]:
                use_buffer = id(param) in accumulation.holds_sum
                grad = fresh_grads.get(id(param))
                if not use_buffer and grad is None:
                    continue  # no gradient in the whole window: skipped, as torch does
                state_key = self._prepare_state(group, param)
                master = self._master_param(param)
                key = (param.device, param.dtype, use_buffer, grad is not None, state_key)
                batch = batches.get(key)
                if batch is None:
                    batch = batches[key] = StepBatch(
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
            for (device, dtype, *_, state_key), batch in batches.items():
                backend = accumulation.backends[(device, dtype)]
                scalars = None if window_scalars is None else window_scalars[device]
                if self._grad_stats is not None:
                    batch.grad_stats = self._grad_stats.table(batch.params, device)
                self._step_batch(group, backend, batch, state_key, scalars)
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

    def _squares_of_sums(
        self, leaving_out: set[int] = frozenset()
    ) -> dict[torch.device, torch.Tensor]:
        """Per device, the sum of the squares of the window's sums, but for the
        parameters (ids) ``leaving_out``: one pass over those buffers."""
        accumulation = self._accumulation
        squares = {device: torch.zeros(1, device=device) for device in accumulation.devices}
        for param in self._all_params():
            if id(param) in accumulation.holds_sum and id(param) not in leaving_out:
                buffer = accumulation.buffer_view(param)
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
        if self._loss_scale is not None:
            skip = self._loss_scale.found_inf.reshape(()).clone()
            factor = self._loss_scale.scale.reshape(()).reciprocal()  # exact: a power of 2
        if squares is not None:
            total = torch.stack([squares[device].to(home) for device in devices]).sum()
            # the buffers hold sum(w * g) times the loss scale; the mean is that / weight
            norm = total.sqrt() / weight * factor
            coefficient = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            factor = coefficient * factor
            self._grad_norm = norm
        scalars = torch.stack([skip, factor]).double()
        return {device: scalars.to(device) for device in devices}

    # ------------------------------------------------------- what subclasses define

    def _prepare_state(self, group: dict[str, Any], param: torch.Tensor) -> Hashable:
        """Create ``param``'s state if it has none yet (as torch.optim does, at its
        first update) and return what, besides the group, its update depends on."""
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
            master = state["master_param"] = self._accumulation.state_view(param, "master_param")
            master.copy_(param)
        return master

    def _new_state_view(self, param: torch.Tensor, name: str) -> torch.Tensor:
        view = self._accumulation.state_view(param, name)
        view.zero_()
        return view

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
