"""Random programs over the public API, checked after every operation against an
independent fp64 oracle: the state machine is api_machine.ApiMachine, the oracle
api_oracle.ApiOracle. Every backend that runs on this machine (Triton under its
interpreter) is held to it.

Profiles, by the environment variable FUSED_ACCUM_FUZZ: ``ci`` (the default: bounded
and derandomised, so CI is repeatable) and ``long`` (random, many more programs; run
by hand with ``-s`` to see the counts of what was run)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("hypothesis", reason="the property-based test needs hypothesis (test extra)")

from api_machine import COUNTS, WORST_ERROR, ApiMachine
from helpers import CPU_BACKENDS
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

PROFILES = {
    # programs per backend, operations per program
    "ci": dict(torch=800, cpu=800, triton=150, steps=50, derandomize=True),
    "long": dict(torch=20000, cpu=20000, triton=3000, steps=80, derandomize=False),
}
PROFILE = PROFILES[os.environ.get("FUSED_ACCUM_FUZZ", "ci")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:a whole window ended without a gradient")  # random programs
def test_random_programs_match_the_oracle(backend):
    machine = type(f"ApiMachine_{backend}", (ApiMachine,), {"backend": backend})
    COUNTS.pop(backend, None)
    WORST_ERROR.pop(backend, None)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=PROFILE[backend],
            stateful_step_count=PROFILE["steps"],
            derandomize=PROFILE["derandomize"],
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    counts = COUNTS[backend]
    print(f"\n{backend}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    print(f"{backend}: largest error {WORST_ERROR[backend]:.3f} of the tolerance")
    assert counts["updates"] > 0 and counts["save/loads"] > 0
