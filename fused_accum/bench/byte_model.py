"""The byte model: bytes each operation must read and write per parameter element,
the yardstick of every bandwidth figure (effective GB/s = modelled bytes / time).

It is DESIGN.md's table with two deviations: steps do not zero the buffer (the next
window's first contribution overwrites it), which saves the 4-byte write; and a first
gradient already in fp32 may be adopted as the buffer, not copied (0 bytes).
"""

from __future__ import annotations

import torch

ACCUMULATION_BYTES = 4  # the fp32 buffer element

# per element of optimizer state in fp32: read and written
_STATE_BYTES = {"sgd": 8, "adam": 16, "adamw": 16}  # momentum; exp_avg and exp_avg_sq


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def accumulate_bytes(grad_dtype: torch.dtype, *, first: bool = False) -> int:
    """Read the gradient, read (unless first: overwritten) and write the buffer."""
    return _size(grad_dtype) + (0 if first else ACCUMULATION_BYTES) + ACCUMULATION_BYTES


def step_bytes(
    optimizer: str,
    param_dtype: torch.dtype,
    *,
    fresh_grad: bool = False,
    master: bool = False,
    momentum: bool = True,
) -> int:
    """One update from the buffer: read it, read and write the parameter (through its
    fp32 master: read and write that, write the parameter), read and write the state.
    ``fresh_grad``: the accumulate-and-step of a window's last micro-step, which also
    reads that micro-step's gradient. SGD without momentum has no state."""
    param = _size(param_dtype)
    moved = ACCUMULATION_BYTES + (param if fresh_grad else 0)
    moved += 2 * ACCUMULATION_BYTES + param if master else 2 * param
    if optimizer != "sgd" or momentum:
        moved += _STATE_BYTES[optimizer]
    return moved


def window_bytes(
    optimizer: str, param_dtype: torch.dtype, steps: int, *, adopt_first: bool = False
) -> int:
    """A window of ``steps`` micro-steps and one update, per parameter element: the
    first micro-step overwrites the buffer (or, with ``adopt_first`` and a gradient in
    the accumulation dtype, makes the gradient the buffer: nothing moved), the last is
    an accumulate-and-step."""
    if steps == 1:
        return step_bytes(optimizer, param_dtype, fresh_grad=True) - ACCUMULATION_BYTES
    adopted = adopt_first and param_dtype in (torch.float32, torch.float64)
    first = 0 if adopted else accumulate_bytes(param_dtype, first=True)
    middle = (steps - 2) * accumulate_bytes(param_dtype)
    return first + middle + step_bytes(optimizer, param_dtype, fresh_grad=True)


def eager_accumulate_bytes(grad_dtype: torch.dtype) -> int:
    """PyTorch's ``buf += grad.float() * s``: a cast (read g, write fp32; none for an
    fp32 gradient), a scale (read, write) and an add (read both, write)."""
    cast = 0 if grad_dtype == torch.float32 else _size(grad_dtype) + 4
    return cast + 8 + 12
