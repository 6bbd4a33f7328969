"""Spec cases shared by the tests of every backend: the same inputs go through the
backend under test and through the reference, on flat storage laid out by FlatGroup,
and every output is compared. Inputs are random (never zeros); the alignment padding
between tensors is poisoned with NaN and must stay untouched."""

from __future__ import annotations

import itertools
import math

import torch

from fused_accum._storage import FlatGroup
from fused_accum.backends.reference import ReferenceBackend
from fused_accum.backends.spec import AdamHyperparams, SgdHyperparams, StepBatch

REFERENCE = ReferenceBackend()

# (atol, rtol) per dtype of an output
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (0.0, 2**-7),  # one ulp
    torch.float16: (1e-5, 2**-10),  # one ulp
}

SGD_FLAGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.25, weight_decay=0.01, nesterov=False, maximize=True),
    dict(momentum=0.8, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=False),
]
ADAM_FLAGS = [
    dict(weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False),
    dict(weight_decay=0.1, decoupled_weight_decay=False, amsgrad=True, maximize=False),
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=True),
    dict(weight_decay=0.05, decoupled_weight_decay=True, amsgrad=True, maximize=False),
]
# (use_buffer, has_grads): step from the buffer, accumulate-and-step, first-and-last
BATCH_KINDS = [(True, False), (True, True), (False, True)]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    atol, rtol = TOLERANCES[expected.dtype]
    assert actual.dtype == expected.dtype, what
    close = torch.isclose(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
    if not bool(close.all()):
        bad = (~close).flatten().nonzero().flatten()
        where = bad[:5].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} of {close.numel()} elements differ, first at {where}: "
            f"{actual.flatten()[where].tolist()} vs {expected.flatten()[where].tolist()}"
        )


class Case:
    """Parameters of one dtype with their flat group, buffers and state filled with
    random values, and a twin for the reference."""

    def __init__(
        self, shapes, param_dtype, device="cpu", state_names=(), master=False, stochastic=False
    ):
        self.params = [torch.randn(shape, device=device).to(param_dtype) for shape in shapes]
        if master:
            state_names = (*state_names, "master_param")
        self.group = FlatGroup(torch.device(device), param_dtype)
        self.group.add(self.params)
        self.group.buffer.fill_(math.nan)  # the padding stays NaN; slices get values
        for name in state_names:
            self.group.state_view(name, 0)
            self.group.states[name].fill_(math.nan)
        for index in range(len(self.params)):
            self.group.buffer_view(index).normal_()
            for name in state_names:
                view = self.group.state_view(name, index)
                view.normal_()
                if "sq" in name:
                    view.abs_()
            if master:  # the parameter is its master, rounded
                self.params[index].copy_(self.group.state_view("master_param", index))
        self.master = master
        self.rounding_seed = 12345 if stochastic else None

    def twin(self) -> Case:
        twin = object.__new__(Case)
        twin.params = [p.clone() for p in self.params]
        twin.group = FlatGroup(self.group.device, self.group.param_dtype)
        twin.group.add(twin.params)
        twin.group.buffer.copy_(self.group.buffer)
        for name, flat in self.group.states.items():
            twin.group.states[name] = flat.clone()
        twin.master = self.master
        twin.grad_stats = None
        twin.rounding_seed = self.rounding_seed
        return twin

    def buffers(self):
        return [self.group.buffer_view(i) for i in range(len(self.params))]

    def states(self, name):
        return [self.group.state_view(name, i) for i in range(len(self.params))]

    def batch(
        self, use_buffer, grads, normaliser=0.25, grad_weight=0.5, scalars=None, grad_stats=None
    ):
        device_scalars = None
        if scalars is not None:
            device_scalars = torch.tensor(scalars, dtype=torch.float64, device=self.group.device)
        return StepBatch(
            params=self.params,
            buffers=self.buffers(),
            grads=grads,
            use_buffer=use_buffer,
            normaliser=normaliser,
            grad_weight=grad_weight,
            masters=self.states("master_param") if self.master else None,
            rounding_seed=self.rounding_seed,
            device_scalars=device_scalars,
            grad_stats=grad_stats,
        )

    def stats(self, wanted: bool) -> torch.Tensor | None:
        """A gradient statistics table for the step, with values already in it (the
        step adds to them), kept to compare; None when not ``wanted``."""
        if not wanted:
            return None
        values = torch.rand(len(self.params), 4, generator=torch.Generator().manual_seed(7))
        self.grad_stats = (values * 0.1).to(self.group.device)
        return self.grad_stats

    def assert_matches(self, reference: Case) -> None:
        for index, (param, expected) in enumerate(zip(self.params, reference.params, strict=True)):
            assert_same(param, expected, f"parameter {index}")
            if self.rounding_seed is not None and param.numel() > 100:
                # the same noise: bit-equal but where fp32 rounding differed (one ulp
                # apart near a boundary); rounding to nearest instead would differ in
                # about half of the elements
                differ = (param != expected).float().mean().item()
                assert differ < 0.01, f"parameter {index}: {differ:.1%} of the elements differ"
        assert_same(self.group.buffer, reference.group.buffer, "flat buffer")
        for name, flat in self.group.states.items():
            assert_same(flat, reference.group.states[name], f"flat {name}")
        expected_stats = getattr(reference, "grad_stats", None)
        if expected_stats is not None:
            torch.testing.assert_close(self.grad_stats, expected_stats, rtol=1e-4, atol=1e-6)


