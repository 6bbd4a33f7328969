"""The Triton kernels compile for sm_80 and sm_90 (GPU code paths included, which the
interpreter cannot run), with vectorised memory access, no spills to local memory and
round-to-nearest sqrt/division: checked on PTX built without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ptx_facts():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_ptx.py")
    result = subprocess.run(
        [sys.executable, str(script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_variant_compiles(ptx_facts):
    kernels = {(f["kernel"], f["arch"]) for f in ptx_facts}
    assert kernels == {(k, a) for k in ("accumulate", "sgd", "adam") for a in (80, 90)}
    assert len(ptx_facts) == 3 * 2 * 2 * 3


def test_memory_access_is_vectorised_without_spills(ptx_facts):
    for facts in ptx_facts:
        assert facts["vector_loads"] > 0 and facts["vector_stores"] > 0, facts
        assert not facts["local_memory"], facts


def test_adam_rounds_like_torch(ptx_facts):
    for facts in ptx_facts:
        if facts["kernel"] == "adam":
            assert facts["sqrt_rn"] and facts["div_rn"], facts
