"""Sums over many programs repeat bit for bit: the same accumulate with ``sum_sq`` and
``grad_sum_sq``, and the same steps with gradient statistics, run twice on fresh copies
of identical inputs, give the same totals and rows to the bit (NaN included), and agree
with the reference. Float atomics would add in an order that varies from run to run on
a GPU; under Triton's interpreter the programs run one after another, so there the
repeat cannot fail and the comparison with the reference checks the fixed-order
reduction."""

from __future__ import annotations

import math

import pytest
import torch
from backend_cases import ADAM_FLAGS, REFERENCE, SGD_FLAGS, Case
from helpers import CPU_BACKENDS

from fused_accum.backends import AdamHyperparams, SgdHyperparams, resolve_backend

# Backends whose sums repeat bit for bit, with the devices to check them on; others
# join here as they do. On CPU a backend that cannot run is skipped with the reason
# (the marks of CPU_BACKENDS), unless CI expects it.
REPEATABLE = {"triton": ("cpu", "cuda")}
_CPU_MARKS = {param.values[0]: param.marks for param in CPU_BACKENDS}
_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BACKENDS = [
    pytest.param(
        name,
        device,
        marks=_CPU_MARKS[name] if device == "cpu" else _NEEDS_CUDA,
        id=f"{name}-{device}",
    )
    for name, devices in REPEATABLE.items()
    for device in devices
]
# 1, 3, 8 and 17 programs under the interpreter's block of 128, and an empty tensor
SHAPES = [(1,), (300,), (1000,), (2049,), (0,)]
LARGEST = 3


def _spread(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with magnitudes spread over six decades, so that the order of a sum
    shows in its last bits, and its last element at the top: in the largest tensor it
    is alone in its program, so a sum that missed a tensor's last program would show."""
    scales = 10.0 ** torch.empty(tensor.shape).uniform_(-3, 3)
    tensor.mul_(scales.to(tensor.device))
    if tensor.numel():
        tensor[-1] = 1e3
    return tensor


def _case(device: str, state_names=()) -> tuple[Case, list[torch.Tensor]]:
    """Parameters with spread buffers, and spread gradients for them."""
    case = Case(SHAPES, torch.float32, device, state_names)
    for buffer in case.buffers():
        _spread(buffer)
    return case, [_spread(torch.randn(shape, device=device)) for shape in SHAPES]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The fp32 bits, for torch.equal: NaN equals NaN, 0.0 differs from -0.0."""
    return tensor.view(torch.int32)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_accumulate_sums_repeat_bit_for_bit(name, device):
    backend = resolve_backend(name, torch.device(device), torch.float32)
    case, grads = _case(device)
    totals = []
    for implementation in (backend, backend, REFERENCE):
        run = case.twin()
        sum_sq, grad_sum_sq = (torch.full((1,), 2.5, device=device) for _ in range(2))
        implementation.accumulate(
            run.buffers(), [g.clone() for g in grads], scale=0.75, overwrite=False,
            sum_sq=sum_sq, grad_sum_sq=grad_sum_sq,
        )  # fmt: skip
        totals.append(torch.cat([sum_sq, grad_sum_sq]))
    first, second, expected = totals
    assert torch.equal(_bits(first), _bits(second)), (first, second)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=0)


def _sgd(implementation, run: Case, batch) -> None:
    hyper = SgdHyperparams(lr=0.1, **SGD_FLAGS[1])
    implementation.sgd_step(batch, run.states("momentum_buffer"), hyper, init_momentum=False)


def _adam(implementation, run: Case, batch) -> None:
    implementation.adam_step(
        batch, run.states("exp_avg"), run.states("exp_avg_sq"), None,
        AdamHyperparams(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **ADAM_FLAGS[2]), step=3,
    )  # fmt: skip


# (the step, its state, device scalars: none for SGD, a factor and bias corrections
# for Adam)
STEPS = {
    "sgd": (_sgd, ("momentum_buffer",), None),
    "adam": (_adam, ("exp_avg", "exp_avg_sq"), [0, 0.37, 0.0123, 0.71]),
}


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("has_grads", [True, False], ids=["fresh_grads", "buffer_only"])
@pytest.mark.parametrize("nan", [False, True], ids=["", "nan"])
def test_grad_stats_repeat_bit_for_bit(name, device, step, has_grads, nan):
    """With ``nan``, one element of the largest tensor's applied gradient, in a middle
    program, is NaN: its row's sums and maximum are NaN, the same NaN each run."""
    backend = resolve_backend(name, torch.device(device), torch.float32)
    run_step, state_names, scalars = STEPS[step]
    case, grads = _case(device, state_names)
    if nan:
        case.buffers()[LARGEST][1000] = math.nan
    rows = []
    for implementation in (backend, backend, REFERENCE):
        run = case.twin()
        run.stats(True)  # the same values already in the table each time
        batch = run.batch(
            True, [g.clone() for g in grads] if has_grads else None,
            scalars=scalars, grad_stats=run.grad_stats,
        )  # fmt: skip
        run_step(implementation, run, batch)
        rows.append(run.grad_stats)
    first, second, expected = rows
    assert torch.equal(_bits(first), _bits(second)), (first, second)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=0, equal_nan=True)
    assert math.isnan(first[LARGEST, 2]) == nan
    assert torch.equal(_bits(first[-1]), _bits(expected[-1]))  # the empty tensor's row
