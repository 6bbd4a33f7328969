"""What the Triton kernels share: how a program finds its block and the elements of its
tensors, loads, the device scalars, rounding to the parameter dtype, and the row of
partials a program writes. The kernels, each one launch per call however many tensors
it covers: triton_accumulate.py, triton_steps.py (SGD, Adam) and triton_finalize.py.

Every program handles one block of one tensor, found through two small tables
(``block_tensor``, ``block_start``). Optimizer state (and master weights) is flat:
tensor ``t`` starts at ``flat_offsets[t]``, a multiple of 16 elements, which is also
its position for stochastic rounding. Gradients, parameters and
accumulation buffers (a view of the flat buffer, or a first gradient adopted as the
buffer for its window) live apart, so they are reached through tables of int64
addresses, one per tensor, each 16-byte aligned. This one way of addressing runs
on a GPU and, in CI, under the Triton interpreter, which follows such tables on CPU
tensors (triton >= 3.8; see follows_address_tables).

A block that lies wholly inside its tensor runs unmasked, so that with the alignment
hints its loads and stores are vectorised; only a tensor's last block is masked.
Arithmetic is in fp32 (fp64 parameters go to other backends: Triton passes Python
floats as fp32), every offset is int64 (tensors past 2**31 elements work),
hyperparameters are runtime arguments.

Scalars decided on the device (spec.StepBatch.device_scalars, float64) are loaded
through a pointer, under ``HAS_DEVICE_SCALARS``: a set skip flag masks off every load
and store of the program, so a skipped step writes nothing and the host never reads
the flag. Without the flag (and without ``HAS_SUM_SQ`` for accumulate) the kernels
load nothing more than before.

Sums over many programs are not taken with atomics: each program writes its partials
to its own row of a scratch buffer (``_store_partial``), which a finalize kernel
reduces in a fixed order (triton_finalize.py).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter truncates fp32 -> bf16 instead of rounding to nearest even, as GPUs
# do; under it the kernels round by hand so that CI sees GPU results.
_ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_ALIGNMENT = tl.constexpr(16)  # elements between flat offsets; bytes of every address
# partials per program: accumulate's [sum_sq, grad_sum_sq]; a step's row of grad_stats
SUM_PARTIALS = tl.constexpr(2)
STAT_PARTIALS = tl.constexpr(4)


# ----------------------------------------------------------------------- addressing


@triton.jit
def _block(
    block_tensor,  # int32 [blocks]: the tensor each program works on
    block_start,  # int64 [blocks]: first element of the program's block in that tensor
    numels,  # int64 [tensors]: elements of each tensor
    flat_offsets,  # int64 [tensors]: where each tensor starts in the flat buffers
    BLOCK: tl.constexpr,
):
    """(tensor, element indices in it, indices in the flat buffers, its numel, and
    whether the block is whole)."""
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    numel = tl.load(numels + tensor)
    local = start + tl.arange(0, BLOCK).to(tl.int64)
    flat = tl.multiple_of(tl.load(flat_offsets + tensor), _ALIGNMENT) + local
    return tensor, local, flat, numel, start + BLOCK <= numel


@triton.jit
def _address(
    table,  # int64 [tensors]: the address of each tensor, 16-byte aligned
    tensor,
    local,
    DTYPE: tl.constexpr,
):
    """Pointers to elements ``local`` of tensor ``tensor``, read from the table."""
    address = tl.load(table + tensor).to(tl.pointer_type(DTYPE), bitcast=True)
    return tl.multiple_of(address, _ALIGNMENT) + local


@triton.jit
def _table_probe_kernel(table, out, BLOCK: tl.constexpr):
    # written apart from _address, so that a fault there fails the tests, not this probe
    source = tl.load(table).to(tl.pointer_type(tl.float32), bitcast=True)
    offsets = tl.arange(0, BLOCK)
    tl.store(out + offsets, tl.load(source + offsets))


def follows_address_tables() -> bool:
    """Whether this Triton reaches CPU tensors through an address loaded from a table,
    as every kernel here does (the interpreter of triton >= 3.8 does): a 16-element
    probe."""
    import torch

    source = torch.arange(1.0, 17.0)
    out = torch.zeros(16)
    table = torch.tensor([source.data_ptr()], dtype=torch.int64)
    try:
        _table_probe_kernel[(1,)](table, out, BLOCK=16)
    except Exception:  # an interpreter that cannot cast an integer to a pointer
        return False
    return torch.equal(out, source)


@triton.jit
def _load(pointer, mask):
    if mask is None:
        return tl.load(pointer)
    else:
        return tl.load(pointer, mask=mask, other=0.0)


@triton.jit
def _device_scalar(scalars_ptr, index):
    """Entry ``index`` of the float64 device scalars, in fp32 (the accumulation dtype)."""
    return tl.load(scalars_ptr + index).to(tl.float32)


@triton.jit
def _unless_skipped(mask, scalars_ptr):
    """``mask`` (None: the whole block) narrowed to nothing when the skip flag, entry 0
    of the device scalars, is set. The flag is one scalar for the program, so the
    accesses of a whole block stay vectorised."""
    keep = tl.load(scalars_ptr) == 0
    if mask is None:
        return keep
    else:
        return tl.where(keep, mask, False)  # not `mask & keep`: the interpreter rejects it


# --------------------------------------------------------------------------- math


@triton.jit
def _to_param_dtype(x, DTYPE: tl.constexpr):
    """Round fp32 to the parameter dtype, to nearest even."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def _stochastic_noise(index, seed):
    """The 32-bit hash behind stochastic rounding (spec.stochastic_noise_reference)."""
    h = index.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _round_param(x, flat, seed, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The parameter's new value in its dtype: stochastically rounded for bf16 when
    STOCHASTIC (by the noise of its flat position), else to nearest even."""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True) + (_stochastic_noise(flat, seed) & 0xFFFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return _to_param_dtype(x, DTYPE)


# ----------------------------------------------------------------------- partials


@triton.jit
def _store_partial(partials, column, value, keep, COLUMNS: tl.constexpr):
    """Entry ``column`` of this program's row of ``partials`` ([programs, COLUMNS]); not
    written where ``keep`` (None: always) is false."""
    row = tl.program_id(0).to(tl.int64) * COLUMNS
    tl.store(partials + row + column, value, mask=keep)
