"""Triton kernels of the kernel spec (see spec.py), one launch per call however many
tensors it covers.

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

Sums over many programs (accumulate's ``sum_sq`` and ``grad_sum_sq``, the steps'
``grad_stats``, spec.StepBatch) come out the same bit for bit from run to run: no
atomics, whose order a GPU varies. Each program reduces its block and writes the
results (its partials) to its own row of a scratch buffer; a finalize kernel launched
after it on the same stream then reduces the partials in a fixed order and adds the
totals to the targets. All of it sits under constexpr flags: without sums asked for,
no partial is written and no finalize is launched. The maximum of ``grad_stats`` is
reduced on the fp32 bits of |g| as integers, which orders them as floats and makes
NaN (above inf) win.
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


# --------------------------------------------------------------------------- sums


@triton.jit
def _store_partial(partials, column, value, keep, COLUMNS: tl.constexpr):
    """Entry ``column`` of this program's row of ``partials`` ([programs, COLUMNS]); not
    written where ``keep`` (None: always) is false."""
    row = tl.program_id(0).to(tl.int64) * COLUMNS
    tl.store(partials + row + column, value, mask=keep)


@triton.jit
def _grad_stats_partials(partials, scalars_ptr, gradient, grad, mask,
                         HAS_GRADS: tl.constexpr, HAS_DEVICE_SCALARS: tl.constexpr):  # fmt: skip
    """This program's partials of the gradient statistics (spec.StepBatch.grad_stats):
    [sum |g|, sum g**2, max |g|, sum grad**2] over its block, for the applied gradient
    ``gradient`` and the fresh one ``grad`` (loaded as 0 where masked off). Lanes
    outside ``mask`` add nothing; with a set skip flag nothing is written."""
    # |g| as bits, sign cleared: for non-negative floats integer order is float order,
    # and NaN's bits lie above inf's, so the integer max lets NaN win
    bits = gradient.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        bits = tl.where(mask, bits, 0)
    magnitude = bits.to(tl.float32, bitcast=True)
    keep = None
    if HAS_DEVICE_SCALARS:
        keep = tl.load(scalars_ptr) == 0  # the finalize leaves the rows alone too
    _store_partial(partials, 0, tl.sum(magnitude, axis=0), keep, STAT_PARTIALS)
    _store_partial(partials, 1, tl.sum(magnitude * magnitude, axis=0), keep, STAT_PARTIALS)
    maximum = tl.max(bits, axis=0).to(tl.float32, bitcast=True)
    _store_partial(partials, 2, maximum, keep, STAT_PARTIALS)
    if HAS_GRADS:
        _store_partial(partials, 3, tl.sum(grad * grad, axis=0), keep, STAT_PARTIALS)


@triton.jit
def _applied_gradient(
    buffers,
    grads,
    tensor,
    local,
    flat,
    mask,
    normaliser,
    grad_weight,
    scalars_ptr,
    partials,
    GRAD_DTYPE: tl.constexpr,
    USE_BUFFER: tl.constexpr,
    HAS_GRADS: tl.constexpr,
    HAS_DEVICE_SCALARS: tl.constexpr,
    HAS_GRAD_STATS: tl.constexpr,
):
    """(buffer (if USE_BUFFER) + grad_weight * grad (if HAS_GRADS)) * normaliser, times
    the device's grad_factor (if HAS_DEVICE_SCALARS); the host never asks for
    neither term. Its statistics go to the program's partials (if HAS_GRAD_STATS)."""
    if HAS_GRADS:
        address = _address(grads, tensor, local, GRAD_DTYPE)
        grad = _load(address, mask).to(tl.float32)
    if USE_BUFFER:
        gradient = _load(_address(buffers, tensor, local, tl.float32), mask)
        if HAS_GRADS:
            gradient += grad * grad_weight
    else:
        gradient = grad * grad_weight
    gradient *= normaliser  # the sum first: a window that cancels gives exactly zero
    if HAS_DEVICE_SCALARS:
        gradient *= _device_scalar(scalars_ptr, 1)
    if HAS_GRAD_STATS:
        if not HAS_GRADS:
            grad = gradient  # unused
        _grad_stats_partials(partials, scalars_ptr, gradient, grad, mask, HAS_GRADS,
                             HAS_DEVICE_SCALARS)  # fmt: skip
    return gradient


# ------------------------------------------------------------------------ kernels


