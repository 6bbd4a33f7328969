"""Flat storage: one tensor per (device, dtype) group for the accumulation buffer and
for each optimizer state, with a per-parameter view into it.

A flat layout lets a backend cover a whole group with one launch. Each parameter owns
the slice ``[offset, offset + numel)``; offsets are aligned to ``ALIGNMENT`` elements
(64 bytes in fp32) so vectorised kernels can start every slice on an aligned address.
A view has the parameter's shape and, for a dense parameter, its strides, so element
``k`` of a gradient's memory corresponds to element ``k`` of the slice (channels_last
included).

The buffer is allocated the first time a view of it is asked for: when every
gradient of a group is adopted as its own buffer (see ``gradient_fits``), the flat
buffer is never needed and costs no memory.
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
        self.shapes: list[torch.Size] = []
        self.states: dict[str, torch.Tensor] = {}
        # per-parameter counts (Adam's step), one element per parameter, so that a
        # batch of consecutive parameters advances its counts with one add
        self.counts: dict[str, torch.Tensor] = {}
        self._buffer: torch.Tensor | None = None
        self._strides: list[tuple[int, ...]] = []
        self._buffer_views: list[torch.Tensor] | None = None

    def add(self, params: list[torch.Tensor]) -> None:
        """Append parameters, growing every flat tensor and keeping existing contents."""
        for param in params:
            self.params.append(param)
            self.offsets.append(self.numel)
            self.shapes.append(param.shape)
            self._strides.append(_dense_strides(param))
            self.numel += -(-param.numel() // ALIGNMENT) * ALIGNMENT
        if self._buffer is not None:
            self._buffer = self._grown(self._buffer)
        self.states = {name: self._grown(flat) for name, flat in self.states.items()}
        self.counts = {name: self._grown_counts(flat) for name, flat in self.counts.items()}
        self._buffer_views = None

    def _grown(self, flat: torch.Tensor) -> torch.Tensor:
        grown = torch.zeros(self.numel, dtype=self.accum_dtype, device=self.device)
        grown[: flat.numel()].copy_(flat)
        return grown

    def _grown_counts(self, counts: torch.Tensor) -> torch.Tensor:
        grown = counts.new_zeros(len(self.params))
        grown[: counts.numel()].copy_(counts)
        return grown

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """The slice of ``flat`` that belongs to parameter ``index``, shaped like it."""
        param = self.params[index]
        return flat.as_strided(param.shape, self._strides[index], self.offsets[index])

    @property
    def buffer(self) -> torch.Tensor:
        """The flat accumulation buffer, allocated (zeroed) on first use."""
        if self._buffer is None:
            self._buffer = torch.zeros(self.numel, dtype=self.accum_dtype, device=self.device)
        return self._buffer

    def flat_tensors(self) -> list[torch.Tensor]:
        """The flat tensors allocated so far, one element (or more) per parameter
        element: the buffer (if it is) and the states."""
        allocated = [] if self._buffer is None else [self._buffer]
        return allocated + list(self.states.values())

    def buffer_view(self, index: int) -> torch.Tensor:
        if self._buffer_views is None:  # made once: views are asked for every micro-step
            self._buffer_views = [self.view(self.buffer, i) for i in range(len(self.params))]
        return self._buffer_views[index]

    def gradient_fits(self, index: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` can stand in for parameter ``index``'s buffer view: the
        accumulation dtype, the view's strides, a 64-byte aligned address, a storage
        of its own size (not a slice of a larger gradient buffer), outside autograd (not
        from ``backward(create_graph=True)``) and not an inference tensor."""
        return (
            grad.dtype == self.accum_dtype
            and not grad.requires_grad
            and not grad.is_inference()  # to be added to in place, outside inference mode
            and (grad.numel() <= 1 or grad.stride() == self._strides[index])
            and grad.data_ptr() % 64 == 0
            and grad.storage_offset() == 0
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
        )

    def state_view(self, name: str, index: int) -> torch.Tensor:
        """The view of state ``name`` for parameter ``index``; the flat state tensor is
        allocated, zeroed, the first time any parameter of the group asks for it."""
        if name not in self.states:
            self.states[name] = torch.zeros(self.numel, dtype=self.accum_dtype, device=self.device)
        return self.view(self.states[name], index)

    def count_view(self, name: str, index: int, device: torch.device) -> torch.Tensor:
        """Parameter ``index``'s count ``name``: a 0-dim float32 view of a tensor holding
        the group's counts on ``device`` (the host, or the group's device for counts
        kept there), allocated, zeroed, the first time any parameter asks for it."""
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = torch.zeros(len(self.params), device=device)
        return counts[index]
