"""The reference backend: the kernel spec in plain PyTorch, one tensor at a time.

It is the oracle every other backend is tested against, and it follows torch.optim's
single-tensor SGD and Adam operation by operation, so that with fp32 or fp64
parameters and a one-micro-step window it gives torch.optim's results exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .._sums import sum_in_fixed_order
from .spec import AdamHyperparams, SgdHyperparams, StepBatch


def _applied_gradient(batch: StepBatch, index: int) -> torch.Tensor:
    buffer = batch.buffers[index]
    if batch.grads is None:
        gradient = buffer * batch.normaliser
    else:
        grad = batch.grads[index].to(buffer.dtype)
        if batch.use_buffer:
            gradient = buffer.add(grad, alpha=batch.grad_weight)
        else:
            gradient = grad * batch.grad_weight
        gradient.mul_(batch.normaliser)
    if batch.device_scalars is not None:
        gradient.mul_(batch.device_scalars[1].to(buffer.dtype))
    if batch.grad_stats is not None:
        _add_grad_stats(batch, index, gradient)
    return gradient


def _add_grad_stats(batch: StepBatch, index: int, gradient: torch.Tensor) -> None:
    """Row ``index`` of ``batch.grad_stats``: [sum |g|, sum g**2, max |g|, sum grad**2]."""
    row = batch.grad_stats[index]
    magnitude = gradient.float().abs()
    row[0] += sum_in_fixed_order(magnitude).to(row.dtype)
    row[1] += sum_in_fixed_order(magnitude.square()).to(row.dtype)
    if magnitude.numel():
        torch.maximum(row[2], magnitude.max(), out=row[2])
    if batch.grads is not None:
        row[3] += sum_in_fixed_order(batch.grads[index].float().square()).to(row.dtype)


@contextmanager
def _unless_skipped(batch: StepBatch, written: list[torch.Tensor]) -> Iterator[None]:
    """Around an update: with device scalars whose skip flag is set, put every tensor in
    ``written`` back as it was, bit for bit, without reading the flag on the host."""
    if batch.device_scalars is None:
        yield
        return
    saved = [tensor.clone() for tensor in written]
    yield
    skip = batch.device_scalars[0] != 0
    for tensor, old in zip(written, saved, strict=True):
        tensor.copy_(torch.where(skip, old, tensor))


def _working_copy(batch: StepBatch, index: int, dtype: torch.dtype) -> torch.Tensor:
    """What the update changes in place: the parameter's master copy, else the
    parameter in the accumulation dtype (itself when it already is)."""
    if batch.masters is not None:
        return batch.masters[index]
    param = batch.params[index]
    return param if param.dtype == dtype else param.to(dtype)


_MASK32 = 0xFFFFFFFF


def _mul32(value: torch.Tensor, constant: int) -> torch.Tensor:
    """(value * constant) mod 2**32 for int64 tensors holding 32-bit values, without
    int64 overflow: the product is formed from 16-bit halves."""
    low, high = value & 0xFFFF, value >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & _MASK32


def _stochastic_bf16(value: torch.Tensor, buffer: torch.Tensor, seed: int) -> torch.Tensor:
    """``value`` (fp32) rounded to bf16 stochastically, as spec.StepBatch.rounding_seed
    defines: the noise of each element comes from its flat position in the buffer."""
    index = torch.empty_strided(buffer.shape, buffer.stride(), dtype=torch.int64)
    flat = index.as_strided((index.numel(),), (1,))
    torch.arange(buffer.storage_offset(), buffer.storage_offset() + index.numel(), out=flat)
    h = (_mul32(index & _MASK32, 0x9E3779B1) + seed) & _MASK32
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    bits = value.view(torch.int32).long() & _MASK32
    rounded = ((bits + (h & 0xFFFF)) >> 16) & 0xFFFF
    signed = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded)  # as int16 bits
    return signed.to(torch.int16).view(torch.bfloat16)


def _store(batch: StepBatch, index: int, working: torch.Tensor) -> None:
    param = batch.params[index]
    if batch.rounding_seed is not None and param.dtype == torch.bfloat16:
        param.copy_(_stochastic_bf16(working, batch.buffers[index], batch.rounding_seed))
    elif working is not param:
        param.copy_(working)


def _written(batch: StepBatch, *states: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Every tensor a step on ``batch`` writes."""
    written = list(batch.params) + list(batch.masters or [])
    if batch.grad_stats is not None:
        written.append(batch.grad_stats)
    for state in states:
        written += state or []
    return written


