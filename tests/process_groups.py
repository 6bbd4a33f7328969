"""Ranks for the distributed tests: ``run_ranks(worker, world, folder, *args, **kwargs)``
runs ``worker(rank, world, folder, *args, **kwargs)`` in ``world`` spawned processes
joined in a gloo group, and raises if any of them fails.

Now and then (a few times in full CI runs; never in a stress loop of the same workers)
a rank of these tests died of SIGABRT without a Python error, and where it died went
unrecorded. Each rank therefore marks its work done after the final barrier, when all
its assertions have passed and every peer is past its collectives: a rank that dies of
a signal after every rank has marked its work done died in the process group's teardown
or the interpreter's exit, and the test warns instead of failing. A death before that
fails the test, saying which ranks had not finished."""

from __future__ import annotations

import datetime
import gc
import os
import uuid
import warnings
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
    spawn_id = uuid.uuid4().hex
    settings = (worker, world, str(folder), spawn_id, args, kwargs)
    try:
        mp.spawn(_rank, args=settings, nprocs=world, join=True)
    except mp.ProcessExitedException as death:
        done = [os.path.exists(_done_marker(str(folder), spawn_id, r)) for r in range(world)]
        if death.signal_name is None or not all(done):
            unfinished = [r for r in range(world) if not done[r]]
            raise AssertionError(
                f"rank {death.error_index} died ({death.signal_name or death.exit_code}) "
                f"with ranks {unfinished} not done with their work"
            ) from death
        warnings.warn(
            f"rank {death.error_index} died of {death.signal_name} in the process group's "
            f"teardown, after every rank had finished its work",
            RuntimeWarning,
            stacklevel=2,
        )


def _done_marker(folder: str, spawn_id: str, rank: int) -> str:
    return os.path.join(folder, f"rank{rank}-{spawn_id}.done")


def _rank(rank: int, worker, world: int, folder: str, spawn_id: str, args, kwargs) -> None:
    store = os.path.join(folder, f"store-{spawn_id}")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        worker(rank, world, folder, *args, **kwargs)
        gc.collect()  # what holds the group (optimizers, FSDP2 states) goes while it lives
        dist.barrier()  # no rank tears the group down while a peer still uses it
        with open(_done_marker(folder, spawn_id, rank), "w"):
            pass
    finally:
        dist.destroy_process_group()
