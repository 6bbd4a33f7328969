"""Sums whose bits do not depend on the number of threads."""

from __future__ import annotations

import torch

_ROW = 4096  # elements summed by one thread: below ATen's grain for splitting a reduction
# ATen's grain: a CPU reduction of fewer elements runs on one thread, in a fixed order
SERIAL_BELOW = 32768


def sum_in_fixed_order(values: torch.Tensor) -> torch.Tensor:
    """The float64 sum of ``values``, the same bits whatever the number of threads: rows
    of 4096 elements (zero-padded, which is exact) each summed whole by one thread, then
    the rows' sums the same way. A plain ``sum()`` of a large CPU tensor splits it among
    the threads and adds their parts, so its last bits follow the thread count."""
    total = values.reshape(-1).double()
    while total.numel() > _ROW:
        padding = (-total.numel()) % _ROW
        total = torch.nn.functional.pad(total, (0, padding)).view(-1, _ROW).sum(dim=1)
    return total.sum()