class ReferenceBackend:
    """Plain PyTorch; any device and dtype."""

    name = "torch"
    checks_operands = False

    def accumulate(
        self,
        buffers: list[torch.Tensor],
        grads: list[torch.Tensor],
        *,
        scale: float,
        overwrite: bool,
        found_inf: torch.Tensor | None = None,
        sum_sq: torch.Tensor | None = None,
        grad_sum_sq: torch.Tensor | None = None,
    ) -> None:
        for buffer, grad in zip(buffers, grads, strict=True):
            if grad_sum_sq is not None:
                grad_sum_sq.add_(sum_in_fixed_order(grad.double().square()).to(grad_sum_sq.dtype))
            grad = grad.to(buffer.dtype)
            if found_inf is not None:
                nonfinite = torch.isfinite(grad).logical_not_().any()
                torch.maximum(found_inf, nonfinite.to(found_inf.dtype), out=found_inf)
            if overwrite:
                torch.mul(grad, scale, out=buffer)
            else:
                buffer.add_(grad, alpha=scale)
            if sum_sq is not None:
                sum_sq.add_(sum_in_fixed_order(buffer.double().square()).to(sum_sq.dtype))

    def sgd_step(
        self,
        batch: StepBatch,
        momentum_buffers: list[torch.Tensor] | None,
        hyper: SgdHyperparams,
        *,
        init_momentum: bool,
    ) -> None:
        written = _written(batch, momentum_buffers if hyper.momentum != 0 else None)
        with _unless_skipped(batch, written):
            for i in range(len(batch.params)):
                grad = _applied_gradient(batch, i)
                if hyper.maximize:
                    grad = grad.neg_()
                working = _working_copy(batch, i, grad.dtype)
                if hyper.weight_decay != 0:
                    grad = grad.add(working, alpha=hyper.weight_decay)
                if hyper.momentum != 0:
                    momentum_buffer = momentum_buffers[i]
                    if init_momentum:
                        momentum_buffer.copy_(grad)
                    else:
                        momentum_buffer.mul_(hyper.momentum).add_(grad, alpha=1 - hyper.dampening)
                    if hyper.nesterov:
                        grad = grad.add(momentum_buffer, alpha=hyper.momentum)
                    else:
                        grad = momentum_buffer
                working.add_(grad, alpha=-hyper.lr)
                _store(batch, i, working)

    def adam_step(
        self,
        batch: StepBatch,
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor] | None,
        hyper: AdamHyperparams,
        *,
        step: int,
    ) -> None:
        if batch.device_scalars is None:
            step_size = hyper.lr / (1 - hyper.beta1**step)
            bias_correction2_sqrt = (1 - hyper.beta2**step) ** 0.5
        else:
            dtype = batch.buffers[0].dtype
            step_size = batch.device_scalars[2].to(dtype)
            bias_correction2_sqrt = batch.device_scalars[3].to(dtype)
        written = _written(batch, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if hyper.amsgrad else None)
        with _unless_skipped(batch, written):
            for i in range(len(batch.params)):
                grad = _applied_gradient(batch, i)
                if hyper.maximize:
                    grad = grad.neg_()
                working = _working_copy(batch, i, grad.dtype)
                if hyper.weight_decay != 0:
                    if hyper.decoupled_weight_decay:
                        working.mul_(1 - hyper.lr * hyper.weight_decay)
                    else:
                        grad = grad.add(working, alpha=hyper.weight_decay)
                exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
                exp_avg.lerp_(grad, 1 - hyper.beta1)
                exp_avg_sq.mul_(hyper.beta2).addcmul_(grad, grad, value=1 - hyper.beta2)
                if hyper.amsgrad:
                    second_moment = max_exp_avg_sqs[i]
                    torch.maximum(second_moment, exp_avg_sq, out=second_moment)
                else:
                    second_moment = exp_avg_sq
                denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
                if isinstance(step_size, torch.Tensor):
                    # addcdiv_ takes a number only; on CPU it rounds (value * t1) / t2,
                    # and so does this
                    working.addcdiv_(exp_avg * step_size, denom, value=-1)
                else:
                    working.addcdiv_(exp_avg, denom, value=-step_size)
                _store(batch, i, working)
