"""The Triton backend against the reference: every kernel, dtype and flag on odd sizes,
under the Triton interpreter on CPU (CI) and compiled on a CUDA machine."""

from __future__ import annotations

import math
import os

import pytest
import torch
from backend_cases import (
    ADAM_FLAGS,
    BATCH_KINDS,
    REFERENCE,
    SGD_FLAGS,
    Case,
    run_accumulate,
    run_adam,
    run_found_inf,
    run_sgd,
    step_cases,
)

from fused_accum import FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD
from fused_accum.backends.spec import SgdHyperparams
from fused_accum.backends.triton_backend import unavailable_reason
from fused_accum.backends.triton_tables import interpreter_active

# On CPU: under the interpreter, through the address tables a GPU uses; where that
# cannot run, skipped with the reason, unless CI expects it (then the tests fail).
_CPU_PROBLEM = (
    None
    if os.environ.get("FUSED_ACCUM_EXPECT_TRITON") == "1"
    else unavailable_reason(torch.device("cpu"), torch.float32)
)
DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(_CPU_PROBLEM is not None, reason=str(_CPU_PROBLEM))
    ),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]
SHAPES = [(1,), (31, 33), (4099,), (0,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # fp64 goes to other backends
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture
def backend():
    from fused_accum.backends import resolve_backend

    return resolve_backend(
        "triton", torch.device("cpu" if interpreter_active() else "cuda"), torch.float32
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "overwrite"])
@pytest.mark.parametrize("sum_sq", [False, True], ids=["", "sum_sq"])
def test_accumulate(backend, device, dtype, overwrite, sum_sq):
    run_accumulate(backend, SHAPES, dtype, overwrite, device, sum_sq=sum_sq)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_large_odd_tensor(backend, device):
    run_accumulate(backend, [(278011,), (3,)], torch.bfloat16, False, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS[:3])
def test_found_inf_raised_by_one_element(backend, device, bad_value, position, dtype):
    run_found_inf(backend, SHAPES, dtype, bad_value, position, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "name,kwargs", list(step_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_step(backend, device, dtype, name, kwargs):
    if kwargs.get("master") and dtype not in (torch.bfloat16, torch.float16):
        pytest.skip("master weights are for bf16/fp16 parameters")
    if kwargs.get("stochastic") and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 parameters")
    runner = {"sgd": run_sgd, "adam": run_adam}[name]
    runner(backend, SHAPES, dtype, device=device, **kwargs)


def test_cases_cover_every_flag():
    cases = list(step_cases())
    assert (
        len(cases)
        == len(SGD_FLAGS) * len(BATCH_KINDS)
        + 3 * len(BATCH_KINDS)
        + len(ADAM_FLAGS) * len(BATCH_KINDS) * 2
        + 2 * len(BATCH_KINDS)  # master weights
        + 2 * len(BATCH_KINDS)  # stochastic rounding
        + 4 * len(BATCH_KINDS)  # device scalars
        + 3 * len(BATCH_KINDS)  # gradient statistics
    )
    assert {name for name, kwargs in cases if kwargs.get("master")} == {"sgd", "adam"}
    for skip in (0, 1):  # device scalars that apply a factor, and that skip the step
        with_skip = {name for name, kwargs in cases if (kwargs.get("scalars") or [-1])[0] == skip}
        assert with_skip == {"sgd", "adam"}, skip
    stats = [(name, kwargs) for name, kwargs in cases if kwargs.get("stats")]
    assert {name for name, _ in stats} == {"sgd", "adam"}
    assert {(name, (kwargs.get("scalars") or [0])[0]) for name, kwargs in stats} >= {
        ("sgd", 0),
        ("adam", 0),
        ("adam", 1),  # with a skipped step among them
    }
    for use_buffer, has_grads in BATCH_KINDS:  # with and without fresh gradients
        assert any(
            (kwargs["use_buffer"], kwargs["has_grads"]) == (use_buffer, has_grads)
            for _, kwargs in stats
        )
    for key in ("momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert any(kwargs["flags"][key] for name, kwargs in cases if name == "sgd"), key
    for key in ("weight_decay", "decoupled_weight_decay", "amsgrad", "maximize"):
        assert any(kwargs["flags"][key] for name, kwargs in cases if name == "adam"), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [False, True], ids=["", "skipped"])
def test_grad_stats_maximum_lets_nan_win(backend, device, skip):
    """Column 2 is a running maximum of |g| in which NaN wins, also from a tensor's
    masked last block and over a value already there; -inf counts as inf; a
    skipped step leaves every row alone, bit for bit (a -0.0 there would turn into
    0.0 if zeros were added), NaN gradient or not."""
    shapes = [(130,), (5,), (300,), (7,), (129,)]
    case = Case(shapes, torch.float32, device, ("momentum_buffer",))
    reference = case.twin()
    grads = [torch.randn(shape, device=device) for shape in shapes]
    grads[0][-1] = math.nan  # the last element, in the masked block
    grads[1][2] = -math.inf
    grads[4][-1] = -1e3  # the largest magnitude, in the masked block
    initial = torch.full((len(shapes), 4), 0.5, device=device)
    initial[2, 2] = 1e30  # larger than any |g|: kept
    initial[3, 2] = math.nan  # kept
    initial[4] = -0.0
    scalars = [1 if skip else 0, 0.37]
    for target, implementation in ((case, backend), (reference, REFERENCE)):
        target.grad_stats = initial.clone()
        implementation.sgd_step(
            target.batch(True, grads, scalars=scalars, grad_stats=target.grad_stats),
            None, SgdHyperparams(lr=0.1, **SGD_FLAGS[0]), init_momentum=False,
        )  # fmt: skip
    ours, expected = case.grad_stats, reference.grad_stats
    reference.grad_stats = None  # compared here, NaN included
    case.assert_matches(reference)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6, equal_nan=True)
    if skip:
        assert torch.equal(ours.view(torch.int32), initial.view(torch.int32))
    else:
        assert math.isnan(ours[0, 2]) and math.isinf(ours[1, 2])
        assert ours[2, 2] == 1e30 and math.isnan(ours[3, 2])
        # (buffer + grad_weight 0.5 * grad) * normaliser 0.25, times the factor 0.37
        assert ours[4, 2] == pytest.approx(0.37 * 0.25 * 0.5 * 1e3, abs=1)


OPTIMIZERS = [
    (FusedAccumSGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    (FusedAccumSGD, dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True)),
    (FusedAccumAdam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (FusedAccumAdamW, dict(lr=0.01, maximize=True)),
    (FusedAccumSGD, dict(lr=0.05, momentum=0.9, master_weights=True)),
    (FusedAccumAdamW, dict(lr=0.01, master_weights=True)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "optimizer_class,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", "")
)
def test_optimizer_with_triton_equals_torch_backend(device, dtype, optimizer_class, kwargs):
    """Whole windows through the public API: weights, a parameter missing its gradient
    for a while, the accumulate-and-step boundary and a partial window at the end."""
    initial = [torch.randn(shape, device=device).to(dtype) for shape in SHAPES]
    runs = {}
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        optimizer = optimizer_class(params, accumulation_steps=3, backend=backend, **kwargs)
        torch.manual_seed(5)
        for micro_step in range(3 * 4 + 2):
            for index, param in enumerate(params):
                skip = index == 1 and 3 <= micro_step < 7
                param.grad = None if skip else torch.randn_like(param)
            optimizer.step(weight=1 + micro_step % 4)
        optimizer.flush()
        runs[backend] = (params, optimizer)
    (triton_params, triton_optimizer), (torch_params, torch_optimizer) = (
        runs["triton"],
        runs["torch"],
    )
    # the low-precision parameters can take one ulp flip per update
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (0, 5 * 2**-8)
    for param, expected in zip(triton_params, torch_params, strict=True):
        torch.testing.assert_close(param, expected, atol=atol, rtol=rtol)
        for key, value in torch_optimizer.state[expected].items():
            torch.testing.assert_close(
                triton_optimizer.state[param][key],
                value,
                atol=1e-3 if dtype != torch.float32 else 1e-6,
                rtol=1e-3,
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "optimizer_class", [FusedAccumSGD, FusedAccumAdamW], ids=lambda c: c.__name__
)
def test_one_launch_per_group_and_operation(backend, device, optimizer_class):
    """A model of 40 parameters in two param groups and two dtypes: each micro-step is
    one accumulate launch per (device, dtype); each update one step launch per
    (param group, device, dtype)."""
    layers = [torch.nn.Linear(7, 7) for _ in range(20)]
    params = [p for layer in layers for p in layer.parameters()]
    for param in params[20:30]:
        param.data = param.data.bfloat16()
    params = [p.to(device).detach().requires_grad_() for p in params]
    groups = [{"params": params[:25]}, {"params": params[25:], "weight_decay": 0.0}]
    optimizer = optimizer_class(groups, lr=0.01, accumulation_steps=4, backend="triton")
    launches = []
    for _ in range(8):
        for param in params:
            param.grad = torch.randn_like(param)
        before = backend.launches
        optimizer.step()
        launches.append(backend.launches - before)
    # groups: (0, fp32), (0, bf16), (1, bf16), (1, fp32); flat groups: fp32, bf16; a
    # window's first fp32 gradients are adopted as buffers, with no launch at all
    assert launches == [1, 2, 2, 4, 1, 2, 2, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_in_backward_one_tensor_per_launch(device):
    """Backward hooks fold one gradient at a time: the tensor is its own base."""
    torch.manual_seed(2)
    models = [torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2))]
    models.append(
        torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2))
    )
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        FusedAccumAdamW(model.to(device).parameters(), lr=0.01, accumulation_steps=2,
                        accumulate_in_backward=True, backend=backend)
        for model, backend in zip(models, ("triton", "torch"), strict=True)
    ]  # fmt: skip
    for _ in range(6):
        batch = torch.randn(4, 9, device=device)
        for model, optimizer in zip(models, optimizers, strict=True):
            model(batch).square().mean().backward()
            optimizer.step()
    for param, expected in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_parameter_view_is_updated_in_place(device):
    """A parameter that is a view at an odd offset of a larger tensor is copied to an
    aligned temporary for the kernel and written back into its storage."""
    storage = torch.randn(40, device=device)
    param = torch.nn.Parameter(storage[3:24])
    expected = torch.nn.Parameter(storage[3:24].clone())
    triton_optimizer = FusedAccumSGD([param], lr=0.1, momentum=0.9, backend="triton")
    torch_optimizer = FusedAccumSGD([expected], lr=0.1, momentum=0.9, backend="torch")
    for _ in range(3):
        grad = torch.randn(21, device=device)
        param.grad, expected.grad = grad.clone(), grad.clone()
        triton_optimizer.step()
        torch_optimizer.step()
    torch.testing.assert_close(param, expected)
    assert param.data_ptr() == storage[3:].data_ptr()
    torch.testing.assert_close(storage[3:24], expected.detach())


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current device: a launch for tensors on cuda:1 must make
    cuda:1 current around it (and with it its current stream), whatever device is
    current. Checked without a GPU by recording the guard the launch takes."""
    from types import SimpleNamespace

    from fused_accum.backends import triton_backend

    guards, launched_under = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            guards.append(self.device)

        def __exit__(self, *exc):
            guards.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched_under.append(list(guards))

    monkeypatch.setattr(triton_backend.torch.cuda, "device", Guard)
    backend = object.__new__(triton_backend.TritonBackend)
    backend.launches = 0
    layout = SimpleNamespace(num_blocks=3, block=128)
    layout.numels = SimpleNamespace(device=torch.device("cuda", 1))
    backend._launch(Kernel(), layout)
    assert launched_under == [[torch.device("cuda", 1)]]
    layout.numels = SimpleNamespace(device=torch.device("cpu"))
    backend._launch(Kernel(), layout)
    assert launched_under[1] == []  # CPU tensors (the interpreter): no CUDA guard
