"""A window's norms and statistics repeat bit for bit on every backend that runs on
CPU, whatever the number of threads: the same window, run with 1, 2 and again 1
threads, gives the same clipping norm, gradient statistics, micro-step norms and
parameters, to the bit. The compiled CPU kernels sum per fixed-size chunk and add the
chunks in order; the reference and Triton sum in a fixed order too."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW

# Over 64K elements in a call, the CPU kernels run on the thread pool: with 2 threads
# the chunks are split between them. The Triton interpreter is slow: fewer elements.
SHAPES = {"triton": [(1000,), (17, 33), (5,), (0,)]}
LARGE_SHAPES = [(70001,), (300, 301), (5,), (0,)]


@pytest.fixture
def threads():
    """torch.set_num_threads, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _window(backend: str, shapes) -> list[torch.Tensor]:
    """One window of three weighted micro-steps with clipping that bites; everything
    the window computed from sums, as tensors."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=3, max_grad_norm=0.5,
                                track_grad_stats=True, backend=backend)  # fmt: skip
    for micro_step in range(3):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 10 ** (micro_step - 1)
        optimizer.step(weight=1.0 + micro_step)
    stats = [torch.tensor([row["mean_abs"], row["max_abs"], row["norm"]]).double()
             for row in optimizer.grad_stats()]  # fmt: skip
    return [
        optimizer.grad_norm.clone(),
        optimizer.micro_step_grad_norms().clone(),
        optimizer.grad_norm_history().clone(),
        *stats,
        *(param.detach().clone() for param in params),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_window_repeats_bit_for_bit_on_any_thread_count(backend, threads):
    shapes = SHAPES.get(backend, LARGE_SHAPES)
    runs = []
    for count in (1, 2, 1):
        threads(count)
        runs.append(_window(backend, shapes))
    assert runs[0][0].item() > 0.5, "the clipping must bite"
    for run in runs[1:]:
        for index, (first, again) in enumerate(zip(runs[0], run, strict=True)):
            assert torch.equal(first, again), f"value {index}: {first} != {again}"
