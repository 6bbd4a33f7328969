"""Ranks for the distributed tests: ``run_ranks(worker, world, folder, *args, **kwargs)``
runs ``worker(rank, world, folder, *args, **kwargs)`` in ``world`` spawned processes
joined in a gloo group, and raises if any of them fails."""

from __future__ import annotations

import datetime
import gc
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# a rank whose peer failed waits in its next collective this long, not gloo's 30 minutes
TIMEOUT = datetime.timedelta(seconds=300)


def run_ranks(
    worker: Callable[..., None], world: int, folder: Any, *args: Any, **kwargs: Any
) -> None:
    # a store file of its own: a second group in the same folder must not meet the
    # first one's keys
    store = os.path.join(str(folder), f"store-{uuid.uuid4().hex}")
    settings = (worker, world, str(folder), store, args, kwargs)
    mp.spawn(_rank, args=settings, nprocs=world, join=True)


def _rank(rank: int, worker, world: int, folder: str, store: str, args, kwargs) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        worker(rank, world, folder, *args, **kwargs)
        gc.collect()  # what holds the group (optimizers, FSDP2 states) goes while it lives
        dist.barrier()  # no rank tears the group down while a peer still uses it
    finally:
        dist.destroy_process_group()
