"""Gradient intake of the fused_accum optimizers, as a mixin of FusedAccumOptimizer:
checking a gradient against its parameter, taking every ``.grad`` in step(), and
folding each gradient in during backward (``accumulate_in_backward``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.autograd import Variable

from ._accumulation import AccumulationState
from ._ownership import is_private
from ._sharded import is_dtensor
from .distributed import processes_in_run

# Gradients taken in backward are folded in buckets of about this size (and at the
# end of each backward): one backend call per bucket instead of a kernel launch per
# parameter, while the memory held back stays bounded, as DDP's gradient buckets.
FOLD_BUCKET_BYTES = 32 * 2**20

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
    # the ids of the parameters whose gradient backward folded since the last step()
    _folded_ids: set[int]
    _incomplete_micro_batch: bool
    # gradients taken in backward, not yet folded; their ids, the private ones' ids
    # (see is_private) and their bytes
    _held: list[tuple[torch.Tensor, torch.Tensor]]
    _held_ids: set[int]
    _held_private: set[int]
    _held_bytes: int

    def _check_grad(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        consequence: str = "nothing was accumulated",
    ) -> torch.Tensor:
        """Raise if ``grad`` cannot be accumulated for ``param``; return what the
        backends take: ``grad``, or for a DTensor parameter its gradient's shard."""
        public = param
        group, index = self._accumulation.slots[id(param)]
        if id(param) in self._accumulation.shards:
            grad = self._shard_of_grad(param, grad, consequence)
            param = self._accumulation.shard_of(param)
        shape = group.shapes[index]
        # the common case, cheaply: every micro-step checks every parameter
        if (
            grad.layout is torch.strided
            and grad.dtype is param.dtype is group.param_dtype
            and grad.shape == param.shape == shape
            and grad.device == param.device == group.device
        ):
            return grad
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
            raise RuntimeError(f"{self._describe(public)} {problem}; {consequence}")
        return grad

    def _shard_of_grad(
        self, param: torch.Tensor, grad: torch.Tensor, consequence: str
    ) -> torch.Tensor:
        """The shard of the gradient of the DTensor parameter ``param``, once it is
        checked to be sharded as ``param`` is."""
        if not is_dtensor(grad):
            raise RuntimeError(
                f"{self._describe(param)} is a DTensor but its gradient is a "
                f"{type(grad).__name__}; set .grad to a DTensor sharded as the "
                f"parameter (FSDP2 does); {consequence}"
            )
        if grad.placements != param.placements or grad.device_mesh != param.device_mesh:
            raise RuntimeError(
                f"{self._describe(param)} is sharded as {tuple(param.placements)} but its "
                f"gradient as {tuple(grad.placements)} (or on another mesh); "
                f"{consequence}"
            )
        return grad._local_tensor

    def _take_micro_batch(
        self,
        factor: float,
        grad_squares: dict | None,
        boundary: bool,
        overflow: bool,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Take this micro-step's gradients: checked, then released. Unless at the
        ``boundary`` they are folded in with weight ``factor`` and [] is returned; at
        it, the (param, grad) pairs for the update. Nothing is taken when a check or
        the fold fails. A window with a non-finite gradient (``overflow`` here, or
        before) takes them and drops them."""
        accumulation = self._accumulation
        if accumulation.steady and not overflow:
            taken = self._take_every_grad(factor, grad_squares, boundary)
            if taken is not None:
                return taken
        pairs, private = self._take_grads()
        accumulation.overflowed |= overflow
        if accumulation.overflowed:
            return []  # a window with a non-finite gradient is skipped whole
        if boundary:
            return pairs
        try:
            accumulation.fold(
                pairs, factor, self._found_inf(), grad_sum_sq=grad_squares, private=private
            )
        except BaseException:
            for param, grad in pairs:
                param.grad = grad  # not folded: the gradients stay where they were
            raise
        return []

    def _take_every_grad(
        self, factor: float, grad_squares: dict | None, boundary: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``_take_micro_batch`` in the steady state, where every parameter brings a
        gradient and already holds a sum: the gradients as one list, with no adoption
        to test. None, with nothing taken, when one is missing or does not fit (the
        general path then says what is wrong)."""
        accumulation = self._accumulation
        # unchecked here only where the backend checks them and they are folded before
        # they are released; at the boundary they are released before the update
        trusted = accumulation.backend_checks and not boundary
        grads = self._every_grad(backend_checks=trusted)
        if grads is None:
            return None
        if self._folded_ids:
            self._refuse_grads_after_their_fold(accumulation.ordered)
        if not boundary:
            try:
                accumulation.fold_every(grads, factor, self._found_inf(), grad_squares)
            except (RuntimeError, ValueError) as error:
                # the ops' own argument checks ("fused_accum: ...") come before
                # anything is written; any other failure (a device's) is raised
                if not trusted or not str(error).startswith("fused_accum:"):
                    raise
                return None
        for param in accumulation.ordered:
            param.grad = None
        return list(zip(accumulation.ordered, grads, strict=True)) if boundary else []

    def _every_grad(self, backend_checks: bool = False) -> list[torch.Tensor] | None:
        """The steady state's intake: every parameter's ``.grad``, in the order of
        ``_accumulation.ordered``, when each is there and fits what its slot was made
        for (dense, its dtype, shape and device), not released; else None, and the
        general path checks them one by one and says what is wrong. With
        ``backend_checks`` (the backend checks them all before it writes anything, see
        ``AccumulationState.backend_checks``) only their presence is checked here."""
        accumulation = self._accumulation
        if accumulation.shards:
            return None  # DTensor gradients: checked and unwrapped one by one
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
        accumulation = self._accumulation
        # the common case, a gradient for every parameter that fits its slot, is
        # checked in one pass (whose list is dropped at once: is_private counts
        # references); else each present gradient is checked and named if it fails
        if self._every_grad() is not None:
            params = accumulation.ordered
        else:
            params = [param for param in self._all_params() if param.grad is not None]
            for param in params:
                self._check_grad(param, param.grad)
        if self._folded_ids:
            self._refuse_grads_after_their_fold(params)
        pairs, private = [], set()
        shards = accumulation.shards
        for param in params:
            grad = param.grad
            param.grad = None
            if id(param) in shards:
                grad = grad._local_tensor  # checked above: sharded as its parameter
            # only a window's first gradient of a parameter may be adopted
            first = id(param) not in accumulation.holds_sum
            if accumulation.adoption and first and is_private(grad):
                private.add(id(param))
            pairs.append((param, grad))
        return pairs, private

    def _refuse_grads_after_their_fold(self, params: list[torch.Tensor]) -> None:
        """In a run of several processes, a ``.grad`` that appeared after backward folded
        the parameter's gradient is DistributedDataParallel's average, written after
        each rank folded its own: taking it would leave every rank with its own
        gradients. In one process it is the user's, and step() takes it as it takes
        every present ``.grad``."""
        world = processes_in_run()
        if world <= 1:
            return
        for param in params:
            if id(param) in self._folded_ids:
                raise RuntimeError(
                    f"{self._describe(param)} has a .grad again after backward folded its "
                    f"gradient (accumulate_in_backward=True), in a run of {world} "
                    f"processes: DistributedDataParallel writes its averaged gradient "
                    f"there after each rank folded its own, so every rank would update "
                    f"with its own gradients. Under DDP make the optimizer without "
                    f"accumulate_in_backward (DDP averages .grad, step() takes it), or "
                    f"shard the model with FSDP2; nothing of this micro-batch's .grad "
                    f"was taken"
                )

    def _take_in_backward(self, param: torch.Tensor) -> None:
        """The backward hook's work: check ``param``'s new gradient, release it and hold
        it for the next fold. Gradients are folded in buckets (at the end of each
        backward, or once ``FOLD_BUCKET_BYTES`` are held): one backend call per bucket,
        not one kernel launch per parameter."""
        self._refuse_if_incomplete()
        # Backward stops at the first error, but the gradients taken before are in
        # the window: it then holds part of a micro-batch, which no repetition can
        # mend, so it must be discarded.
        partial = self._folded_since_step
        consequence = "nothing was accumulated"
        if partial:
            consequence = (
                f"its gradient was not accumulated, but backward had already folded "
                f"other gradients of this micro-batch: {_REDO_WINDOW} (step(), "
                f"flush() and backward refuse until then)"
            )
        try:
            # the gradient, or for a DTensor parameter its shard
            grad = self._check_grad(param, param.grad, consequence)
        except BaseException:
            self._incomplete_micro_batch = partial
            raise
        if id(param) in self._held_ids:
            self._fold_held()  # a second backward after one that failed part-way
        param.grad = None
        private = is_private(grad)  # before a list holds it
        fold_now = False
        if not self._held:
            try:  # the engine runs this once the backward in progress has finished
                Variable._execution_engine.queue_callback(self._fold_held)
            except RuntimeError:  # a hook run outside the engine's backward: no bucket
                fold_now = True
        self._held.append((param, grad))
        self._held_ids.add(id(param))
        if private:
            self._held_private.add(id(param))
        self._held_bytes += grad.numel() * grad.element_size()
        self._folded_since_step = True
        self._folded_ids.add(id(param))
        if fold_now or self._held_bytes >= FOLD_BUCKET_BYTES:
            self._fold_held()

    def _fold_held(self) -> None:
        """Fold the gradients taken in backward and not yet folded, with the
        micro-batch's weight. If the fold fails they go back to ``.grad`` and the
        window must be discarded (other buckets of the micro-batch may be in it)."""
        held, private = self._held, self._held_private
        if not held:
            return
        self._drop_held()
        try:
            self._accumulation.fold(
                held,
                self._pending_weight,
                self._found_inf(),
                grad_sum_sq=self._micro_step_squares(1.0),
                private=private,
            )
        except BaseException:
            if not self._accumulation.shards:  # (a shard cannot go back as .grad)
                for param, grad in held:
                    param.grad = grad  # not folded: the gradients stay where they were
            self._incomplete_micro_batch = True
            raise

    def _drop_held(self) -> None:
        """Forget the gradients taken in backward and not yet folded."""
        self._held, self._held_ids, self._held_private = [], set(), set()
        self._held_bytes = 0

    def _register_hooks(self, params: list[torch.Tensor]) -> None:
        optimizer_ref = weakref.ref(self)

        def fold_in_backward(param: torch.Tensor) -> None:
            optimizer = optimizer_ref()
            if optimizer is not None and param.grad is not None:
                optimizer._take_in_backward(param)

        hooked = self._hooked_ids
        for param in params:
            # by id: hashing a tensor runs Python code, and every step() looks here
            if param.requires_grad and id(param) not in hooked:
                self._hooks[param] = param.register_post_accumulate_grad_hook(fold_in_backward)
                hooked.add(id(param))