@triton.jit
def _accumulate_block(
    buffers, grads, found_inf_ptr, partials, tensor,
    local, flat, mask, scale, GRAD_DTYPE: tl.constexpr,
    OVERWRITE: tl.constexpr, CHECK_FINITE: tl.constexpr, HAS_SUM_SQ: tl.constexpr,
    HAS_GRAD_SUM_SQ: tl.constexpr,
):  # fmt: skip
    address = _address(grads, tensor, local, GRAD_DTYPE)
    grad = _load(address, mask).to(tl.float32)
    buffer = _address(buffers, tensor, local, tl.float32)
    if CHECK_FINITE:
        nonfinite = (grad != grad) | (tl.abs(grad) == float("inf"))
        if tl.max(nonfinite.to(tl.int32), axis=0) > 0:
            tl.store(found_inf_ptr, 1.0)
    if HAS_GRAD_SUM_SQ:
        # the gradient as given, widened, before the scale; masked-off elements are 0
        _store_partial(partials, 1, tl.sum(grad * grad, axis=0), None, SUM_PARTIALS)
    contribution = grad * scale
    if not OVERWRITE:
        contribution += _load(buffer, mask)
    tl.store(buffer, contribution, mask=mask)
    if HAS_SUM_SQ:
        # masked-off elements loaded as 0 and add nothing
        block_sum_sq = tl.sum(contribution * contribution, axis=0)
        _store_partial(partials, 0, block_sum_sq, None, SUM_PARTIALS)


@triton.jit
def accumulate_kernel(
    buffers,  # int64 [tensors]: addresses of the fp32 accumulation buffers
    grads,  # int64 [tensors]: addresses of the gradients
    found_inf_ptr,  # one fp32 flag, set to 1 when a gradient element is not finite
    partials,  # fp32 [blocks, SUM_PARTIALS]: the block's sum_sq and grad_sum_sq
    block_tensor,  # int32 [blocks]
    block_start,  # int64 [blocks]
    numels,  # int64 [tensors]
    flat_offsets,  # int64 [tensors]
    scale,  # weight of this micro-batch
    GRAD_DTYPE: tl.constexpr,  # element type of the gradients
    OVERWRITE: tl.constexpr,  # first contribution of the window: do not read the buffer
    CHECK_FINITE: tl.constexpr,  # raise found_inf on a non-finite gradient
    HAS_SUM_SQ: tl.constexpr,  # write the squares of the new buffer values' partial
    HAS_GRAD_SUM_SQ: tl.constexpr,  # write the squares of the gradients' partial
    BLOCK: tl.constexpr,  # elements per program
):
    tensor, local, flat, numel, whole = _block(
        block_tensor, block_start, numels, flat_offsets, BLOCK
    )
    if whole:
        _accumulate_block(
            buffers, grads, found_inf_ptr, partials, tensor,
            local, flat, None, scale, GRAD_DTYPE, OVERWRITE, CHECK_FINITE,
            HAS_SUM_SQ, HAS_GRAD_SUM_SQ,
        )  # fmt: skip
    else:
        _accumulate_block(
            buffers, grads, found_inf_ptr, partials, tensor,
            local, flat, local < numel, scale, GRAD_DTYPE, OVERWRITE,
            CHECK_FINITE, HAS_SUM_SQ, HAS_GRAD_SUM_SQ,
        )  # fmt: skip


@triton.jit
def _sgd_block(
    params, buffers, grads, momentum_ptr, master_ptr,
    scalars_ptr, partials, tensor, local, flat, mask, normaliser, grad_weight, lr, momentum,
    one_minus_dampening, weight_decay, seed, PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, USE_BUFFER: tl.constexpr,
    HAS_GRADS: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    INIT_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_DEVICE_SCALARS: tl.constexpr,
    HAS_GRAD_STATS: tl.constexpr,
):  # fmt: skip
    if HAS_DEVICE_SCALARS:
        mask = _unless_skipped(mask, scalars_ptr)
    gradient = _applied_gradient(
        buffers, grads, tensor, local, flat, mask, normaliser, grad_weight,
        scalars_ptr, partials, GRAD_DTYPE, USE_BUFFER, HAS_GRADS,
        HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
    )  # fmt: skip
    if MAXIMIZE:
        gradient = -gradient
    param_address = _address(params, tensor, local, PARAM_DTYPE)
    if HAS_MASTER:
        param = _load(master_ptr + flat, mask)
    else:
        param = _load(param_address, mask).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        gradient += weight_decay * param
    if HAS_MOMENTUM:
        if INIT_MOMENTUM:
            velocity = gradient
        else:
            velocity = _load(momentum_ptr + flat, mask)
            velocity = velocity * momentum + one_minus_dampening * gradient
        tl.store(momentum_ptr + flat, velocity, mask=mask)
        if NESTEROV:
            gradient += momentum * velocity
        else:
            gradient = velocity
    param -= lr * gradient
    if HAS_MASTER:
        tl.store(master_ptr + flat, param, mask=mask)
    tl.store(param_address, _round_param(param, flat, seed, PARAM_DTYPE, STOCHASTIC), mask=mask)


