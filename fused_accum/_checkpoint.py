"""torch.distributed.checkpoint (DCP) calls into the optimizer in two ways that would
hurt a window of accumulation, recognised here by their caller:

- ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` create the state of an
  optimizer that has none yet by calling ``step()`` with zero gradients and lr 0
  (``_init_optim_state``). To us that is a micro-step: it would join the window, and end
  it early at a boundary. We create the state instead, and leave the window alone.
- DCP keeps only the state dict's ``"state"`` and ``"param_groups"``, so a partial
  window (our ``"accumulation"`` entry) would be dropped without a word. With
  ``checkpoint_partial_windows`` the window goes where DCP keeps it: its counters into
  every param group (``"accumulation_window"``), each parameter's sum into its state
  (``"accumulation_buffer"``, shown like the parameter, so that DCP reshards it, and
  ``"accumulation_sum"``, whether it holds one), at a boundary too, so that a fresh
  optimizer's load template asks for them. Without the option (DCP checkpoints then
  have torch.optim's entries, and load into and from torch.optim), or in DCP's
  flattened format (whose load keeps only the names a live optimizer's state has),
  ``state_dict()`` refuses when DCP asks for it mid-window.

The caller is told apart by the code of the calling frame: the functions of DCP's
module that call ``step()`` and ``state_dict()``.
"""

from __future__ import annotations

import sys
from typing import Any

_DCP_MODULE = "torch.distributed.checkpoint.state_dict"
_DEPTH = 4  # step() may be reached through torch.optim's wrapper and ours


def checkpoint_frame(function: str, depth: int = 2) -> Any:
    """The frame of DCP's ``function`` if it is a caller (up to a few frames up, past
    ``depth`` frames: this one and its caller), else None."""
    frame = sys._getframe(depth)
    for _ in range(_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == _DCP_MODULE:
            return frame
        frame = frame.f_back
    return None


def called_by_checkpoint(function: str) -> bool:
    """Whether a caller (up to a few frames up, past this one and its caller) is DCP's
    ``function``."""
    return checkpoint_frame(function, depth=3) is not None


def flattened(frame: Any) -> bool:
    """Whether DCP's ``_get_optim_state_dict`` running in ``frame`` flattens the state
    dict (``StateDictOptions(flatten_optimizer_state_dict=True)``)."""
    info = frame.f_locals.get("info")
    return bool(getattr(info, "flatten_optimizer_state_dict", False))


def partial_window_refused(micro_steps: int, flat: bool) -> str:
    """The error for DCP asking for the state dict mid-window when it cannot keep the
    window: in the flattened format, or without ``checkpoint_partial_windows``."""
    why = (
        "its flattened format (flatten_optimizer_state_dict=True) loads only the state "
        "names a live optimizer has"
        if flat
        else "the window's sums go into DCP checkpoints only with "
        "checkpoint_partial_windows=True (4 more bytes per parameter element in every "
        "checkpoint; give it to the optimizer that saves and to the one that loads)"
    )
    return (
        f"torch.distributed.checkpoint would drop the {micro_steps} micro-step(s) "
        f"accumulated in the current window: {why}. Or checkpoint right after a window's "
        f"update (optimizer.last_step_applied is True then), call optimizer.flush() "
        f"first, or save optimizer.state_dict() with torch.save, which keeps the window"
    )