def run_accumulate(backend, shapes, param_dtype, overwrite, device="cpu", sum_sq=False):
    """With ``sum_sq``, the sums of squares of the new buffers and of the gradients are
    asked for too, added to values already there."""
    case = Case(shapes, param_dtype, device)
    reference = case.twin()
    grads = [torch.randn(shape, device=device).to(param_dtype) for shape in shapes]
    found_inf = torch.zeros(1, device=device)
    sums = [torch.full((1,), 2.5, device=device) if sum_sq else None for _ in range(4)]
    backend.accumulate(case.buffers(), grads, scale=0.75, overwrite=overwrite,
                       found_inf=found_inf, sum_sq=sums[0], grad_sum_sq=sums[2])  # fmt: skip
    REFERENCE.accumulate(reference.buffers(), grads, scale=0.75, overwrite=overwrite,
                         sum_sq=sums[1], grad_sum_sq=sums[3])  # fmt: skip
    case.assert_matches(reference)
    assert found_inf.item() == 0.0
    if sum_sq:
        for ours, expected in ((sums[0], sums[1]), (sums[2], sums[3])):
            assert expected.item() > 2.5
            assert math.isclose(ours.item(), expected.item(), rel_tol=1e-5), sums
        assert not math.isclose(sums[0].item(), sums[2].item(), rel_tol=1e-3), "the same sum?"