@triton.jit
def sgd_kernel(
    params,  # int64 [tensors]: addresses of the parameters
    buffers,  # int64 [tensors]: addresses of the fp32 accumulation buffers
    grads,  # int64 [tensors]: addresses of the last micro-step's fresh gradients
    momentum_ptr,  # flat momentum buffers
    master_ptr,  # flat fp32 master copies of the parameters (HAS_MASTER)
    scalars_ptr,  # float64 device scalars, [skip, grad_factor, ...] (HAS_DEVICE_SCALARS)
    partials,  # fp32 [blocks, STAT_PARTIALS]: the block's statistics (HAS_GRAD_STATS)
    block_tensor,  # int32 [blocks]
    block_start,  # int64 [blocks]
    numels,  # int64 [tensors]
    flat_offsets,  # int64 [tensors]
    normaliser,  # 1 / window weight
    grad_weight,  # weight of the fresh gradients in the window's sum
    lr,  # learning rate
    momentum,  # momentum factor
    one_minus_dampening,  # 1 - dampening of the momentum
    weight_decay,  # L2 penalty
    seed,  # this update's seed of stochastic rounding
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    USE_BUFFER: tl.constexpr,
    HAS_GRADS: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    INIT_MOMENTUM: tl.constexpr,  # first update: the momentum buffer becomes the gradient
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr,  # read and write master_ptr, write the parameter rounded
    STOCHASTIC: tl.constexpr,  # round bf16 parameters stochastically
    HAS_DEVICE_SCALARS: tl.constexpr,  # read scalars_ptr; a set skip flag writes nothing
    HAS_GRAD_STATS: tl.constexpr,  # write the applied gradient's statistics' partials
    BLOCK: tl.constexpr,
):
    tensor, local, flat, numel, whole = _block(
        block_tensor, block_start, numels, flat_offsets, BLOCK
    )
    if whole:
        _sgd_block(
            params, buffers, grads, momentum_ptr, master_ptr,
            scalars_ptr, partials, tensor, local, flat, None, normaliser, grad_weight, lr,
            momentum, one_minus_dampening, weight_decay, seed, PARAM_DTYPE, GRAD_DTYPE,
            USE_BUFFER, HAS_GRADS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, INIT_MOMENTUM,
            NESTEROV, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
        )  # fmt: skip
    else:
        _sgd_block(
            params, buffers, grads, momentum_ptr, master_ptr,
            scalars_ptr, partials, tensor, local, flat, local < numel, normaliser, grad_weight,
            lr, momentum, one_minus_dampening, weight_decay, seed, PARAM_DTYPE, GRAD_DTYPE,
            USE_BUFFER, HAS_GRADS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, INIT_MOMENTUM,
            NESTEROV, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
        )  # fmt: skip


@triton.jit
def _adam_block(
    params, buffers, grads, exp_avg_ptr, exp_avg_sq_ptr,
    max_exp_avg_sq_ptr, master_ptr, scalars_ptr, partials, tensor, local, flat, mask,
    normaliser, grad_weight, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    decay_factor, step_size, bias_correction2_sqrt, seed, PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, USE_BUFFER: tl.constexpr,
    HAS_GRADS: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_DEVICE_SCALARS: tl.constexpr, HAS_GRAD_STATS: tl.constexpr,
):  # fmt: skip
    if HAS_DEVICE_SCALARS:
        mask = _unless_skipped(mask, scalars_ptr)
        step_size = _device_scalar(scalars_ptr, 2)
        bias_correction2_sqrt = _device_scalar(scalars_ptr, 3)
    gradient = _applied_gradient(
        buffers, grads, tensor, local, flat, mask, normaliser, grad_weight,
        scalars_ptr, partials, GRAD_DTYPE, USE_BUFFER, HAS_GRADS,
        HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
    )  # fmt: skip
    if MAXIMIZE:
        gradient = -gradient
    param_address = _address(params, tensor, local, PARAM_DTYPE)
    if HAS_MASTER:
        param = _load(master_ptr + flat, mask)
    else:
        param = _load(param_address, mask).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param *= decay_factor
        else:
            gradient += weight_decay * param
    exp_avg = _load(exp_avg_ptr + flat, mask)
    exp_avg += one_minus_beta1 * (gradient - exp_avg)
    exp_avg_sq = _load(exp_avg_sq_ptr + flat, mask)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * gradient * gradient
    second_moment = exp_avg_sq
    if AMSGRAD:
        second_moment = tl.maximum(_load(max_exp_avg_sq_ptr + flat, mask), exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr + flat, second_moment, mask=mask)
    # round-to-nearest sqrt and division, as torch computes them (the defaults may not)
    denominator = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    param -= step_size * tl.div_rn(exp_avg, denominator)
    tl.store(exp_avg_ptr + flat, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + flat, exp_avg_sq, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + flat, param, mask=mask)
    tl.store(param_address, _round_param(param, flat, seed, PARAM_DTYPE, STOCHASTIC), mask=mask)


