"""The state machine of the property-based test (test_api_fuzz.py): random programs
over the public API of the fused_accum optimizers, checked after every operation
against api_oracle.ApiOracle, an independent fp64 model built on torch.optim.

A program draws an optimizer and its options, then runs micro-steps (weighted, with
missing gradients, through autograd or by assigning ``.grad``, with
``accumulate_in_backward`` or without), flushes, discards, mid-window saves and loads
into a fresh optimizer, freezing, lr and ``accumulation_steps`` changes, new param
groups, injected non-finite values (with loss scaling) and bad input."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import weakref
from collections import Counter

import pytest
import torch
from api_oracle import ApiOracle
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fused_accum
from fused_accum import LossScaling

OPTIMIZERS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    ("sgd", dict(lr=0.1, momentum=0.8, nesterov=True, maximize=True)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, weight_decay=0.05, amsgrad=True)),
    ("adamw", dict(lr=0.01, weight_decay=0.1)),
    ("adamw", dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, maximize=True)),
]
CLASSES = {
    "sgd": fused_accum.FusedAccumSGD,
    "adam": fused_accum.FusedAccumAdam,
    "adamw": fused_accum.FusedAccumAdamW,
}
SHAPES = [(3,), (2, 5), (7,), (1,), (4, 3)]
WEIGHTS = [1.0, 2.0, 0.5, 3.0, 0.75, 5.0]
EXACT_WEIGHTS = [1.0, 2.0, 0.5, 4.0]  # powers of two: w * g is exact in fp32
LOSS_SCALING = LossScaling(init_scale=2.0**8, growth_interval=3)

# fp32 values against the fp64 oracle. The test prints the largest error it saw as a
# fraction of this: about 0.02 (fp32 rounding) on every backend; each defect it has
# found was many times this tolerance.
ATOL, RTOL = 2e-5, 2e-5

# What the programs did, per backend, and the largest error of a compared value
# (parameter, .grad, state) as a fraction of its tolerance: printed by the test, read
# with pytest -s.
COUNTS: dict[str, Counter] = {}
WORST_ERROR: dict[str, float] = {}


class ApiMachine(RuleBasedStateMachine):
    backend = "torch"

    # ------------------------------------------------------------------ set-up

    @initialize(
        optimizer=st.sampled_from(OPTIMIZERS),
        accumulation_steps=st.integers(1, 4),
        accumulate_in_backward=st.booleans(),
        loss_scaling=st.booleans(),
        max_grad_norm=st.sampled_from([None, None, 0.5, 4.0]),
        shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
        zero_size_last=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def start(
        self,
        optimizer,
        accumulation_steps,
        accumulate_in_backward,
        loss_scaling,
        max_grad_norm,
        shapes,
        zero_size_last,
        seed,
    ):
        self.counts = COUNTS.setdefault(self.backend, Counter())
        self.counts["programs"] += 1
        self.generator = torch.Generator().manual_seed(seed)
        self.name, self.hyperparameters = optimizer
        self.options = dict(
            accumulation_steps=accumulation_steps,
            accumulate_in_backward=accumulate_in_backward,
            loss_scaling=LOSS_SCALING if loss_scaling else False,
            max_grad_norm=max_grad_norm,
            backend=self.backend,
        )
        if zero_size_last:
            shapes = [*shapes, (0,)]
        self.params = [torch.nn.Parameter(self._random(shape)) for shape in shapes]
        self.optimizer = self._new_optimizer([{"params": list(self.params)}])
        self.oracle = ApiOracle(
            self.name,
            self.hyperparameters,
            self.params,
            accumulation_steps=accumulation_steps,
            accumulate_in_backward=accumulate_in_backward,
            max_grad_norm=max_grad_norm,
            loss_scaling=LOSS_SCALING if loss_scaling else None,
        )

    def _new_optimizer(self, groups):
        return CLASSES[self.name](groups, **self.hyperparameters, **self.options)

    def _random(self, shape):
        return torch.randn(shape, generator=self.generator)

    @property
    def hooks(self) -> bool:
        return self.options["accumulate_in_backward"]

    @property
    def loss_scaled(self) -> bool:
        return self.options["loss_scaling"] is not False

    def _trainable(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.requires_grad]

    def _gradients(self, mask: int, nonfinite: int | None = None) -> dict[int, torch.Tensor]:
        """Fresh random gradients for the trainable parameters picked by the bits of
        ``mask``, times the loss scale (as backward of a scaled loss gives them);
        ``nonfinite`` puts an inf or a NaN into one of them."""
        picked = [i for n, i in enumerate(self._trainable()) if mask >> n & 1]
        grads = {i: self._random(self.params[i].shape) * self.oracle.scale for i in picked}
        if nonfinite is not None:
            sized = [i for i in picked if grads[i].numel()]
            if sized:
                i = sized[nonfinite % len(sized)]
                grads[i].view(-1)[nonfinite % grads[i].numel()] = (math.inf, math.nan)[
                    nonfinite % 2
                ]
        return grads

    def _backward(self, grads: dict[int, torch.Tensor]) -> None:
        """One backward whose gradient for parameter i is grads[i] exactly: the loss is
        sum((p * g / scale).sum()), scaled by the optimizer when it scales the loss."""
        if not grads:
            return
        scale = self.oracle.scale
        loss = sum((self.params[i] * (g / scale)).sum() for i, g in grads.items())
        if self.loss_scaled:
            loss = self.optimizer.scale_loss(loss)
        loss.backward()

    def _unchanged(self, action, error, match):
        """``action`` must raise ``error`` (matching ``match``); the oracle is left
        alone, so the invariants then check that nothing changed."""
        with pytest.raises(error, match=match):
            action()
        self.counts["refusals"] += 1

    # --------------------------------------------------------------- gradients

    @precondition(lambda self: not self.oracle.incomplete_micro_batch)
    @rule(
        mask=st.integers(0, 15),
        nonfinite=st.one_of(st.none(), st.integers(0, 100)),
    )
    def backward(self, mask, nonfinite):
        grads = self._gradients(mask, nonfinite if self.loss_scaled else None)
        self._backward(grads)
        self.oracle.backward(grads)
        self.counts["backwards"] += 1

    @rule(mask=st.integers(0, 15), nonfinite=st.one_of(st.none(), st.integers(0, 100)))
    def assign_grads(self, mask, nonfinite):
        grads = self._gradients(mask, nonfinite if self.loss_scaled else None)
        for i, grad in grads.items():
            self.params[i].grad = grad.clone()
            self.oracle.set_grad(i, grad)

    @rule()
    def zero_grad(self):
        self.optimizer.zero_grad()
        self.oracle.zero_grad()

    @rule(index=st.integers(0, 7))
    def toggle_trainable(self, index):
        param = self.params[index % len(self.params)]
        param.requires_grad_(not param.requires_grad)

    # ------------------------------------------------------------ micro-steps

    @rule(weight=st.sampled_from(WEIGHTS))
    def set_weight(self, weight):
        if self.hooks and self.oracle.folded_in_backward and weight != self.oracle.pending_weight:
            self._unchanged(
                lambda: self.optimizer.set_weight(weight), RuntimeError, "before its backward"
            )
            return
        self.optimizer.set_weight(weight)
        self.oracle.pending_weight = weight

    @rule(weight=st.one_of(st.none(), st.sampled_from(WEIGHTS)), as_tensor=st.booleans())
    def step(self, weight, as_tensor):
        if self.oracle.incomplete_micro_batch:
            self._unchanged(self.optimizer.step, RuntimeError, "discard_window")
            return
        if weight is not None and self.hooks:
            self._unchanged(lambda: self.optimizer.step(weight=weight), ValueError, "set_weight")
            return
        given = torch.tensor(weight) if as_tensor and weight is not None else weight
        self.optimizer.step(weight=given)
        self.oracle.step(weight, [p.requires_grad for p in self.params])
        self.counts["micro-steps"] += 1
        self.counts["updates"] += self.oracle.last_step_applied

    @precondition(lambda self: not self.oracle.incomplete_micro_batch)
    @rule(mask=st.integers(0, 15), weight=st.sampled_from(WEIGHTS))
    def micro_batch(self, mask, weight):
        """The common case of training: a micro-batch's weight, its backward, step()."""
        if self.hooks:
            self.set_weight(weight)
            self.backward(mask, None)
            self.step(None, False)
        else:
            self.backward(mask, None)
            self.step(weight, False)

    @precondition(
        lambda self: (
            self.oracle.window_micro_steps == 0
            and not self.oracle.folded_in_backward
            and not self.oracle.incomplete_micro_batch
            and all(g is None for g in self.oracle.grads)
        )
    )
    @rule(mask=st.integers(1, 15), weight=st.sampled_from(EXACT_WEIGHTS))
    def cancelling_window(self, mask, weight):
        """Two micro-steps whose weighted gradients cancel exactly: (w, g), then
        (2w, -g/2). The window's mean is exactly zero."""
        grads = self._gradients(mask)
        for scale, this_weight in ((1.0, weight), (-0.5, 2 * weight)):
            given = {i: g * scale for i, g in grads.items()}
            if self.hooks:
                self.set_weight(this_weight)
                self._backward(given)
                self.oracle.backward(given)
                self.step(None, False)
            else:
                for i, grad in given.items():
                    self.params[i].grad = grad.clone()
                    self.oracle.set_grad(i, grad)
                self.step(this_weight, False)
        self.counts["cancelling windows"] += 1

    @rule()
    def flush(self):
        if self.oracle.incomplete_micro_batch:
            self._unchanged(self.optimizer.flush, RuntimeError, "discard_window")
            return
        if self.oracle.folded_in_backward:
            self._unchanged(self.optimizer.flush, RuntimeError, "call step")
            return
        assert self.optimizer.flush() == self.oracle.flush()
        self.counts["flushes"] += 1

    @rule()
    def discard_window(self):
        self.optimizer.discard_window()
        self.oracle.discard_window()

    # --------------------------------------------------------------- settings

    @rule(group=st.integers(0, 3), lr=st.sampled_from([0.0, 0.003, 0.05, 0.2]))
    def set_lr(self, group, lr):
        index = group % len(self.optimizer.param_groups)
        self.optimizer.param_groups[index]["lr"] = lr
        self.oracle.torch_optimizer.param_groups[index]["lr"] = lr

    @rule(steps=st.integers(1, 4))
    def set_accumulation_steps(self, steps):
        self.optimizer.accumulation_steps = steps
        self.oracle.accumulation_steps = steps

    @precondition(lambda self: len(self.optimizer.param_groups) < 3)
    @rule(shape=st.sampled_from(SHAPES), lr=st.sampled_from([0.003, 0.05]))
    def add_param_group(self, shape, lr):
        param = torch.nn.Parameter(self._random(shape))
        self.params.append(param)
        self.optimizer.add_param_group({"params": [param], "lr": lr})
        self.oracle.add_param_group(param, lr)

    # ------------------------------------------------------------ checkpoints

    @rule(through_bytes=st.booleans())
    def save_and_load(self, through_bytes):
        """state_dict() now, loaded into a new optimizer over the same parameters,
        which replaces this one (the model's .grad stays where it is)."""
        state_dict = self.optimizer.state_dict()
        if through_bytes:
            file = io.BytesIO()
            torch.save(state_dict, file)
            file.seek(0)
            state_dict = torch.load(file, weights_only=True)
        groups = [{"params": group["params"]} for group in self.optimizer.param_groups]
        # accumulation_steps is a setting, not state: the user gives it again
        self.options["accumulation_steps"] = self.optimizer.accumulation_steps
        old = weakref.ref(self.optimizer)
        self.optimizer = None
        if old() is not None:  # freed by reference counting, as a rule; else:
            gc.collect()  # its backward hooks must be gone
        self.optimizer = self._new_optimizer(groups)
        self.optimizer.load_state_dict(state_dict)
        self.oracle.new_optimizer([p.requires_grad for p in self.params])
        self.counts["save/loads"] += 1

    # -------------------------------------------------------------- bad input

    @rule(
        kind=st.sampled_from(["weight", "accumulation_steps", "copy", "state_dict"]),
        choice=st.integers(0, 9),
    )
    def bad_argument(self, kind, choice):
        """A bad weight (to step() or set_weight()), accumulation_steps, a deep copy or
        pickling of the optimizer, or a state dict that does not fit: each raises a
        clear error and changes nothing."""
        getattr(self, f"_bad_{kind}")(choice)

    def _bad_weight(self, choice):
        weight = [0.0, -1.0, math.nan, math.inf, torch.ones(2)][choice % 5]
        if choice >= 5 and not self.hooks:
            self._unchanged(lambda: self.optimizer.step(weight=weight), ValueError, "weight")
        else:
            self._unchanged(lambda: self.optimizer.set_weight(weight), ValueError, "weight")

    def _bad_accumulation_steps(self, choice):
        value = [0, -2, 1.5, True, "2"][choice % 5]

        def assign():
            self.optimizer.accumulation_steps = value

        self._unchanged(assign, ValueError, "accumulation_steps must be an integer >= 1")

    def _bad_copy(self, choice):
        how = (copy.deepcopy, pickle.dumps)[choice % 2]
        self._unchanged(lambda: how(self.optimizer), TypeError, "state_dict")

    def _bad_state_dict(self, choice):
        state_dict = copy.deepcopy(self.optimizer.state_dict())
        tensors = [
            (state, name)
            for state in state_dict["state"].values()
            for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        if choice % 2 or not tensors:
            state_dict["param_groups"].append(copy.deepcopy(state_dict["param_groups"][0]))
            match = "number of parameter groups"
        else:
            state, name = tensors[choice % len(tensors)]
            state[name] = torch.zeros(state[name].numel() + 1)
            match = "has shape"
        self._unchanged(lambda: self.optimizer.load_state_dict(state_dict), ValueError, match)

    @precondition(lambda self: not self.oracle.incomplete_micro_batch)
    @rule(index=st.integers(0, 7))
    def grad_of_another_dtype(self, index):
        """step() with one .grad of the wrong dtype refuses and consumes nothing."""
        i = index % len(self.params)
        kept = self.params[i].grad
        self.params[i].grad = torch.zeros_like(self.params[i])
        self.params[i].grad.data = self._random(self.params[i].shape).double()
        self._unchanged(self.optimizer.step, RuntimeError, "nothing was accumulated")
        self.params[i].grad = kept

    @precondition(lambda self: self.hooks and not self.oracle.incomplete_micro_batch)
    @rule(index=st.integers(0, 7))
    def fold_of_another_dtype(self, index):
        """With accumulate_in_backward, a backward whose one gradient has the wrong dtype
        (its parameter cast behind the optimizer's back): the hook refuses it. After
        other folds of the same micro-batch the window holds part of it, and the
        optimizer must refuse to go on until the window is discarded."""
        i = index % len(self.params)
        if i not in self.oracle.hooked or not self.params[i].requires_grad:
            return
        param, kept_grad = self.params[i], self.params[i].grad
        original = param.data
        param.grad = None  # backward would add into it
        param.data = original.double()
        try:
            with pytest.raises(RuntimeError, match=r"is now torch\.float64"):
                (param * self._random(param.shape).double()).sum().backward()
        finally:
            param.data = original
            param.grad = kept_grad
        if self.oracle.folded_in_backward:
            self.oracle.incomplete_micro_batch = True
        self.counts["refusals"] += 1

    @invariant()
    def matches_the_oracle(self):
        if not hasattr(self, "oracle"):
            return
        self.counts["operations"] += 1
        optimizer, oracle = self.optimizer, self.oracle
        counters = (
            "micro_step_count",
            "window_micro_steps",
            "update_count",
            "last_step_applied",
        )
        for name in counters:
            assert getattr(optimizer, name) == getattr(oracle, name), name
        assert math.isclose(optimizer.window_weight, oracle.window_weight, rel_tol=1e-12)
        assert optimizer.accumulation_steps == oracle.accumulation_steps
        if self.loss_scaled:
            assert optimizer.loss_scale.item() == oracle.scale
        worst = 0.0
        for i, param in enumerate(self.params):
            worst = max(worst, _close(param.detach(), oracle.params[i].detach(), f"parameter {i}"))
            expected_grad = oracle.grads[i]
            if expected_grad is None:
                assert param.grad is None, f"parameter {i} has a .grad"
            else:
                assert param.grad is not None, f"parameter {i} lost its .grad"
                worst = max(worst, _close(param.grad, expected_grad, f".grad of parameter {i}"))
            expected_state = oracle.state(i)
            state = optimizer.state.get(param, {})
            for name, value in expected_state.items():
                if name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if value is None:
                        continue
                    worst = max(worst, _close(state[name], value, f"{name} of parameter {i}"))
                elif name == "step":
                    assert float(state["step"]) == float(value), f"step of parameter {i}"
            if not expected_state and state:
                # Allowed, a documented limit: with loss scaling the host does not know
                # that a window was skipped on the device, so a parameter's first
                # update creates its state even then, all zeros (step 0), which
                # updates as no state would. Without loss scaling: no state at all.
                assert self.loss_scaled, f"parameter {i} has state without an update"
                made = [name for name, value in state.items() if _nonzero(value)]
                assert not made, f"parameter {i} has state {made} without an update"
        WORST_ERROR[self.backend] = max(WORST_ERROR.get(self.backend, 0.0), worst)


def _nonzero(value) -> bool:
    return isinstance(value, torch.Tensor) and bool((value != 0).any())


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Check ``actual`` against the oracle's ``expected``; return the largest error of
    a finite element as a fraction of its tolerance."""
    actual, expected = actual.double(), expected.double()
    close = torch.isclose(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True)
    finite = torch.isfinite(actual) & torch.isfinite(expected)
    error = (actual - expected).abs() / (ATOL + RTOL * expected.abs())
    worst = float(error[finite].max()) if bool(finite.any()) else 0.0
    if not bool(close.all()):
        bad = (~close).flatten().nonzero().flatten()
        where = bad[:5].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} of {close.numel()} elements differ from the fp64 "
            f"oracle, first at {where}: {actual.flatten()[where].tolist()} vs "
            f"{expected.flatten()[where].tolist()}"
        )
    return worst
