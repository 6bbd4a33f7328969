"""What the Triton backend (triton_backend.py) keeps on each device between calls, and
how its launches reach their tensors: block tables, address tables, scratch for
partials, and stand-ins for unused pointer arguments.

A call's launch covers every block of every tensor through block tables (a _Layout),
built once per tensor layout. Gradients and parameters are reached through int64
address tables (an _Operand). Tables go to the device from pinned memory without
blocking the host, and recent ones are kept, per device and stream, so a fixed model's
calls upload nothing after the first window. The scratch that programs write their
partials to is kept per device and stream and only grows, so steady state allocates
nothing.
"""

from __future__ import annotations

import functools
import os

import torch

from .layout import like_buffer, write_back

BLOCK = 1024
_INTERPRETER_BLOCK = 128  # the interpreter runs a block as numpy arrays: keep them small
FINALIZE_TILE = 1024  # partials a finalize program reduces at a time
_INTERPRETER_FINALIZE_TILE = 8  # small, so that the tests' few programs span many tiles
# Entries kept per cache. Layouts: one per set of tensors a call covers, so one per
# parameter with accumulate_in_backward: a model's worth must fit, or every micro-step
# rebuilds and uploads them. Address tables: a few bytes each.
_KEPT_LAYOUTS = 4096
_KEPT_ADDRESS_TABLES = 256


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``; to a GPU from pinned memory, without
    making the host wait (the caching host allocator keeps the pinned block until the
    copy is done)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _stream_key(device: torch.device) -> int | None:
    """The current stream of ``device``, for the caches: a table uploaded without
    blocking on one stream is ready for kernels on that stream only."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).stream_id


def _new_address_table(addresses: list[int], device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(addresses, dtype=torch.int64), device)


class _Layout:
    """Block tables of one call: which tensor and element each program starts at."""

    def __init__(self, flat_offsets: list[int], numels: list[int], device: torch.device):
        interpreted = interpreter_active()
        self.block = _INTERPRETER_BLOCK if interpreted else BLOCK
        self.finalize_tile = _INTERPRETER_FINALIZE_TILE if interpreted else FINALIZE_TILE
        numels_table = torch.tensor(numels, dtype=torch.int64)
        counts = (numels_table + self.block - 1) // self.block
        first_block = torch.cumsum(counts, 0) - counts
        self.num_blocks = int(counts.sum())
        block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        block_index = torch.arange(self.num_blocks, dtype=torch.int64)
        block_start = (block_index - torch.repeat_interleave(first_block, counts)) * self.block
        self.block_tensor = _upload(block_tensor, device)
        self.block_start = _upload(block_start, device)
        self.numels = _upload(numels_table, device)
        self.flat_offsets = _upload(torch.tensor(flat_offsets, dtype=torch.int64), device)
        # each tensor's programs are consecutive: where they start and how many, for the
        # finalize of the gradient statistics
        self.tensor_first_block = _upload(first_block, device)
        self.tensor_blocks = _upload(counts, device)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.block_tensor, self.block_start, self.numels, self.flat_offsets


def _flat_base(views: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """The whole flat tensor behind views made by _storage.FlatGroup, checked to sit
    where those of ``like`` do (the kernels index every state with one set of
    offsets)."""
    storage = views[0].untyped_storage()
    numel = storage.nbytes() // views[0].element_size()
    for index, view in enumerate(views):
        if view.untyped_storage().data_ptr() != storage.data_ptr() or (
            view.storage_offset() != like[index].storage_offset()
        ):
            raise AssertionError("the Triton backend needs views laid out by FlatGroup")
    return views[0].as_strided((numel,), (1,), 0)


class _Operand:
    """Gradients or parameters as the kernels reach them: a table of their addresses.
    One that is not in its buffer's memory order or not 16-byte aligned is reached
    through a copy that is (``write_back`` returns the values to the tensor)."""

    def __init__(self, tensors: list[torch.Tensor], views: list[torch.Tensor], tables: Tables):
        self.tensors = tensors
        self.in_layout = [
            like_buffer(t, v, alignment=16) for t, v in zip(tensors, views, strict=True)
        ]
        self.table = tables.address_table([t.data_ptr() for t in self.in_layout], tensors[0].device)

    def write_back(self) -> None:
        write_back(self.tensors, self.in_layout)


def _recent(cache: dict, key, make, limit: int):
    """``cache[key]``, made by ``make()`` if missing, moved to the recent end of
    ``cache``; the oldest entries past ``limit`` are dropped."""
    value = cache.pop(key, None)
    cache[key] = value = make() if value is None else value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return value


class Tables:
    """What the backend keeps between calls, per device and stream: recent block
    layouts and address tables, scratch for partials, and a stand-in tensor."""

    def __init__(self) -> None:
        self.layouts: dict[tuple, _Layout] = {}
        self.address_tables: dict[tuple, torch.Tensor] = {}
        self.unused_tensors: dict[torch.device, torch.Tensor] = {}
        self.scratch: dict[tuple, torch.Tensor] = {}

    def layout(self, buffers: list[torch.Tensor]) -> _Layout:
        """Block tables for this set of tensors. Recent ones are kept (the set rarely
        changes between calls), a bounded number, since each holds device memory."""
        flat_offsets = [b.storage_offset() for b in buffers]
        numels = [b.numel() for b in buffers]
        device = buffers[0].device
        key = (device, _stream_key(device), tuple(flat_offsets), tuple(numels))
        make = functools.partial(_Layout, flat_offsets, numels, device)
        return _recent(self.layouts, key, make, _KEPT_LAYOUTS)

    def address_table(self, addresses: list[int], device: torch.device) -> torch.Tensor:
        """The addresses as an int64 tensor on ``device``. Recent tables are kept: the
        caching allocator tends to hand gradients the same addresses every micro-step,
        and a hit saves a host-to-device copy."""
        key = (device, _stream_key(device), tuple(addresses))

        make = functools.partial(_new_address_table, addresses, device)  # only on a miss
        return _recent(self.address_tables, key, make, _KEPT_ADDRESS_TABLES)

    def buffer_table(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """The buffers' addresses: views of the flat buffer, or gradients adopted as
        their parameter's buffer (fp32, dense and 64-byte aligned either way)."""
        return self.address_table([b.data_ptr() for b in buffers], buffers[0].device)

    def partials(self, layout: _Layout, per_program: int) -> torch.Tensor:
        """Scratch for ``per_program`` fp32 partials of every block of ``layout``. One
        per device and stream, grown when a call needs more and never shrunk: kernels
        on one stream run in order, so a call's partials are read by its finalize
        before the next call's programs write theirs, and after the first window
        nothing is allocated (keeping one per size would keep one per parameter shape
        with accumulate_in_backward)."""
        device = layout.numels.device
        key = (device, _stream_key(device))
        needed = layout.num_blocks * per_program
        scratch = self.scratch.get(key)
        if scratch is None or scratch.numel() < needed:
            scratch = self.scratch[key] = torch.empty(needed, device=device)
        return scratch

    def unused(self, device: torch.device) -> torch.Tensor:
        """A one-element fp32 tensor for pointer arguments a variant does not use."""
        unused = self.unused_tensors.get(device)
        if unused is None:
            unused = self.unused_tensors[device] = torch.zeros(1, device=device)
        return unused