@triton.jit
def adam_kernel(
    params,  # int64 [tensors]: addresses of the parameters
    buffers,  # int64 [tensors]: addresses of the fp32 accumulation buffers
    grads,  # int64 [tensors]: addresses of the last micro-step's fresh gradients
    exp_avg_ptr,  # flat first moments
    exp_avg_sq_ptr,  # flat second moments
    max_exp_avg_sq_ptr,  # flat running maxima of the second moments (amsgrad)
    master_ptr,  # flat fp32 master copies of the parameters (HAS_MASTER)
    scalars_ptr,  # float64 device scalars, [skip, grad_factor, ...] (HAS_DEVICE_SCALARS)
    partials,  # fp32 [blocks, STAT_PARTIALS]: the block's statistics (HAS_GRAD_STATS)
    block_tensor,  # int32 [blocks]
    block_start,  # int64 [blocks]
    numels,  # int64 [tensors]
    flat_offsets,  # int64 [tensors]
    normaliser,  # 1 / window weight
    grad_weight,  # weight of the fresh gradients in the window's sum
    one_minus_beta1,  # 1 - beta1: weight of the gradient in the first moment
    beta2,  # second-moment decay
    one_minus_beta2,  # 1 - beta2
    eps,  # added to the denominator
    weight_decay,  # L2 penalty (coupled Adam)
    decay_factor,  # 1 - lr * weight_decay (decoupled AdamW)
    step_size,  # lr / (1 - beta1**step); entry 2 of the device scalars replaces it
    bias_correction2_sqrt,  # sqrt(1 - beta2**step); entry 3 of the device scalars replaces it
    seed,  # this update's seed of stochastic rounding
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    USE_BUFFER: tl.constexpr,
    HAS_GRADS: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr,  # read and write master_ptr, write the parameter rounded
    STOCHASTIC: tl.constexpr,  # round bf16 parameters stochastically
    HAS_DEVICE_SCALARS: tl.constexpr,  # read scalars_ptr; a set skip flag writes nothing
    HAS_GRAD_STATS: tl.constexpr,  # write the applied gradient's statistics' partials
    BLOCK: tl.constexpr,
):
    tensor, local, flat, numel, whole = _block(
        block_tensor, block_start, numels, flat_offsets, BLOCK
    )
    if whole:
        _adam_block(
            params, buffers, grads, exp_avg_ptr, exp_avg_sq_ptr,
            max_exp_avg_sq_ptr, master_ptr, scalars_ptr, partials, tensor, local, flat, None,
            normaliser, grad_weight, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            decay_factor, step_size, bias_correction2_sqrt, seed, PARAM_DTYPE, GRAD_DTYPE,
            USE_BUFFER, HAS_GRADS, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE,
            HAS_MASTER, STOCHASTIC, HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
        )  # fmt: skip
    else:
        _adam_block(
            params, buffers, grads, exp_avg_ptr, exp_avg_sq_ptr,
            max_exp_avg_sq_ptr, master_ptr, scalars_ptr, partials, tensor, local, flat,
            local < numel, normaliser, grad_weight, one_minus_beta1, beta2, one_minus_beta2, eps,
            weight_decay, decay_factor, step_size, bias_correction2_sqrt, seed, PARAM_DTYPE,
            GRAD_DTYPE, USE_BUFFER, HAS_GRADS, HAS_WEIGHT_DECAY, DECOUPLED,
            AMSGRAD, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_DEVICE_SCALARS, HAS_GRAD_STATS,
        )  # fmt: skip


# ----------------------------------------------------------------------- finalize
# The partials are reduced in fp64: widening them is exact, and an fp64 sum of even
# millions of them (all non-negative: nothing cancels) is off by far less than an fp32
# ulp, so the total, rounded to fp32 once as it is added to its target, hardly depends
# on the tiling. A finalize reads a few values per block, so fp64 costs nothing.


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
