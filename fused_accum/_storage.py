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

A group may be sharded over the ranks of a process group (``shard``, for the optimizers'
``shard_state``): the buffer stays whole (each rank accumulates its own micro-batches),
but the group's length is padded to equal chunks, one per rank, and the optimizer state
holds only this rank's chunk. A parameter's state is then its *piece*: the part of its
slice inside the chunk, flat, in the parameter's memory order (possibly empty).
"""

from __future__ import annotations

import torch

ALIGNMENT = 16


def accumulation_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are summed and optimizer state is kept in: fp32, or fp64 for
    fp64 parameters (never less precise than the parameter)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def dense_strides(param: torch.Tensor) -> tuple[int, ...]:
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
        self.rank = 0
        self.world = 1  # ranks the state is sharded over (see shard)

    def shard(self, rank: int, world: int) -> None:
        """Keep only chunk ``rank`` of ``world`` equal chunks of the optimizer state."""
        self.rank, self.world = rank, world
        self._pad()

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def _pad(self) -> None:
        # equal chunks, each starting aligned
        multiple = self.world * ALIGNMENT
        self.numel = -(-self.numel // multiple) * multiple

    @property
    def chunk(self) -> tuple[int, int]:
        """This rank's range of flat elements: ``[start, stop)``."""
        size = self.numel // self.world
        return self.rank * size, (self.rank + 1) * size

    def piece(self, index: int) -> tuple[int, int]:
        """The range ``[start, stop)`` of parameter ``index``'s elements (in memory
        order) that lie in this rank's chunk; empty (start == stop) if none do."""
        low, high = self.chunk
        offset, numel = self.offsets[index], self.params[index].numel()
        start = min(max(low - offset, 0), numel)
        return start, max(min(high - offset, numel), start)

    def flat_piece(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s piece of the whole-group flat tensor ``flat``."""
        start, stop = self.piece(index)
        offset = self.offsets[index]
        return flat[offset + start : offset + stop]

    def param_piece(self, index: int) -> torch.Tensor:
        """Parameter ``index``'s piece, as a flat view of the parameter itself."""
        param = self.params[index]
        start, stop = self.piece(index)
        return param.as_strided((stop - start,), (1,), param.storage_offset() + start)

    def memory_order(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """``value`` (shaped like parameter ``index``) flattened in the parameter's
        memory order, as its slice of a flat tensor holds it."""
        param = self.params[index]
        dense = torch.empty_strided(
            param.shape, self._strides[index], dtype=value.dtype, device=value.device
        )
        return dense.copy_(value).as_strided((param.numel(),), (1,))

    def add(self, params: list[torch.Tensor]) -> None:
        """Append parameters, growing every flat tensor and keeping existing contents
        (not for a sharded group with state: its chunks would move, see
        AccumulationState.check_chunks_stay)."""
        assert not (self.sharded and self.states), "a sharded group's chunks would move"
        for param in params:
            self.params.append(param)
            self.offsets.append(self.numel)
            self.shapes.append(param.shape)
            self._strides.append(dense_strides(param))
            self.numel += -(-param.numel() // ALIGNMENT) * ALIGNMENT
        if self.sharded:
            self._pad()
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
        """The view of state ``name`` for parameter ``index`` (its piece, when sharded);
        the flat state tensor is allocated, zeroed, the first time any parameter of the
        group asks for it."""
        if name not in self.states:
            size = self.numel // self.world  # this rank's chunk, when sharded
            self.states[name] = torch.zeros(size, dtype=self.accum_dtype, device=self.device)
        if self.sharded:
            start, stop = self.piece(index)
            low = self.offsets[index] + start - self.chunk[0]
            return self.states[name][low : low + stop - start]
        return self.view(self.states[name], index)

    def count_view(self, name: str, index: int, device: torch.device) -> torch.Tensor:
        """Parameter ``index``'s count ``name``: a 0-dim float32 view of a tensor holding
        the group's counts on ``device`` (the host, or the group's device for counts
        kept there), allocated, zeroed, the first time any parameter asks for it."""
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = torch.zeros(len(self.params), device=device)
        return counts[index]
