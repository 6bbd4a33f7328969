"""The finalize kernels: the sums over many programs of a launch, added to their
targets in a fixed order, so that they come out the same bit for bit from run to run.

Sums over many programs (accumulate's ``sum_sq`` and ``grad_sum_sq``, the steps'
``grad_stats``, spec.StepBatch) take no atomics, whose order a GPU varies. Each
program reduces its block and writes the results (its partials) to its own row of a
scratch buffer; a finalize kernel launched after it on the same stream then reduces
the partials in a fixed order and adds the totals to the targets. All of it sits under
constexpr flags: without sums asked for, no partial is written and no finalize is
launched. The maximum of ``grad_stats`` is reduced on the fp32 bits of |g| as
integers, which orders them as floats and makes NaN (above inf) win.

The partials are reduced in fp64: widening them is exact, and an fp64 sum of even
millions of them (all non-negative: nothing cancels) is off by far less than an fp32
ulp, so the total, rounded to fp32 once as it is added to its target, hardly depends
on the tiling. A finalize reads a few values per block, so fp64 costs nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import STAT_PARTIALS, SUM_PARTIALS


@triton.jit
def _sum_in_order(column, count, COLUMNS: tl.constexpr, TILE: tl.constexpr):
    """The sum of ``count`` partials, ``column[0]``, ``column[COLUMNS]``, ...: each tile
    of TILE by tl.sum, the tiles' sums added in order."""
    offsets = tl.arange(0, TILE).to(tl.int64)
    total = tl.zeros((), tl.float64)
    for start in range(0, count, TILE):
        index = start + offsets
        tile = tl.load(column + index * COLUMNS, mask=index < count, other=0.0)
        total += tl.sum(tile.to(tl.float64), axis=0)
    return total


@triton.jit
def _add_total(target, total, keep):
    """``target`` (fp32) plus the fp64 ``total``, rounded once; nothing written where
    ``keep`` (None: always) is false."""
    tl.store(target, (tl.load(target).to(tl.float64) + total).to(tl.float32), mask=keep)


@triton.jit
def finalize_sums_kernel(
    partials,  # fp32 [programs, SUM_PARTIALS] of an accumulate
    programs,  # programs of that accumulate
    sum_sq_ptr,  # one fp32 total, the sum of the programs' sum_sq added to it
    grad_sum_sq_ptr,  # one fp32 total, the sum of the programs' grad_sum_sq added to it
    HAS_SUM_SQ: tl.constexpr,
    HAS_GRAD_SUM_SQ: tl.constexpr,
    TILE: tl.constexpr,  # partials summed at a time
):
    if HAS_SUM_SQ:
        _add_total(sum_sq_ptr, _sum_in_order(partials, programs, SUM_PARTIALS, TILE), None)
    if HAS_GRAD_SUM_SQ:
        total = _sum_in_order(partials + 1, programs, SUM_PARTIALS, TILE)
        _add_total(grad_sum_sq_ptr, total, None)


@triton.jit
def finalize_grad_stats_kernel(
    partials,  # fp32 [programs, STAT_PARTIALS] of a step
    stats_ptr,  # fp32 [tensors, 4] gradient statistics, added to; one program per row
    scalars_ptr,  # float64 device scalars, [skip, ...] (HAS_DEVICE_SCALARS)
    tensor_first_block,  # int64 [tensors]: the step's first program on each tensor
    tensor_blocks,  # int64 [tensors]: how many consecutive programs work on it
    HAS_GRADS: tl.constexpr,  # add column 3, the fresh gradients' squares
    HAS_DEVICE_SCALARS: tl.constexpr,  # read scalars_ptr; a set skip flag writes nothing
    TILE: tl.constexpr,  # partials reduced at a time
):
    tensor = tl.program_id(0).to(tl.int64)
    count = tl.load(tensor_blocks + tensor)
    keep = count > 0  # an empty tensor had no program: its row stays as it is
    if HAS_DEVICE_SCALARS:
        keep = keep & (tl.load(scalars_ptr) == 0)
    first = partials + tl.load(tensor_first_block + tensor) * STAT_PARTIALS
    row = stats_ptr + tensor * 4
    _add_total(row, _sum_in_order(first, count, STAT_PARTIALS, TILE), keep)
    _add_total(row + 1, _sum_in_order(first + 1, count, STAT_PARTIALS, TILE), keep)
    if HAS_GRADS:
        _add_total(row + 3, _sum_in_order(first + 3, count, STAT_PARTIALS, TILE), keep)
    # the maximum on the bits, as the programs took theirs (NaN wins)
    maxima = (first + 2).to(tl.pointer_type(tl.int32), bitcast=True)
    offsets = tl.arange(0, TILE).to(tl.int64)
    bits = tl.zeros((), tl.int32)
    for start in range(0, count, TILE):
        index = start + offsets
        tile = tl.load(maxima + index * STAT_PARTIALS, mask=index < count, other=0)
        bits = tl.maximum(bits, tl.max(tile, axis=0))
    maximum = bits.to(tl.float32, bitcast=True)
    old = tl.load(row + 2)
    # as torch.maximum: NaN wins from either side (a comparison with NaN is false)
    new = tl.where((maximum > old) | (maximum != maximum), maximum, old)
    tl.store(row + 2, new, mask=keep)
