"""torch.distributed.checkpoint (DCP) calls into the optimizer in two ways that would
hurt a window of accumulation, recognised here by their caller:

- ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` create the state of an
  optimizer that has none yet by calling ``step()`` with zero gradients and lr 0
  (``_init_optim_state``). To us that is a micro-step: it would join the window, and end
  it early at a boundary. We create the state instead, and leave the window alone.
- DCP keeps only the state dict's ``"state"`` and ``"param_groups"``, so a partial
  window (our ``"accumulation"`` entry) would be dropped without a word. ``state_dict()``
  refuses when DCP asks for it mid-window.

The caller is told apart by the code of the calling frame: the functions of DCP's
module that call ``step()`` and ``state_dict()``.
"""

from __future__ import annotations

import sys

_DCP_MODULE = "torch.distributed.checkpoint.state_dict"
_DEPTH = 4  # step() may be reached through torch.optim's wrapper and ours


def called_by_checkpoint(function: str) -> bool:
    """Whether a caller (up to a few frames up, past this one and its caller) is DCP's
    ``function``."""
    frame = sys._getframe(2)
    for _ in range(_DEPTH):
        if frame is None:
            return False
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == _DCP_MODULE:
            return True
        frame = frame.f_back
    return False


def partial_window_refused(micro_steps: int) -> str:
    """The error for DCP asking for the state dict mid-window."""
    return (
        f"torch.distributed.checkpoint keeps only the optimizer's 'state' and "
        f"'param_groups', so it would drop the {micro_steps} micro-step(s) accumulated in "
        f"the current window: checkpoint right after a window's update "
        f"(optimizer.last_step_applied is True then), or call optimizer.flush() first, or "
        f"save optimizer.state_dict() with torch.save, which keeps the window"
    )
