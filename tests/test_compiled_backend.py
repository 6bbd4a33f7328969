"""The compiled backends (csrc/) against the reference: every op, dtype and flag on odd
sizes with poisoned padding. CPU kernels run here; CUDA kernels on a CUDA machine.

Without the extension these tests skip, unless FUSED_ACCUM_EXPECT_COMPILED=1 (set by
CI, which builds it), where a missing build fails them."""

from __future__ import annotations

import math
import os
from dataclasses import make_dataclass
from types import SimpleNamespace

import pytest
import torch
from backend_cases import run_accumulate, run_adam, run_found_inf, run_sgd, step_cases

from fused_accum import FusedAccumAdamW, FusedAccumSGD, backends
from fused_accum.backends import compiled, resolve_backend

SHAPES = [(1,), (31, 33), (70001,), (0,)]  # 70001: more than two chunks of 2**15
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def _device_param(name: str):
    reason = compiled.unavailable_reason(torch.device(name))
    if name == "cuda" and not torch.cuda.is_available():
        reason = "needs CUDA"
    elif reason is not None and os.environ.get("FUSED_ACCUM_EXPECT_COMPILED") == "1":
        reason = None  # let the tests fail and show why
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


DEVICES = [_device_param("cpu"), _device_param("cuda")]


def _backend(device):
    return resolve_backend(device, torch.device(device), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "overwrite"])
@pytest.mark.parametrize("sum_sq", [False, True], ids=["", "sum_sq"])
def test_accumulate(device, dtype, overwrite, sum_sq):
    run_accumulate(_backend(device), SHAPES, dtype, overwrite, device, sum_sq=sum_sq)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_found_inf_raised_by_one_element(device, bad_value, position, dtype):
    run_found_inf(_backend(device), SHAPES, dtype, bad_value, position, device)


# Over 64 MB of fp32 buffer in one call: the CPU kernel's first micro-step then writes
# past the cache, a line at a time, with a tail of plain stores (odd sizes).
LARGE_SHAPES = [(8_388_609,), (1, 8_388_607), (3,)]


@pytest.mark.parametrize("device", DEVICES[:1])
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
def test_first_micro_step_past_the_cache(device, dtype):
    run_accumulate(_backend(device), LARGE_SHAPES, dtype, True, device)
    run_accumulate(_backend(device), LARGE_SHAPES, dtype, True, device, sum_sq=True)
    for position in ("first", "middle", "last"):
        run_found_inf(_backend(device), LARGE_SHAPES, dtype, math.nan, position, device, True)


