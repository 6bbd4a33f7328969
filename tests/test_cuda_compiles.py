"""The CUDA kernels compile for sm_80 and sm_90 with no spills, at most 64 registers
(two blocks of 512 threads per SM: at least 50% occupancy) and, on the path where every
operand's address allows it, one vector access per operand: 16 bytes for fp32 and fp64
operands, 8 for bf16 and fp16 ones (four elements). Checked with nvcc, no GPU needed;
skipped without a CUDA toolkit unless FUSED_ACCUM_CUDA=1 (CI with a toolkit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cuda_ptx import nvcc, ptxas_facts, vector_accesses

pytestmark = pytest.mark.skipif(
    nvcc() is None and os.environ.get("FUSED_ACCUM_CUDA") != "1",
    reason="needs nvcc (a CUDA toolkit; set CUDA_HOME)",
)
DTYPES = ("fp32", "fp64", "bf16", "fp16")
ACCUMULATE_EXTRAS = ("", "sum_sq", "grad_sum_sq", "sum_sq+grad_sum_sq")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nvcc")


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def ptxas(request, build):
    return ptxas_facts(request.param, build)


def test_every_kernel_is_compiled(ptxas):
    kernels = {(f["kernel"], f["op"], f["dtype"], f["extra"]) for f in ptxas}
    expected = {("main", "accumulate", d, e) for d in DTYPES for e in ACCUMULATE_EXTRAS}
    expected |= {("finalize", "accumulate", d, e) for d in DTYPES for e in ACCUMULATE_EXTRAS[1:]}
    for op in ("sgd", "adam"):
        expected |= {("main", op, d, e) for d in DTYPES for e in ("", "stats")}
        expected |= {("finalize", op, d, "stats") for d in DTYPES}
    assert kernels == expected


def test_no_spills_and_at_least_half_occupancy(ptxas):
    for facts in ptxas:
        assert facts["spill_stores"] == facts["spill_loads"] == 0, facts
        assert facts["registers"] <= 64, facts
        assert facts["occupancy"] >= 0.5, facts


def _expected(op: str, dtype: str) -> tuple[dict, dict]:
    """({width: loads}, {width: stores}) of vector accesses on the aligned path: one per
    operand, of the accumulation type (16 bytes) or the parameter's (8 for 16 bits)."""
    param_width = 8 if dtype in ("bf16", "fp16") else 16
    # (operands of the accumulation type, of the parameter's type) read and written
    reads, writes = {
        "accumulate": ((1, 1), (1, 0)),  # buffer; gradient / buffer
        "sgd": ((3, 2), (2, 1)),  # buffer, master, momentum; gradient, parameter / ...
        "adam": ((5, 2), (4, 1)),  # buffer, master, three moments; gradient, parameter
    }[op]

    def widths(counts):
        result = {16: counts[0]}
        result[param_width] = result.get(param_width, 0) + counts[1]
        return {width: n for width, n in result.items() if n}

    return widths(reads), widths(writes)


def test_one_vector_access_per_operand_on_the_aligned_path(build):
    facts = vector_accesses(build)
    assert len(facts) == 4 * 4 + 2 * 4 * 2
    for kernel in facts:
        loads, stores = _expected(kernel["op"], kernel["dtype"])
        assert kernel["loads"] == loads, kernel
        assert kernel["stores"] == stores, kernel
