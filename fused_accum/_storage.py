"""Flat storage: one tensor per (device, dtype) group for the accumulation buffer and
for each optimizer state, with a per-parameter view into it.

A flat layout lets a backend cover a whole group with one launch. Each parameter owns
the slice ``[offset, offset + numel)``; offsets are aligned to ``ALIGNMENT`` elements
(64 bytes in fp32) so vectorised kernels can start every slice on an aligned address.
A view has the parameter's shape and, for a dense parameter, its strides, so element
``k`` of a gradient's memory corresponds to element ``k`` of the slice (channels_last
included).
"""

from __future__ import annotations

import torch

ALIGNMENT = 16


def accumulation_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are summed and optimizer state is kept in: fp32, or fp64 for
    fp64 parameters (never less precise than the parameter)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _dense_strides(param: torch.Tensor) -> tuple[int, ...]:
    # empty_like keeps the strides of a non-overlapping, dense tensor and otherwise
    # picks dense strides in the same dimension order: the layout autograd gives .grad.
    return torch.empty_like(param, device="meta").stride()


class FlatGroup:
    """The parameters of one (device, dtype) pair, with flat tensors holding their
    accumulation buffer and optimizer state in the accumulation dtype."""

    def __init__(self, device: torch.device, param_dtype: torch.dtype) -> None:
        self.device = device
        self.param_dtype = param_dtype
        self.accum_dtype = accumulation_dtype(param_dtype)
        self.params: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.numel = 0
        self.buffer = torch.zeros(0, dtype=self.accum_dtype, device=device)
        self.states: dict[str, torch.Tensor] = {}
        self._strides: list[tuple[int, ...]] = []
        self._buffer_views: list[torch.Tensor] = []

    def add(self, params: list[torch.Tensor]) -> None:
        """Append parameters, growing every flat tensor and keeping existing contents."""
        for param in params:
            self.params.append(param)
            self.offsets.append(self.numel)
            self._strides.append(_dense_strides(param))
            self.numel += -(-param.numel() // ALIGNMENT) * ALIGNMENT
        self.buffer = self._grown(self.buffer)
        self.states = {name: self._grown(flat) for name, flat in self.states.items()}
        self._buffer_views = [self.view(self.buffer, i) for i in range(len(self.params))]

    def _grown(self, flat: torch.Tensor) -> torch.Tensor:
        grown = torch.zeros(self.numel, dtype=self.accum_dtype, device=self.device)
        grown[: flat.numel()].copy_(flat)
        return grown

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """The slice of ``flat`` that belongs to parameter ``index``, shaped like it."""
        param = self.params[index]
        return flat.as_strided(param.shape, self._strides[index], self.offsets[index])

    def buffer_view(self, index: int) -> torch.Tensor:
        return self._buffer_views[index]  # made once: views are asked for every micro-step

    def state_view(self, name: str, index: int) -> torch.Tensor:
        """The view of state ``name`` for parameter ``index``; the flat state tensor is
        allocated, zeroed, the first time any parameter of the group asks for it."""
        if name not in self.states:
            self.states[name] = torch.zeros(self.numel, dtype=self.accum_dtype, device=self.device)
        return self.view(self.states[name], index)
