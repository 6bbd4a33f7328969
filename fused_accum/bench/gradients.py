"""The gradients a window benchmark hands over, as autograd would hand them.

Every provider gets the same gradients each micro-step. On a window's first micro-step
they are new tensors that nobody else holds, as backward makes them after
``zero_grad()``: the classic loop keeps such a tensor as ``.grad`` and fused_accum
adopts it as its buffer, neither copying it. They are made before the window, untimed
(``prepare``), and handed over one by one (``take``), so the benchmark keeps no
reference. Later micro-steps hand over the same made-once tensors: what a provider
does with them is what is timed.
"""

from __future__ import annotations

import torch


class WindowGradients:
    """``grads[i]`` for parameter i at every micro-step, private copies on the first."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.grads = grads
        self._firsts: list[torch.Tensor] = []

    def prepare(self) -> None:
        """Make the next window's first gradients (call untimed, before the window)."""
        self._firsts = [grad.clone() for grad in reversed(self.grads)]

    def take(self, micro_step: int, index: int) -> torch.Tensor:
        """The gradient of parameter ``index`` at ``micro_step``. On the first micro-step
        the parameters must be taken in order, after ``prepare``."""
        if micro_step > 0:
            return self.grads[index]
        if not self._firsts:
            raise RuntimeError("call prepare() before each window (untimed)")
        return self._firsts.pop()
