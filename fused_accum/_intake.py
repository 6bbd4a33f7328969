"""Gradient intake of the fused_accum optimizers, as a mixin of FusedAccumOptimizer:
checking a gradient against its parameter, taking every ``.grad`` in step(), and
folding each gradient in during backward (``accumulate_in_backward``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ._accumulation import AccumulationState
from ._ownership import is_private

# What to do when a fold in backward failed after others of its micro-batch had run.
_REDO_WINDOW = (
    "the window holds part of a micro-batch, which repeating it cannot mend; call "
    "discard_window() (which also drops the .grad backward left) and redo the window's "
    "micro-batches"
)


class GradientIntake:
    """Needs ``_accumulation``, ``_hooks``, ``_hooked_ids``, ``_pending_weight``,
    ``_folded_since_step``, ``_incomplete_micro_batch``, ``_all_params``,
    ``_describe``, ``_found_inf``, ``_micro_step_squares`` and
    ``_refuse_if_incomplete`` from the optimizer."""

    _accumulation: AccumulationState
    _hooks: dict[torch.Tensor, Any]
    _hooked_ids: set[int]
    _pending_weight: float
    _folded_since_step: bool
    _incomplete_micro_batch: bool

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

    def _every_grad(self, backend_checks: bool = False) -> list[torch.Tensor] | None:
        """The steady state's intake: every parameter's ``.grad``, in the order of
        ``_accumulation.ordered``, when each is there and fits what its slot was made
        for (dense, its dtype, shape and device), not released; else None, and the
        general path checks them one by one and says what is wrong. With
        ``backend_checks`` (the backend checks them all before it writes anything, see
        ``AccumulationState.backend_checks``) only their presence is checked here."""
        accumulation = self._accumulation
        grads = [param.grad for param in accumulation.ordered]
        if backend_checks:
            return None if any(grad is None for grad in grads) else grads
        strided = torch.strided
        for grad, (shape, dtype, device) in zip(grads, accumulation.grad_specs, strict=True):
            if (
                grad is None
                or grad.dtype is not dtype
                or grad.shape != shape
                or grad.layout is not strided
                or grad.get_device() != device
            ):
                return None
        return grads

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

        hooked = self._hooked_ids
        for param in params:
            # by id: hashing a tensor runs Python code, and every step() looks here
            if param.requires_grad and id(param) not in hooked:
                self._hooks[param] = param.register_post_accumulate_grad_hook(fold_in_backward)
                hooked.add(id(param))
