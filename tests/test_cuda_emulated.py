"""The CUDA kernels (csrc/cuda) run under the tests' emulator of the CUDA execution
model (tests/cuda_emulator) and are held against the reference backend: every op,
dtype and flag on odd sizes and tails, operands not 16-byte aligned, more tensors and
more chunks than one launch holds, zero-size tensors, skip flags and statistics; and
sums that repeat bit for bit whatever order the blocks run in.

The emulator runs every CUDA thread as a fiber, warp by warp, with fresh NaN-filled
shared memory per block: its own test shows that it catches a missing barrier."""

from __future__ import annotations

import math

import pytest
import torch
from backend_cases import (
    REFERENCE,
    assert_same,
    run_accumulate,
    run_adam,
    run_found_inf,
    run_sgd,
    step_cases,
)
from cuda_emulation import emulated_backend, emulated_ops

from fused_accum.backends.spec import AdamHyperparams, SgdHyperparams, StepBatch

CHUNK = 65536  # elements per block (csrc/cuda/multi_tensor.cuh)
MAX_BLOCKS = 320  # blocks per launch
# 70001: a whole chunk and a tail of 4465 elements, not a multiple of the 4 (or 2)
# elements a thread takes at once; 31 x 33 = 1023: one partial chunk
SHAPES = [(1,), (31, 33), (70001,), (0,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


@pytest.fixture
def order():
    """Blocks and warps in the order given, then back to the default (forward)."""
    ops = emulated_ops()
    yield ops.set_order
    ops.set_order("forward")


def test_the_emulator_shows_a_missing_barrier(order):
    """A block reduction without __syncthreads() between the warps' writes to shared
    memory and warp 0's reads of them: warp 0 runs first and reads unwritten (NaN)
    slots. With the barrier the sum is right; reversed, the warps happen to hide it."""
    ops = emulated_ops()
    values = torch.rand(512)
    total = ops.block_sum(values, True).item()
    assert math.isclose(total, values.double().sum().item(), rel_tol=1e-6)
    assert math.isnan(ops.block_sum(values, False).item())
    order("reverse")
    assert ops.block_sum(values, True).item() == total


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "overwrite"])
@pytest.mark.parametrize("sum_sq", [False, True], ids=["", "sum_sq"])
def test_accumulate(dtype, overwrite, sum_sq):
    run_accumulate(emulated_backend(), SHAPES, dtype, overwrite, sum_sq=sum_sq)


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_found_inf_raised_by_one_element(position, dtype):
    run_found_inf(emulated_backend(), SHAPES, dtype, math.inf, position)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "name,kwargs", list(step_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_step(dtype, name, kwargs):
    if kwargs.get("master") and dtype not in (torch.bfloat16, torch.float16):
        pytest.skip("master weights are for bf16/fp16 parameters")
    if kwargs.get("stochastic") and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 parameters")
    runner = {"sgd": run_sgd, "adam": run_adam}[name]
    runner(emulated_backend(), SHAPES, dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steps_with_the_blocks_and_warps_reversed(order, dtype):
    order("reverse")
    for name, kwargs in step_cases():
        if kwargs.get("stats") or kwargs.get("scalars"):
            runner = {"sgd": run_sgd, "adam": run_adam}[name]
            runner(emulated_backend(), SHAPES, dtype, **kwargs)
    run_accumulate(emulated_backend(), SHAPES, dtype, False, sum_sq=True)


# every remainder modulo the 4 (fp32 and 16-bit) or 2 (fp64) elements of a group, alone
# and after a whole chunk
TAILS = [(n,) for n in range(1, 10)] + [(CHUNK - 1,), (CHUNK + 2,), (CHUNK + 3,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_tail(dtype):
    backend = emulated_backend()
    run_accumulate(backend, TAILS, dtype, False, sum_sq=True)
    run_adam(backend, TAILS, dtype, dict(weight_decay=0.1, decoupled_weight_decay=True,
             amsgrad=True, maximize=False), True, True, 2, stats=True)  # fmt: skip


def _many_shapes(count: int) -> list[tuple[int, ...]]:
    sizes = torch.randint(1, 300, (count,), generator=torch.Generator().manual_seed(3))
    return [(int(size),) for size in sizes] + [(0,), (5,)]


def test_more_tensors_than_one_launch_holds():
    """80 tensors per launch for accumulate, 40 for SGD, 32 for Adam: 102 tensors take
    several launches, each with its own table and its partial sums."""
    backend = emulated_backend()
    shapes = _many_shapes(100)
    run_accumulate(backend, shapes, torch.bfloat16, False, sum_sq=True)
    run_sgd(backend, shapes, torch.float32, dict(momentum=0.9, dampening=0.0, weight_decay=0.01,
            nesterov=False, maximize=False), True, True, False, stats=True)  # fmt: skip
    run_adam(backend, shapes, torch.bfloat16, dict(weight_decay=0.1, decoupled_weight_decay=True,
             amsgrad=True, maximize=False), True, False, 3, master=True, stats=True)  # fmt: skip


def test_more_chunks_than_one_launch_holds():
    """A tensor of 321 chunks and a tail: two launches of the same tensor, whose sums
    and statistics row add up across them."""
    backend = emulated_backend()
    shapes = [(3,), (MAX_BLOCKS * CHUNK + CHUNK + 7,), (1,)]
    run_accumulate(backend, shapes, torch.float32, False, sum_sq=True)
    run_sgd(backend, shapes, torch.float32, dict(momentum=0.0, dampening=0.0, weight_decay=0.0,
            nesterov=False, maximize=True), True, False, False, stats=True)  # fmt: skip


def _unaligned(shape, dtype, fill=None):
    """A tensor one element into its storage: no operand access can be 16-byte wide."""
    numel = math.prod(shape)
    storage = torch.randn(numel + 1).to(dtype)
    if fill is not None:
        storage.fill_(fill)
    return storage[1:].view(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_operands_not_16_byte_aligned(dtype):
    """Every operand one element off: the element-by-element path, checked against the
    reference (the emulator faults a vector access at a misaligned address)."""
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(4466,), (3, 7)]
    ours = [_unaligned(shape, accumulation) for shape in shapes]
    expected = [buffer.clone() for buffer in ours]
    grads = [_unaligned(shape, dtype) for shape in shapes]
    sums = [torch.zeros(1) for _ in range(4)]
    emulated_backend().accumulate(ours, grads, scale=0.5, overwrite=False, sum_sq=sums[0],
                                  grad_sum_sq=sums[1])  # fmt: skip
    REFERENCE.accumulate(expected, grads, scale=0.5, overwrite=False, sum_sq=sums[2],
                         grad_sum_sq=sums[3])  # fmt: skip
    for index, (buffer, reference) in enumerate(zip(ours, expected, strict=True)):
        assert_same(buffer, reference, f"buffer {index}")
    torch.testing.assert_close(sums[:2], sums[2:], rtol=1e-5, atol=0)

    outputs = {}
    for backend in (emulated_backend(), REFERENCE):
        torch.manual_seed(11)
        params = [_unaligned(shape, dtype) for shape in shapes]
        states = [[_unaligned(shape, accumulation).abs() for shape in shapes] for _ in range(3)]
        stats = torch.zeros(len(shapes), 4)
        batch = StepBatch(params=params, buffers=expected, grads=grads, use_buffer=True,
                          normaliser=0.25, grad_weight=0.5, grad_stats=stats)  # fmt: skip
        hyper = AdamHyperparams(
            lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True, amsgrad=True, maximize=False,
        )  # fmt: skip
        backend.adam_step(batch, *states, hyper, step=2)
        outputs[backend.name] = (params, states, stats)
    (params, states, stats), (ref_params, ref_states, ref_stats) = outputs.values()
    for index, (param, reference) in enumerate(zip(params, ref_params, strict=True)):
        assert_same(param, reference, f"parameter {index}")
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, state, reference in zip(names, states, ref_states, strict=True):
        for index in range(len(shapes)):
            assert_same(state[index], reference[index], f"{name} {index}")
    torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-6)


def test_sums_repeat_whatever_order_the_blocks_run_in(order):
    """Each block writes its partial sums; a last kernel adds them in block order. So
    the sum of squares and the statistics are the same bits when the blocks (and warps)
    run in the other order, where float atomics would add them differently."""
    shapes = [(3 * CHUNK + 5,), (2 * CHUNK,), (17,)]
    grads = [torch.randn(shape) * 1e3 for shape in shapes]
    results = []
    for direction in ("forward", "reverse"):
        order(direction)
        buffers = [torch.ones(shape) for shape in shapes]
        sums = [torch.zeros(1), torch.zeros(1)]
        emulated_backend().accumulate(buffers, grads, scale=0.3, overwrite=False,
                                      sum_sq=sums[0], grad_sum_sq=sums[1])  # fmt: skip
        params = [
            torch.randn(shape, generator=torch.Generator().manual_seed(1)) for shape in shapes
        ]
        stats = torch.zeros(len(shapes), 4)
        batch = StepBatch(params=params, buffers=buffers, grads=grads, use_buffer=True,
                          normaliser=0.5, grad_weight=0.3, grad_stats=stats)  # fmt: skip
        hyper = SgdHyperparams(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                               nesterov=False, maximize=False)  # fmt: skip
        emulated_backend().sgd_step(batch, None, hyper, init_momentum=False)
        results.append([*sums, stats, *params])
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)
