"""The kernel spec: the few operations every backend implements, with one meaning.

All arithmetic is done in the accumulation dtype of the buffers (fp32, or fp64 for fp64
parameters); gradients and parameters are read in their own dtype and converted on
load, parameters are rounded once on store.

``accumulate(buffers, grads, scale, overwrite, found_inf, sum_sq, grad_sum_sq)``
    ``buffer = buffer + scale * grad`` for each pair, or ``buffer = scale * grad`` when
    ``overwrite`` (the first contribution of a window: the buffer is not read). When
    ``found_inf`` (a one-element fp32 tensor on the buffers' device) is given, it is set
    to 1 if any gradient element is not finite, and left alone otherwise. When
    ``sum_sq`` (a one-element fp32 tensor on the buffers' device) is given, the sum of
    the squares of the buffers' new values is added to it (in fp32 or wider, in any
    order): the global gradient norm for clipping comes out of this pass. When
    ``grad_sum_sq`` (likewise) is given, the sum of the squares of the gradients as
    given (widened to fp32, before ``scale``) is added to it: a micro-step's norm.

``sgd_step(batch, momentum_buffers, hyper, *, init_momentum)`` and
``adam_step(batch, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hyper, *, step)``
    Apply one update to each parameter of ``batch`` from its applied gradient

        g = (buffer  (if batch.use_buffer)  +  grad_weight * grad  (if batch.grads)) * normaliser

    the window's weighted sum, completed by the fresh gradients, then normalised: a sum
    that cancels exactly gives exactly zero (normalising the two terms apart would
    leave a rounding remainder, which Adam would blow up to a full step). Without a
    sum to complete (``use_buffer`` false) the optimizer passes the fresh gradients'
    share as ``grad_weight`` and a normaliser of 1, so that a window of one weighted
    micro-step applies its gradient exactly. Every backend
    forms g in this order; where it contracts ``buffer + grad_weight * grad`` into a
    fused multiply-add the result is within one rounding of the plain one.

    with torch.optim's update math for SGD, Adam or AdamW, and update the parameters
    (through their fp32 masters when ``batch.masters`` is given) and state in place. A
    batch with ``grads`` is the accumulate-and-step of the window's last micro-step:
    the fresh gradients are added and applied without the window's sum ever being
    written to the buffer.

    With ``batch.device_scalars`` (see there) the update reads its skip flag, gradient
    factor and, for Adam, bias corrections from device memory, so that no host
    synchronisation is needed to decide them.

    ``hyper`` holds the param group's hyperparameters, one typed record per algorithm
    (``SgdHyperparams``, ``AdamHyperparams``) whose fields are, in order, the
    hyperparameter arguments of the compiled ops' schemas (csrc/op_schemas.h): the
    compiled backend passes them positionally and checks the order when it loads the
    ops. What changes from update to update stays a keyword: ``init_momentum`` (the
    first update with momentum: the momentum buffer is set to the gradient, not
    blended into) and ``step`` (Adam's step count, from 1, for the bias corrections).

    The buffers are left as they are: after an update their contents are dead, and
    the first contribution of the next window overwrites them (``overwrite=True``), so
    no pass is spent zeroing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class StepBatch:
    """Parameters of one (device, dtype) group that share every scalar of an update."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    """Accumulation views, one per parameter, in the accumulation dtype."""
    grads: list[torch.Tensor] | None
    """Fresh gradients of the window's last micro-step, or None."""
    use_buffer: bool
    """Whether the buffers hold contributions of this window (else they are not read)."""
    normaliser: float
    """Factor on the window's sum: 1 / (total weight of the window); 1 without a sum
    (``use_buffer`` false)."""
    grad_weight: float
    """Factor on the fresh gradients as they join the window's sum: their micro-batch
    weight (times the inverse loss scale of a GradScaler); without a sum, their share
    of the window, that weight / the total weight."""
    masters: list[torch.Tensor] | None = None
    """fp32 master copies of bf16/fp16 parameters: the update reads and writes them,
    and the parameter receives the master rounded to its dtype. None: the parameter
    itself is read, widened, updated and rounded."""
    rounding_seed: int | None = None
    """For bf16 parameters: round the result stochastically, not to nearest. The
    element at flat position i (its buffer's place in the flat storage) adds the low 16
    bits of ``stochastic_noise(i, rounding_seed)`` to its fp32 bits before truncating
    to bf16, so every backend rounds alike. A seed in [0, 2**31)."""
    device_scalars: torch.Tensor | None = None
    """None, or a contiguous float64 tensor on the parameters' device: ``[skip,
    grad_factor]`` for SGD, ``[skip, grad_factor, step_size, bias_correction2_sqrt]``
    for Adam. If ``skip != 0`` the step writes nothing at all (a window skipped for a
    non-finite gradient). Otherwise the applied gradient above is multiplied by
    ``grad_factor`` (converted to the accumulation dtype; the clipping coefficient
    times the inverse loss scale), after it is formed and before anything else, and
    Adam uses ``step_size`` (``lr / (1 - beta1**step)``) and ``bias_correction2_sqrt``
    (``(1 - beta2**step) ** 0.5``) from here instead of computing them from ``step``.
    Without it: no skip, a factor of 1, bias corrections from ``step``."""
    grad_stats: torch.Tensor | None = None
    """None, or a contiguous fp32 tensor of shape ``(len(params), 4)`` on the
    parameters' device, which the step adds its gradient statistics to. Row i, over
    the elements of parameter i, with g its applied gradient (after ``grad_factor``,
    before the maximize sign and weight decay): ``[sum |g|, sum g**2, max |g|, sum
    grad**2]``; column 2 becomes the maximum of its value and max |g| (NaN wins), the
    others are added to; column 3 is the fresh gradient's sum of squares (as given,
    widened to fp32; nothing is added without ``grads``). A skipped step leaves it
    alone. Any order of summation."""