def run_found_inf(backend, shapes, param_dtype, bad_value, position, device="cpu", overwrite=False):
    """One non-finite element, at the start, middle or end of the largest gradient."""
    case = Case(shapes, param_dtype, device)
    grads = [torch.randn(shape, device=device).to(param_dtype) for shape in shapes]
    largest = max(range(len(grads)), key=lambda i: grads[i].numel())
    flat = grads[largest].view(-1)
    flat[{"first": 0, "middle": flat.numel() // 2, "last": -1}[position]] = bad_value
    found_inf = torch.zeros(1, device=device)
    backend.accumulate(case.buffers(), grads, scale=1.0, overwrite=overwrite, found_inf=found_inf)
    assert found_inf.item() == 1.0


def run_sgd(
    backend,
    shapes,
    param_dtype,
    flags,
    use_buffer,
    has_grads,
    init_momentum,
    device="cpu",
    master=False,
    stochastic=False,
    scalars=None,
    stats=False,
):
    case = Case(
        shapes, param_dtype, device, ("momentum_buffer",), master=master, stochastic=stochastic
    )
    reference = case.twin()
    grads = (
        [torch.randn(shape, device=device).to(param_dtype) for shape in shapes]
        if has_grads
        else None
    )
    for target, implementation in ((case, backend), (reference, REFERENCE)):
        implementation.sgd_step(
            target.batch(use_buffer, grads, scalars=scalars, grad_stats=target.stats(stats)),
            target.states("momentum_buffer") if flags["momentum"] else None,
            SgdHyperparams(lr=0.1, **flags),
            init_momentum=init_momentum,
        )
    case.assert_matches(reference)


def run_adam(
    backend,
    shapes,
    param_dtype,
    flags,
    use_buffer,
    has_grads,
    step,
    device="cpu",
    master=False,
    stochastic=False,
    scalars=None,
    stats=False,
):
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    case = Case(shapes, param_dtype, device, names, master=master, stochastic=stochastic)
    reference = case.twin()
    grads = (
        [torch.randn(shape, device=device).to(param_dtype) for shape in shapes]
        if has_grads
        else None
    )
    for target, implementation in ((case, backend), (reference, REFERENCE)):
        implementation.adam_step(
            target.batch(use_buffer, grads, scalars=scalars, grad_stats=target.stats(stats)),
            target.states("exp_avg"),
            target.states("exp_avg_sq"),
            target.states("max_exp_avg_sq") if flags["amsgrad"] else None,
            AdamHyperparams(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **flags),
            step=step,
        )
    case.assert_matches(reference)


def step_cases():
    """(name, runner kwargs) for every flag set and batch kind."""
    for flags, (use_buffer, has_grads), init in itertools.product(
        SGD_FLAGS, BATCH_KINDS, (False, True)
    ):
        if init and not flags["momentum"]:
            continue
        yield (
            "sgd",
            dict(flags=flags, use_buffer=use_buffer, has_grads=has_grads, init_momentum=init),
        )
    for flags, (use_buffer, has_grads), step in itertools.product(ADAM_FLAGS, BATCH_KINDS, (1, 7)):
        yield "adam", dict(flags=flags, use_buffer=use_buffer, has_grads=has_grads, step=step)
    # fp32 master weights (run only for bf16/fp16 parameters)
    for use_buffer, has_grads in BATCH_KINDS:
        batch = dict(use_buffer=use_buffer, has_grads=has_grads, master=True)
        yield "sgd", dict(flags=SGD_FLAGS[3], init_momentum=False, **batch)
        yield "adam", dict(flags=ADAM_FLAGS[2], step=3, **batch)
    # stochastic rounding (run only for bf16 parameters)
    for use_buffer, has_grads in BATCH_KINDS:
        batch = dict(use_buffer=use_buffer, has_grads=has_grads, stochastic=True)
        yield "sgd", dict(flags=SGD_FLAGS[2], init_momentum=True, **batch)
        yield "adam", dict(flags=ADAM_FLAGS[1], step=5, **batch)
    # scalars decided on the device: a gradient factor (and Adam's bias corrections), or
    # a skip, with NaN for the rest so that a step that writes anything is caught
    for use_buffer, has_grads in BATCH_KINDS:
        batch = dict(use_buffer=use_buffer, has_grads=has_grads)
        yield "sgd", dict(flags=SGD_FLAGS[2], init_momentum=False, scalars=[0, 0.37], **batch)
        yield "sgd", dict(flags=SGD_FLAGS[3], init_momentum=True, scalars=[1, math.nan], **batch)
        scalars = [0, 0.37, 0.0123, 0.71]
        yield "adam", dict(flags=ADAM_FLAGS[2], step=1, scalars=scalars, **batch)
        skip = [1, math.nan, math.nan, math.nan]
        yield "adam", dict(flags=ADAM_FLAGS[3], step=4, scalars=skip, **batch)

    # gradient statistics, with a factor, and skipped
    for use_buffer, has_grads in BATCH_KINDS:
        batch = dict(use_buffer=use_buffer, has_grads=has_grads, stats=True)
        yield "sgd", dict(flags=SGD_FLAGS[2], init_momentum=False, **batch)
        yield "adam", dict(flags=ADAM_FLAGS[2], step=2, scalars=[0, 0.37, 0.0123, 0.71], **batch)
        yield "adam", dict(flags=ADAM_FLAGS[0], step=2, scalars=[1, math.nan, math.nan, 1], **batch)
