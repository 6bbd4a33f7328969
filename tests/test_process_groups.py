"""The distributed tests' rank runner (tests/process_groups.py): a rank that dies in its
work fails the test; one that dies of a signal after every rank has finished its work
(in the process group's teardown) warns."""

from __future__ import annotations

import atexit
import os

import pytest
from process_groups import run_ranks


def _abort_in_work(rank: int, world: int, folder: str) -> None:
    if rank == 1:
        os.abort()


def _abort_at_exit(rank: int, world: int, folder: str) -> None:
    if rank == 1:
        atexit.register(os.abort)  # after the barrier, the marker and the teardown


def _fail(rank: int, world: int, folder: str) -> None:
    assert rank == 0, "rank 1 fails its assertion"


def test_a_rank_that_dies_in_its_work_fails_the_test(tmp_path):
    # rank 0 waits for it in the final barrier until the spawn ends it
    with pytest.raises(AssertionError, match=r"rank 1 died \(SIGABRT\) with ranks \[0, 1\] not"):
        run_ranks(_abort_in_work, 2, tmp_path)


def test_a_rank_that_dies_after_every_rank_finished_warns(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"rank 1 died of SIGABRT in the process group's"):
        run_ranks(_abort_at_exit, 2, tmp_path)


def test_a_failed_assertion_in_a_rank_fails_the_test(tmp_path):
    with pytest.raises(Exception, match="rank 1 fails its assertion"):
        run_ranks(_fail, 2, tmp_path)
