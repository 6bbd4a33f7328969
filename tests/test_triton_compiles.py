"""The Triton kernels compile for sm_80 and sm_90 (GPU code paths included, which the
interpreter cannot run), with vectorised memory access, no spills to local memory, no
atomics and round-to-nearest sqrt/division: checked on PTX built without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the extras of each kernel's variants (triton_ptx.py): none, then more and more
ACCUMULATE_EXTRAS = ("", "sum_sq", "sum_sq+grad_sum_sq")
STEP_EXTRAS = ("", "scalars", "scalars+stats")
FINALIZE_KERNELS = ("finalize_sums", "finalize_grad_stats")
# partials each extra has a program write: a sum each, a row of the statistics
PARTIALS = {"sum_sq": 1, "grad_sum_sq": 1, "scalars": 0, "stats": 4}


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


@pytest.fixture(scope="module")
def block_facts(ptx_facts):
    """The facts of the kernels that work on blocks (not the finalize kernels)."""
    return [f for f in ptx_facts if f["kernel"] not in FINALIZE_KERNELS]


def test_every_variant_compiles(ptx_facts, block_facts):
    kernels = {(f["kernel"], f["arch"]) for f in ptx_facts}
    names = ("accumulate", "sgd", "adam", *FINALIZE_KERNELS)
    assert kernels == {(k, a) for k in names for a in (80, 90)}
    assert len(block_facts) == 3 * 2 * 3 * 3
    assert len(ptx_facts) == len(block_facts) + 2 * 2
    assert {f["extra"] for f in block_facts if f["kernel"] == "accumulate"} == set(
        ACCUMULATE_EXTRAS
    )
    assert {f["extra"] for f in block_facts if f["kernel"] != "accumulate"} == set(STEP_EXTRAS)


# triton_ptx.py compiles BLOCK=1024 over Triton's default 4 warps: each thread of a
# whole block holds 8 consecutive elements of every operand
ELEMENTS_PER_THREAD = 1024 // (4 * 32)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _vectors(element_bytes: int) -> int:
    """16-byte accesses for one thread's elements of one operand."""
    return ELEMENTS_PER_THREAD * element_bytes // 16


def _expected_vector_accesses(kernel: str, dtype: str) -> tuple[int, int]:
    """(loads, stores) of 16-byte vectors per thread in a whole block when every operand,
    gradients and parameters reached through their address tables included, is
    accessed with vectors. triton_ptx.py compiles the accumulate with a buffer to add
    to, and the steps with fresh gradients, a buffer, momentum (SGD) or amsgrad (Adam),
    and fp16 parameters with fp32 masters."""
    param, accumulator = BYTES[dtype], 4
    if kernel == "accumulate":
        loads, stores = [param, accumulator], [accumulator]  # gradient and buffer; buffer
    else:
        state = [accumulator] * (1 if kernel == "sgd" else 3)
        master = dtype == "fp16"
        loads = [accumulator if master else param, accumulator, param, *state]
        stores = [accumulator, param, *state] if master else [param, *state]
    return sum(map(_vectors, loads)), sum(map(_vectors, stores))


def test_every_operand_is_accessed_with_vectors_without_spills(block_facts):
    """A gradient or parameter loaded element by element through its table (or any
    scalar access of an operand) would show as fewer vector accesses than this."""
    for facts in block_facts:
        loads, stores = _expected_vector_accesses(facts["kernel"], facts["variant"])
        assert (facts["vector_loads"], facts["vector_stores"]) == (loads, stores), facts
        assert not facts["local_memory"], facts


def test_extras_keep_the_memory_access_of_the_plain_kernels(block_facts):
    """sum_sq, grad_sum_sq, device scalars (whose skip flag masks every access) and
    gradient statistics leave the vector loads and stores as they are; the sums and
    statistics cost one scalar store per partial in each of the two code paths (whole
    and masked block), and no atomic: their order would vary on a GPU."""
    facts_of = {(f["kernel"], f["arch"], f["variant"], f["extra"]): f for f in block_facts}
    for facts in block_facts:
        base = facts_of[facts["kernel"], facts["arch"], facts["variant"], ""]
        assert facts["vector_loads"] == base["vector_loads"], (facts, base)
        assert facts["vector_stores"] == base["vector_stores"], (facts, base)
        partials = sum(PARTIALS[extra] for extra in facts["extra"].split("+") if extra)
        assert facts["scalar_stores"] == base["scalar_stores"] + 2 * partials, (facts, base)
        assert facts["atomics"] == 0, facts


def test_finalize_kernels_have_no_atomics_nor_spills(ptx_facts):
    """The finalize kernels, which add up the partials in a fixed order, compile for
    both architectures too (with everything they can add up)."""
    for facts in ptx_facts:
        if facts["kernel"] in FINALIZE_KERNELS:
            assert facts["atomics"] == 0 and not facts["local_memory"], facts


def test_adam_rounds_like_torch(ptx_facts):
    for facts in ptx_facts:
        if facts["kernel"] == "adam":
            assert facts["sqrt_rn"] and facts["div_rn"], facts
