"""Built-in dynamic loss scaling, kept on the device: the scale, its growth tracker and
the window's overflow flag are tensors there, and every decision about them is made by
device kernels, so that a training loop that uses it never waits on the GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LossScaling:
    """Settings of the built-in dynamic loss scaling; the defaults and meanings are
    torch.amp.GradScaler's. After a window with a non-finite gradient the scale is
    multiplied by ``backoff_factor``; after ``growth_interval`` windows in a row
    without one, by ``growth_factor``. Powers of two keep the unscaling exact."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if not (isinstance(self.growth_interval, int) and self.growth_interval >= 1):
            raise ValueError(
                f"growth_interval must be a positive integer, got {self.growth_interval!r}"
            )


def loss_scaling_settings(value: Any) -> LossScaling | None:
    """The settings meant by the optimizers' ``loss_scaling`` argument."""
    if value is None or value is False:
        return None
    if value is True:
        return LossScaling()
    if isinstance(value, LossScaling):
        return value
    raise TypeError(f"loss_scaling must be True, False or a fused_accum.LossScaling, got {value!r}")


class DeviceLossScale:
    """The scale, growth tracker and overflow flag of one device."""

    def __init__(self, settings: LossScaling, device: torch.device) -> None:
        self.settings = settings
        self.scale = torch.full((1,), settings.init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)

    def end_window(self) -> None:
        """Back off or grow the scale by the window's overflow flag, then clear it."""
        s = self.settings
        torch._amp_update_scale_(
            self.scale,
            self.growth_tracker,
            self.found_inf,
            s.growth_factor,
            s.backoff_factor,
            s.growth_interval,
        )
        self.found_inf.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "scale": self.scale.clone(),
            "growth_tracker": self.growth_tracker.clone(),
            "found_inf": self.found_inf.clone(),
        }

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        for name in ("scale", "growth_tracker", "found_inf"):
            getattr(self, name).copy_(saved[name])