@dataclass(frozen=True, slots=True)
class SgdHyperparams:
    """torch.optim.SGD's hyperparameters of a param group, as Python floats and bools.
    The fields are, in order, the hyperparameter arguments of the ``sgd_step`` op's
    schema: the compiled backend passes ``as_tuple()`` there, and checks the names
    when it loads the ops."""

    lr: float
    """Learning rate: the step is ``-lr`` times the (momentum) direction."""
    momentum: float
    """Momentum factor; 0 for plain SGD (no momentum buffer)."""
    dampening: float
    """Dampening of momentum: the gradient enters the buffer times ``1 - dampening``."""
    weight_decay: float
    """L2 penalty: ``weight_decay * param`` is added to the gradient."""
    nesterov: bool
    """Nesterov momentum: step along ``g + momentum * buffer`` instead of the buffer."""
    maximize: bool
    """Maximise the objective: the gradient is negated first."""

    @classmethod
    def from_group(cls, group: dict) -> SgdHyperparams:
        """The record of a torch.optim param group (``lr`` may be a one-element tensor)."""
        return cls(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
        )

    def as_tuple(self) -> tuple[float, float, float, float, bool, bool]:
        """The fields in order, for the op's positional arguments (``dataclasses.astuple``
        deep-copies: too slow for every update)."""
        return (
            self.lr,
            self.momentum,
            self.dampening,
            self.weight_decay,
            self.nesterov,
            self.maximize,
        )


@dataclass(frozen=True, slots=True)
class AdamHyperparams:
    """torch.optim.Adam/AdamW's hyperparameters of a param group, as Python floats and
    bools. The fields are, in order, the hyperparameter arguments of the ``adam_step``
    op's schema, as for ``SgdHyperparams``."""

    lr: float
    """Learning rate."""
    beta1: float
    """Decay of the first moment (``betas[0]``)."""
    beta2: float
    """Decay of the second moment (``betas[1]``)."""
    eps: float
    """Added to the bias-corrected root of the second moment, for stability."""
    weight_decay: float
    """Weight decay: an L2 penalty on the gradient, or with ``decoupled_weight_decay``
    the parameter shrunk by ``1 - lr * weight_decay``."""
    decoupled_weight_decay: bool
    """AdamW's decoupled weight decay instead of Adam's L2 penalty."""
    amsgrad: bool
    """Normalise by the running maximum of the second moment (``max_exp_avg_sq``)."""
    maximize: bool
    """Maximise the objective: the gradient is negated first."""

    @classmethod
    def from_group(cls, group: dict) -> AdamHyperparams:
        """The record of a torch.optim param group (``lr`` and ``betas`` may be
        one-element tensors)."""
        beta1, beta2 = group["betas"]
        return cls(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )

    def as_tuple(self) -> tuple[float, float, float, float, float, bool, bool, bool]:
        """The fields in order, for the op's positional arguments."""
        return (
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.decoupled_weight_decay,
            self.amsgrad,
            self.maximize,
        )


def stochastic_noise_reference(index: int, seed: int) -> int:
    """The 32-bit hash behind stochastic rounding (murmur3's finaliser of
    index * 0x9E3779B1 + seed, all mod 2**32), in plain Python: the definition every
    backend follows."""
    mask = 0xFFFFFFFF
    h = (index * 0x9E3779B1 + seed) & mask
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


class Backend(Protocol):
    """What every backend provides; the reference backend defines the results."""

    name: str
    # whether the backend checks every operand (dtype, shape, layout, device) itself,
    # before it writes anything: then the optimizer need not check them first
    checks_operands: bool

    def accumulate(
        self,
        buffers: list[torch.Tensor],
        grads: list[torch.Tensor],
        *,
        scale: float,
        overwrite: bool,
        found_inf: torch.Tensor | None = None,
        sum_sq: torch.Tensor | None = None,
    ) -> None: ...

    def sgd_step(
        self,
        batch: StepBatch,
        momentum_buffers: list[torch.Tensor] | None,
        hyper: SgdHyperparams,
        *,
        init_momentum: bool,
    ) -> None: ...

    def adam_step(
        self,
        batch: StepBatch,
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor] | None,
        hyper: AdamHyperparams,
        *,
        step: int,
    ) -> None: ...
