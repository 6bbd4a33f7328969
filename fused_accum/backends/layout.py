"""Operands in the buffers' memory order: the compiled and Triton kernels walk a
gradient or a parameter element by element beside its flat buffer slice, so both must
have the same strides (the buffer view is dense, so then the operand is too) and, for
the Triton kernels, a 16-byte aligned address."""

from __future__ import annotations

import torch


def like_buffer(tensor: torch.Tensor, view: torch.Tensor, alignment: int = 1) -> torch.Tensor:
    """``tensor`` itself when its strides are the buffer view's and its address is a
    multiple of ``alignment`` bytes, else a copy that is (a fresh allocation)."""
    same_order = (
        tensor.numel() <= 1
        or (tensor.is_contiguous() and view.is_contiguous())  # the common case, cheaply
        or tensor.stride() == view.stride()
    )
    if same_order and tensor.data_ptr() % alignment == 0:
        return tensor
    copy = torch.empty_strided(view.shape, view.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor)


def write_back(tensors: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    """Return updated values to the tensors that ``like_buffer`` had to copy."""
    for tensor, copy in zip(tensors, copies, strict=True):
        if copy is not tensor:
            tensor.copy_(copy)
