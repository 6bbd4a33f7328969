"""An independent model of the public API of the fused_accum optimizers, in fp64, for
the property-based test (test_api_fuzz.py).

It knows nothing of buffers, backends or kernels: it keeps fp64 copies of the
parameters, the window's weighted sums in fp64 as plain lists, the ``.grad`` values a
user's model would hold, and the counters the README promises, and it leaves every
update to torch.optim (fp64, ``foreach=False``), with ``clip_grad_norm_`` for clipping
and GradScaler's rule for the loss scale. It is written from the README's semantics,
not from the optimizer's code."""

from __future__ import annotations

import torch

from fused_accum import LossScaling

TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class ApiOracle:
    """The expected behaviour of one optimizer over the parameters of a model.

    Parameters are known by their index in the model. ``grads[i]`` is what the model's
    ``param.grad`` should hold (loss-scaled as backward produced it, summed over
    backwards in the parameter's dtype as autograd sums it, or None): the optimizer's
    input, which the window then sums in fp64.
    With ``accumulate_in_backward``, ``hooked`` holds the parameters whose gradients
    backward folds in at once (those that required grad when the optimizer registered
    its hooks); their gradients never reach ``grads``."""

    def __init__(
        self,
        name: str,
        hyperparameters: dict,
        params: list[torch.Tensor],
        *,
        accumulation_steps: int,
        accumulate_in_backward: bool,
        max_grad_norm: float | None,
        loss_scaling: LossScaling | None,
    ) -> None:
        self.params = [p.detach().double().requires_grad_() for p in params]
        self.torch_optimizer = TORCH_OPTIMIZERS[name](self.params, foreach=False, **hyperparameters)
        self.accumulation_steps = accumulation_steps
        self.accumulate_in_backward = accumulate_in_backward
        self.max_grad_norm = max_grad_norm
        self.loss_scaling = loss_scaling
        self.scale = 1.0 if loss_scaling is None else loss_scaling.init_scale
        self.growth_tracker = 0
        self.grads: list[torch.Tensor | None] = [None] * len(params)
        self.hooked: set[int] = set()
        if accumulate_in_backward:
            self.hooked = {i for i, p in enumerate(params) if p.requires_grad}
        self.micro_step_count = 0
        self.update_count = 0
        self.last_step_applied = False
        self.pending_weight = 1.0
        self.folded_in_backward = False  # since the last step()
        self.incomplete_micro_batch = False  # a fold failed after others had run
        self._new_window()

    def _new_window(self) -> None:
        self.sums: list[torch.Tensor | None] = [None] * len(self.params)
        self.window_weight = 0.0
        self.window_micro_steps = 0
        self.overflowed = False

    # ------------------------------------------------------------- the model side

    def add_param_group(self, param: torch.Tensor, lr: float) -> None:
        self.params.append(param.detach().double().requires_grad_())
        self.torch_optimizer.add_param_group({"params": [self.params[-1]], "lr": lr})
        self.grads.append(None)
        self.sums.append(None)
        if self.accumulate_in_backward and param.requires_grad:
            self.hooked.add(len(self.params) - 1)

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        """A backward pass that gives parameter i the gradient ``grads[i]`` (as backward
        produced it: loss-scaled), added to ``.grad``; hooked parameters then fold
        ``.grad`` in with the pending weight and release it."""
        for i, grad in grads.items():
            if self.grads[i] is not None:  # backward adds into .grad, in fp32 as autograd
                grad = self.grads[i] + grad
            if i in self.hooked:  # and the hook takes the sum
                self._fold(i, grad, self.pending_weight)
                self.folded_in_backward = True
                self.grads[i] = None
            else:
                self.grads[i] = grad

    def set_grad(self, i: int, grad: torch.Tensor | None) -> None:
        self.grads[i] = None if grad is None else grad.clone()

    def zero_grad(self) -> None:
        self.grads = [None] * len(self.params)

    def new_optimizer(self, trainable: list[bool]) -> None:
        """The optimizer was replaced by a new one (loaded from a state dict): its
        hooks are those of the parameters that require grad now."""
        if self.accumulate_in_backward:
            self.hooked = {i for i, flag in enumerate(trainable) if flag}

    # ------------------------------------------------------------ the optimizer side

    def _fold(self, i: int, grad: torch.Tensor, weight: float) -> None:
        contribution = grad.double() * (weight / self.scale)
        if not bool(torch.isfinite(grad).all()):
            self.overflowed = True
        self.sums[i] = contribution if self.sums[i] is None else self.sums[i] + contribution

    def step(self, weight: float | None, trainable: list[bool]) -> None:
        """One step(): fold every ``.grad`` with ``weight`` (the pending weight if None),
        count the micro-step, and apply the window at its end. ``trainable`` says which
        parameters require grad now (step() hooks those with accumulate_in_backward)."""
        weight = self.pending_weight if weight is None else weight
        if self.accumulate_in_backward:
            self.hooked |= {i for i, flag in enumerate(trainable) if flag}
        for i, grad in enumerate(self.grads):
            if grad is not None:
                self._fold(i, grad, weight)
        self.grads = [None] * len(self.params)
        self.pending_weight = 1.0
        self.folded_in_backward = False
        self.micro_step_count += 1
        self.window_micro_steps += 1
        self.window_weight += weight
        self.last_step_applied = False
        if self.window_micro_steps >= self.accumulation_steps:
            self._apply()

    def flush(self) -> bool:
        if self.window_micro_steps == 0:
            return False
        self._apply()
        return True

    def discard_window(self) -> None:
        if self.incomplete_micro_batch:  # the refused gradients of that micro-batch go too
            for i in self.hooked:
                self.grads[i] = None
        self._new_window()
        self.pending_weight = 1.0
        self.folded_in_backward = False
        self.incomplete_micro_batch = False

    def _apply(self) -> None:
        """The window's update: torch.optim on the weighted mean gradient, clipped as
        clip_grad_norm_ would; skipped whole after a non-finite gradient (with loss
        scaling, whose scale then backs off; after growth_interval clean windows it grows)."""
        self.update_count += 1
        self.last_step_applied = True
        if self.overflowed:
            self.scale *= self.loss_scaling.backoff_factor
            self.growth_tracker = 0
            self._new_window()
            return
        with_grad = []
        for param, total in zip(self.params, self.sums, strict=True):
            param.grad = None if total is None else total / self.window_weight
            if total is not None:
                with_grad.append(param)
        if self.max_grad_norm is not None and with_grad:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad])
            )
            coefficient = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            for param in with_grad:
                param.grad.mul_(coefficient)
        self.torch_optimizer.step()
        if self.loss_scaling is not None:
            self.growth_tracker += 1
            if self.growth_tracker == self.loss_scaling.growth_interval:
                self.scale *= self.loss_scaling.growth_factor
                self.growth_tracker = 0
        self._new_window()

    def state(self, i: int) -> dict:
        return self.torch_optimizer.state.get(self.params[i], {})