@pytest.mark.parametrize("device", DEVICES[:1])
def test_first_micro_step_into_an_unaligned_buffer(device):
    # the line-at-a-time stores need 64-byte aligned lines: a buffer 4 bytes off (any
    # tensor may be given to the op) takes plain stores instead
    numel = 2**24 + 5
    storage = torch.full((numel + 1,), math.nan, device=device)
    buffer, grad = storage[1:], torch.randn(numel, device=device)
    assert buffer.data_ptr() % 64 != 0
    torch.ops.fused_accum.accumulate([buffer], [grad], 0.5, True, None)
    assert torch.equal(buffer, grad * 0.5)
    assert storage[0].isnan()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "name,kwargs", list(step_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_step(device, dtype, name, kwargs):
    if kwargs.get("master") and dtype not in (torch.bfloat16, torch.float16):
        pytest.skip("master weights are for bf16/fp16 parameters")
    if kwargs.get("stochastic") and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 parameters")
    runner = {"sgd": run_sgd, "adam": run_adam}[name]
    runner(_backend(device), SHAPES, dtype, device=device, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "optimizer_class,kwargs",
    [
        (FusedAccumSGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
        (FusedAccumAdamW, dict(lr=0.01, amsgrad=True, maximize=True)),
    ],
    ids=["sgd", "adamw"],
)
def test_optimizer_with_compiled_kernels_equals_torch_backend(
    device, dtype, optimizer_class, kwargs
):
    """Whole windows through the public API, with a channels_last and a transposed
    parameter, weights and a gradient missing for a while."""
    initial = [
        torch.randn(3, 4, 5, 6, device=device).to(dtype).to(memory_format=torch.channels_last),
        torch.randn(9, 7, device=device).to(dtype).t(),
        torch.randn(1023, device=device).to(dtype),
        torch.randn(0, device=device).to(dtype),
    ]
    runs = {}
    for backend in (device, "torch"):
        params = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in initial]
        optimizer = optimizer_class(params, accumulation_steps=3, backend=backend, **kwargs)
        torch.manual_seed(5)
        for micro_step in range(3 * 4 + 2):
            for index, param in enumerate(params):
                skip = index == 2 and 3 <= micro_step < 7
                param.grad = None if skip else torch.randn_like(param)
            optimizer.step(weight=1 + micro_step % 4)
        optimizer.flush()
        runs[backend] = (params, optimizer)
    (ours, ours_optimizer), (expected, torch_optimizer) = runs[device], runs["torch"]
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (0, 5 * 2**-8)
    for param, reference in zip(ours, expected, strict=True):
        assert param.stride() == reference.stride()
        torch.testing.assert_close(param, reference, atol=atol, rtol=rtol)
        for key, value in torch_optimizer.state[reference].items():
            torch.testing.assert_close(
                ours_optimizer.state[param][key], value, atol=1e-3, rtol=1e-3
            )


@pytest.mark.parametrize("device", DEVICES)
def test_contract_violations_raise_clear_errors(device):
    buffer = torch.zeros(4, device=device)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[5\] but its accumulation"):
        torch.ops.fused_accum.accumulate([buffer], [torch.ones(5, device=device)], 1.0, False, None)
    with pytest.raises(RuntimeError, match=r"buffers\[0\] has dtype Half but Float is the accum"):
        torch.ops.fused_accum.accumulate(
            [buffer.half()], [torch.ones(4, device=device, dtype=torch.half)], 1.0, False, None
        )
    with pytest.raises(RuntimeError, match=r"must be float32, float64, bfloat16 or float16"):
        torch.ops.fused_accum.accumulate(
            [buffer], [torch.ones(4, device=device, dtype=torch.int32)], 1.0, False, None
        )
    with pytest.raises(ValueError, match=r"grads\[0\] has strides \[1, 2\] but its accumulation"):
        torch.ops.fused_accum.accumulate(
            [torch.zeros(2, 2, device=device)],
            [torch.ones(2, 2, device=device).t()],
            1.0,
            False,
            None,
        )
    with pytest.raises(RuntimeError, match=r"master weights are for bfloat16/float16 parameters"):
        torch.ops.fused_accum.sgd_step(
            [torch.ones(4, device=device)], [buffer], None, [], [buffer.clone()], True, 1.0, 1.0,
            0.1, 0.0, 0.0, 0.0, False, False, False, -1,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"sum_sq must be a one-element float32"):
        torch.ops.fused_accum.accumulate(
            [buffer], [torch.ones(4, device=device)], 1.0, False, None, buffer.double()[:1]
        )
    with pytest.raises(RuntimeError, match=r"device_scalars must be 4 contiguous float64 values"):
        torch.ops.fused_accum.adam_step(
            [torch.ones(4, device=device)], [buffer], None, [buffer.clone()], [buffer.clone()], [],
            [], True, 1.0, 1.0, 1, 0.1, 0.9, 0.99, 1e-8, 0.0, False, False, False, -1,
            torch.zeros(2, dtype=torch.float64, device=device),
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"Adam steps count from 1, got 0"):
        torch.ops.fused_accum.adam_step(
            [torch.ones(4, device=device)], [buffer], None, [buffer.clone()], [buffer.clone()], [],
            [], True, 1.0, 1.0, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, False, False, False, -1,
        )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES[:1])
