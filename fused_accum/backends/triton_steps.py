"""The step kernels of the kernel spec (see spec.py), SGD and Adam: the window's
gradient applied to every parameter of the call and its flat state in one launch,
addressed as triton_common.py describes.

The gradient a step applies (``_applied_gradient``) is the accumulation buffer, the
last micro-step's fresh gradients, or their weighted sum, normalised, and scaled by the
device's grad_factor under ``HAS_DEVICE_SCALARS``. With ``HAS_GRAD_STATS`` each
program writes the statistics of that gradient over its block (STAT_PARTIALS per
program), which finalize_grad_stats_kernel (triton_finalize.py) adds to
spec.StepBatch.grad_stats.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    STAT_PARTIALS,
    _address,
    _block,
    _device_scalar,
    _load,
    _round_param,
    _store_partial,
    _unless_skipped,
)

# ----------------------------------------------------------------- applied gradient


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


# --------------------------------------------------------------------------- steps


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
