"""Whether a gradient taken off ``.grad`` is referenced from anywhere else.

Only such a gradient may become a window's accumulation buffer (and be added to in
place by later micro-steps): autograd hands over fresh, private tensors, but a user
may have set ``p.grad`` to a tensor they keep, or to a view of a larger one.

The test counts references four ways: Python references to the tensor object and to
its storage object, C++ references to its TensorImpl and to its storage (a view shares
it), and it takes only memory torch owns. The counts a private tensor has are measured
once, on first use, on a fresh probe held the same way, so the test does not depend on
how a Python or torch version counts its own references. Without the private torch
functions it relies on, nothing is ever taken as private.
"""

from __future__ import annotations

import sys
from functools import cache

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

Counts = tuple[int, int, int, int]


def reference_counts(tensor: torch.Tensor) -> Counts | None:
    """The reference counts of ``tensor`` (Python references to it and to its storage
    object, C++ references to its TensorImpl and to its storage); None if this torch
    cannot tell them."""
    if _storage_use_count is None or not hasattr(tensor, "_use_count"):
        return None
    storage = tensor.untyped_storage()
    return (
        sys.getrefcount(tensor),
        sys.getrefcount(storage),
        tensor._use_count(),
        _storage_use_count(storage._cdata),
    )


def _seen_through_one_call(tensor: torch.Tensor) -> Counts | None:
    return reference_counts(tensor)  # the same depth of calls as in is_private


@cache
def _private_counts() -> Counts | None:
    probe = torch.empty(1)  # held as the callers of is_private hold theirs
    private = _seen_through_one_call(probe)
    held = [probe]  # and once more, as a caller's list would hold a gradient
    counts_when_held = _seen_through_one_call(probe)
    del held
    if private is None or counts_when_held == private:
        return None  # this Python does not count the references we need: never adopt
    return private


def is_private(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is referenced only by the caller's one local variable that
    was passed here (call it as ``is_private(grad)`` with ``grad`` a plain local), and
    its memory is torch's own: not borrowed from numpy, DLPack, a buffer or another
    process (a storage that cannot be resized), none of which the counts can see."""
    private = _private_counts()
    return (
        private is not None
        and reference_counts(tensor) == private  # counted first, as on the probe
        and tensor.untyped_storage().resizable()
    )