def test_ops_trace_under_torch_compile(device):
    """The ops have fake implementations, so torch.compile traces through them."""
    buffer = torch.zeros(8)
    grad = torch.randn(8)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fold_twice(buffer, grad):
        torch.ops.fused_accum.accumulate([buffer], [grad], 0.5, True, None)
        torch.ops.fused_accum.accumulate([buffer], [grad], 0.25, False, None)

    _backend(device)  # loads the extension and its fakes
    fold_twice(buffer, grad)
    torch.testing.assert_close(buffer, 0.75 * grad)


def _extension_or_skip() -> None:
    """Skip without the extension (its schemas are what these tests check), unless CI
    expects it."""
    error = compiled._load()
    if error is not None and os.environ.get("FUSED_ACCUM_EXPECT_COMPILED") != "1":
        pytest.skip(f"the extension is not built ({error})")


# SgdHyperparams with momentum and dampening in each other's place: to the check, as if
# the ops had been built with them swapped
_SWAPPED_SGD = make_dataclass(
    "SgdHyperparams", ["lr", "dampening", "momentum", "weight_decay", "nesterov", "maximize"]
)


def test_the_ops_take_the_hyperparameters_in_the_records_order():
    _extension_or_skip()
    assert compiled.schema_mismatch(torch.ops.fused_accum) is None
    assert compiled._schema_error is None


def test_a_record_out_of_order_with_the_ops_is_a_clear_error(monkeypatch):
    _extension_or_skip()
    leading, _ = compiled._STEP_ARGUMENTS["sgd_step"]
    monkeypatch.setitem(compiled._STEP_ARGUMENTS, "sgd_step", (leading, _SWAPPED_SGD))
    message = compiled.schema_mismatch(torch.ops.fused_accum)
    assert message == (
        "the compiled kernels do not match this fused_accum (argument 9 of "
        "fused_accum::sgd_step is 'momentum' but the call passes SgdHyperparams.dampening "
        "there; argument 10 of fused_accum::sgd_step is 'dampening' but the call passes "
        "SgdHyperparams.momentum there): they were built from other sources; rebuild them "
        "(reinstall fused_accum, see README.md)"
    )


def test_another_library_of_older_schemas_is_refused():
    """Another library of the ops (the tests give the emulator's) is checked when given:
    here one whose adam_step takes beta2 before beta1."""
    _extension_or_skip()
    ops = torch.ops.fused_accum
    schema = str(ops.adam_step.default._schema)
    stale = schema.replace("float beta1, float beta2", "float beta2, float beta1")
    assert stale != schema
    older = SimpleNamespace(
        sgd_step=ops.sgd_step,
        adam_step=SimpleNamespace(default=SimpleNamespace(_schema=torch._C.parse_schema(stale))),
    )
    with pytest.raises(
        RuntimeError,
        match=r"argument 12 of fused_accum::adam_step is 'beta2' but the call passes "
        r"AdamHyperparams.beta1 there; .* rebuild them",
    ):
        compiled.CompiledBackend("older", ops=older)
    compiled.CompiledBackend("same", ops=ops)  # the same schemas pass


def test_a_mismatch_found_at_load_makes_the_kernels_unavailable(monkeypatch):
    """Found when the extension is loaded: "auto" falls back with a notice that says
    why, an explicit request raises it; the ops are never called with shifted values."""
    _extension_or_skip()
    leading, _ = compiled._STEP_ARGUMENTS["sgd_step"]
    monkeypatch.setitem(compiled._STEP_ARGUMENTS, "sgd_step", (leading, _SWAPPED_SGD))
    monkeypatch.setattr(compiled, "_loaded", False)  # load again (the import is cached)
    monkeypatch.setattr(compiled, "_schema_error", None)
    monkeypatch.setattr(compiled, "_register_fakes", lambda: None)  # registered already
    monkeypatch.setattr(backends, "_noticed", set())
    reason = compiled.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "SgdHyperparams.dampening" in reason
    with pytest.warns(UserWarning, match=r"cpu: the compiled kernels do not match .* reference"):
        assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "torch"
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run .* rebuild them"):
        resolve_backend("cpu", torch.device("cpu"), torch.float32)
