"""Window semantics: weights, partial windows, missing gradients, backward hooks, param
groups, schedulers and parameter layouts."""

from __future__ import annotations

import pytest
import torch
from helpers import Oracle

from fused_accum import FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD


def _model(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(
        dtype
    )


def _clone(model):
    clone = _model(next(model.parameters()).dtype)
    clone.load_state_dict(model.state_dict())
    return clone


def _batches(count, sizes=(4,), dtype=torch.float32):
    return [
        (
            torch.randn(sizes[i % len(sizes)], 5, dtype=dtype),
            torch.randn(sizes[i % len(sizes)], 3, dtype=dtype),
        )
        for i in range(count)
    ]


def _loss(model, batch, reduction="mean"):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y, reduction=reduction)


def test_classic_loop_equals_torch_sgd():
    """The seed loop: divide the loss by N, step only at the boundary, and step once
    more at the end for the remainder; with accumulation_steps=1 it is torch's."""
    ours_model, torch_model = _model(), _model()
    ours = FusedAccumSGD(
        ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend="torch"
    )
    reference = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    accumulation_steps = 4
    batches = _batches(4 * 5 + 3)
    for model, optimizer in ((ours_model, ours), (torch_model, reference)):
        for i, batch in enumerate(batches):
            (_loss(model, batch) / accumulation_steps).backward()
            if (i + 1) % accumulation_steps == 0:
                optimizer.step()
                optimizer.zero_grad()
        optimizer.step()  # the remainder
        optimizer.zero_grad()
    for ours_param, torch_param in zip(
        ours_model.parameters(), torch_model.parameters(), strict=True
    ):
        assert torch.equal(ours_param, torch_param)


@pytest.mark.parametrize("optimizer_class", [FusedAccumSGD, FusedAccumAdamW])
def test_ragged_weighted_window_is_the_large_batch_step(optimizer_class):
    """Micro-batches of 3, 8, 1 and 5 items with per-item mean losses, weighted by their
    item counts, give the gradient of the mean loss over all 17 items (in fp64)."""
    model = _model()
    big_batch_model = _model(torch.float64)
    big_batch_model.load_state_dict(model.state_dict())
    sizes = (3, 8, 1, 5)
    batches = _batches(len(sizes), sizes)
    optimizer = optimizer_class(model.parameters(), lr=0.05, accumulation_steps=len(sizes))
    for batch, size in zip(batches, sizes, strict=True):
        _loss(model, batch).backward()
        optimizer.step(weight=size)
    assert optimizer.last_step_applied and optimizer.update_count == 1

    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches]).double()
    _loss(big_batch_model, (x, y)).backward()
    torch_class = torch.optim.SGD if optimizer_class is FusedAccumSGD else torch.optim.AdamW
    torch_class(big_batch_model.parameters(), lr=0.05).step()
    for param, big in zip(model.parameters(), big_batch_model.parameters(), strict=True):
        torch.testing.assert_close(param.double(), big, rtol=1e-6, atol=1e-6)


def test_unweighted_window_applies_the_mean_gradient():
    param = torch.nn.Parameter(torch.zeros(6))
    optimizer = FusedAccumSGD([param], lr=1.0, accumulation_steps=3)
    grads = [torch.randn(6) for _ in range(3)]
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(param.detach(), -sum(grads) / 3)


def test_flush_applies_a_partial_window_normalised_by_what_it_holds():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = FusedAccumSGD([param], lr=1.0, accumulation_steps=8)
    assert optimizer.flush() is False  # empty window: no-op
    assert torch.equal(param.detach(), torch.zeros(4))
    grads = [torch.randn(4) for _ in range(3)]
    for grad, weight in zip(grads, (1.0, 2.0, 5.0), strict=True):
        param.grad = grad.clone()
        optimizer.step(weight=weight)
    assert not optimizer.last_step_applied
    assert optimizer.window_micro_steps == 3 and optimizer.window_weight == 8.0
    assert optimizer.flush() is True
    assert optimizer.last_step_applied  # a scheduler keyed on it sees the flushed update
    expected = -(grads[0] + 2 * grads[1] + 5 * grads[2]) / 8
    torch.testing.assert_close(param.detach(), expected)
    assert optimizer.window_micro_steps == 0 and optimizer.update_count == 1
    assert optimizer.flush() is False


def test_introspection_counts_micro_steps_and_updates():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = FusedAccumAdam([param], accumulation_steps=3)
    seen = []
    for _ in range(7):
        param.grad = torch.randn(2)
        optimizer.step(weight=2)
        seen.append(
            (
                optimizer.micro_step_count,
                optimizer.window_micro_steps,
                optimizer.window_weight,
                optimizer.last_step_applied,
                optimizer.update_count,
            )
        )
    assert seen == [
        (1, 1, 2.0, False, 0), (2, 2, 4.0, False, 0), (3, 0, 0.0, True, 1),
        (4, 1, 2.0, False, 1), (5, 2, 4.0, False, 1), (6, 0, 0.0, True, 2),
        (7, 1, 2.0, False, 2),
    ]  # fmt: skip


def test_zero_grad_keeps_the_window_and_discard_window_drops_it():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = FusedAccumSGD([param], lr=1.0, accumulation_steps=2)
    first = torch.randn(3)
    param.grad = first.clone()
    optimizer.step()
    optimizer.zero_grad()
    optimizer.zero_grad(set_to_none=False)
    second = torch.randn(3)
    param.grad = second.clone()
    optimizer.step()
    torch.testing.assert_close(param.detach(), -(first + second) / 2)

    param.grad = torch.randn(3)
    optimizer.step()
    before = param.detach().clone()
    optimizer.discard_window()
    assert optimizer.window_micro_steps == 0 and optimizer.window_weight == 0.0
    assert not optimizer._accumulation.holds_sum
    third, fourth = torch.randn(3), torch.randn(3)
    for grad in (third, fourth):
        param.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(param.detach(), before - (third + fourth) / 2)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_missing_gradients_contribute_zero_and_state_is_lazy(optimizer_name):
    """A parameter without .grad in a micro-step contributes zero to that micro-step;
    one without any gradient in a window is not updated and gets no state, as torch
    skips a parameter whose grad is None."""
    ours_class = {"sgd": FusedAccumSGD, "adam": FusedAccumAdam}[optimizer_name]
    kwargs = {
        "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.1),
        "adam": dict(lr=0.01, weight_decay=0.1),
    }[optimizer_name]
    initial = [torch.randn(4), torch.randn(3), torch.randn(2)]
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    ours = ours_class(params, accumulation_steps=2, **kwargs)
    oracle = Oracle(optimizer_name, kwargs, initial)
    # which parameters have a gradient, per micro-step: the last one only in window 2
    pattern = [(1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 1, 0), (1, 1, 1), (1, 0, 1)]
    for window in range(3):
        for has_grad in pattern[2 * window : 2 * window + 2]:
            grads = [
                torch.randn_like(p) if flag else None
                for p, flag in zip(params, has_grad, strict=True)
            ]
            for param, grad in zip(params, grads, strict=True):
                param.grad = None if grad is None else grad.clone()
            ours.step()
            oracle.micro_step(grads)
        oracle.apply()
        if window < 2:
            assert params[2] not in ours.state or not ours.state[params[2]]
            assert torch.equal(params[2].detach(), initial[2])
    for param, expected in zip(params, oracle.params, strict=True):
        torch.testing.assert_close(param.detach(), expected.detach())
    if optimizer_name == "adam":
        assert [ours.state[p]["step"].item() for p in params] == [2.0, 3.0, 1.0]


def test_frozen_parameters_toggled_between_windows():
    model, reference_model = _model(), _model()
    ours = FusedAccumAdamW(model.parameters(), lr=0.01, accumulation_steps=2)
    reference = FusedAccumAdamW(reference_model.parameters(), lr=0.01, accumulation_steps=2)
    batches = _batches(8)
    for window in range(4):
        frozen = window in (1, 2)
        model[0].requires_grad_(not frozen)
        for batch in batches[2 * window : 2 * window + 2]:
            _loss(model, batch).backward()
            ours.step()
            _loss(reference_model, batch).backward()
            if frozen:
                for p in reference_model[0].parameters():
                    p.grad = None
            reference.step()
    assert ours.state[model[0].weight]["step"].item() == 2.0
    for param, expected in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(param, expected)


@pytest.mark.parametrize("optimizer_class", [FusedAccumSGD, FusedAccumAdamW])
def test_accumulate_in_backward_frees_grads_and_matches_default_mode(optimizer_class):
    model, hooked_model = _model(), _model()
    kwargs = dict(lr=0.05, accumulation_steps=3)
    if optimizer_class is FusedAccumSGD:
        kwargs["momentum"] = 0.9
    default = optimizer_class(model.parameters(), **kwargs)
    hooked = optimizer_class(hooked_model.parameters(), accumulate_in_backward=True, **kwargs)
    batches = _batches(3 * 4 + 1)
    for i, batch in enumerate(batches):
        weight = 1.0 + i % 3
        _loss(model, batch).backward()
        default.step(weight=weight)
        hooked.set_weight(weight)
        _loss(hooked_model, batch).backward()
        assert all(p.grad is None for p in hooked_model.parameters())
        hooked.step()
        for param, expected in zip(hooked_model.parameters(), model.parameters(), strict=True):
            if default.update_count:
                break  # after an update the models differ by rounding; so do the grads
            # the same sums in the buffers, bit for bit
            assert torch.equal(
                hooked._accumulation.buffer_view(param), default._accumulation.buffer_view(expected)
            )
    default.flush()
    hooked.flush()
    assert hooked.update_count == default.update_count == 5
    # The default mode adds the window's last gradients inside the step (one rounding
    # more or less than adding them to the buffer first), so equal up to fp32 rounding.
    for param, expected in zip(hooked_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


def test_accumulate_in_backward_wants_the_weight_before_backward():
    model = _model()
    optimizer = FusedAccumSGD(
        model.parameters(), lr=0.1, accumulation_steps=2, accumulate_in_backward=True
    )
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"set_weight\(weight\)"):
        optimizer.step(weight=3)
    with pytest.raises(RuntimeError, match=r"call step\(\) for that micro-batch before flush"):
        optimizer.flush()
    optimizer.step()
    assert optimizer.flush() is True


def test_accumulate_in_backward_with_a_parameter_unfrozen_later():
    """Hooks cannot be put on a frozen parameter; its first gradient after unfreezing
    lands in .grad and step() folds it, then the hook takes over."""
    model, reference_model = _model(), _model()
    model[2].requires_grad_(False)
    reference_model[2].requires_grad_(False)
    hooked = FusedAccumSGD(
        model.parameters(), lr=0.1, accumulation_steps=2, accumulate_in_backward=True
    )
    reference = FusedAccumSGD(reference_model.parameters(), lr=0.1, accumulation_steps=2)
    for i, batch in enumerate(_batches(8)):
        if i == 3:
            model[2].requires_grad_(True)
            reference_model[2].requires_grad_(True)
        _loss(model, batch).backward()
        hooked.step()
        _loss(reference_model, batch).backward()
        reference.step()
    for param, expected in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_param_groups_and_add_param_group_mid_window():
    first, second = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    initial = [first.detach().clone(), second.detach().clone()]
    optimizer = FusedAccumSGD([first], lr=0.1, momentum=0.9, accumulation_steps=2)
    oracle_params = [p.clone().requires_grad_() for p in initial]
    reference = torch.optim.SGD([oracle_params[0]], lr=0.1, momentum=0.9)
    grads = [[torch.randn(5), torch.randn(3)] for _ in range(6)]
    for step, (grad_first, grad_second) in enumerate(grads):
        if step == 3:  # mid-window: the group's flat storage grows, contents are kept
            optimizer.add_param_group({"params": [second], "lr": 0.5})
            reference.add_param_group({"params": [oracle_params[1]], "lr": 0.5})
        first.grad = grad_first.clone()
        if step >= 3:
            second.grad = grad_second.clone()
        optimizer.step()
        if step % 2 == 1:
            oracle_params[0].grad = (grads[step - 1][0] + grad_first) / 2
            oracle_params[1].grad = (
                (grad_second / 2) if step == 3 else (grads[step - 1][1] + grad_second) / 2
            )
            reference.step()
    assert optimizer.param_groups[1]["lr"] == 0.5
    for param, expected in zip((first, second), oracle_params, strict=True):
        torch.testing.assert_close(param.detach(), expected.detach())
    for param, expected in zip((first, second), oracle_params, strict=True):
        torch.testing.assert_close(
            optimizer.state[param]["momentum_buffer"], reference.state[expected]["momentum_buffer"]
        )


def test_lr_scheduler_drives_the_learning_rate():
    model, torch_model = _model(), _model()
    ours = FusedAccumAdamW(model.parameters(), lr=0.02, backend="torch")
    reference = torch.optim.AdamW(torch_model.parameters(), lr=0.02, foreach=False)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, reference)
    ]
    for batch in _batches(7):
        for m, o, s in zip((model, torch_model), (ours, reference), schedulers, strict=True):
            _loss(m, batch).backward()
            o.step()
            o.zero_grad()
            s.step()
    assert ours.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == 0.02 * 0.5**3
    for param, expected in zip(model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_changing_accumulation_steps_takes_effect_at_the_next_micro_step():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = FusedAccumSGD([param], lr=1.0, accumulation_steps=4)
    applied = []
    for step in range(6):
        if step == 2:
            optimizer.accumulation_steps = 2
        param.grad = torch.ones(2)
        optimizer.step()
        applied.append(optimizer.last_step_applied)
    assert applied == [False, False, True, False, True, False]


def test_mixed_dtypes_in_one_optimizer_use_one_flat_group_each():
    params = [
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(5).bfloat16()),
        torch.nn.Parameter(torch.randn(3)),
        torch.nn.Parameter(torch.randn(4).double()),
    ]
    optimizer = FusedAccumAdam(params, lr=0.01, accumulation_steps=2)
    separate = [
        FusedAccumAdam([torch.nn.Parameter(p.detach().clone())], lr=0.01, accumulation_steps=2)
        for p in params
    ]
    groups = optimizer._accumulation.groups
    assert sorted(str(dtype) for _, dtype in groups) == [
        "torch.bfloat16",
        "torch.float32",
        "torch.float64",
    ]
    fp32_group = groups[(torch.device("cpu"), torch.float32)]
    assert fp32_group.params == [params[0], params[2]]
    assert fp32_group.buffer.dtype == torch.float32
    assert groups[(torch.device("cpu"), torch.float64)].buffer.dtype == torch.float64
    for _ in range(4):
        for param, single in zip(params, separate, strict=True):
            grad = torch.randn_like(param)
            param.grad = grad
            single.param_groups[0]["params"][0].grad = grad.clone()
            single.step()
        optimizer.step()
    for param, single in zip(params, separate, strict=True):
        assert torch.equal(param, single.param_groups[0]["params"][0])
    # state of one flat group shares one storage
    views = [optimizer.state[p]["exp_avg"] for p in (params[0], params[2])]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "zero_size"])
def test_parameter_layouts(layout):
    base = {
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "transposed": torch.randn(6, 4).t(),
        "zero_size": torch.randn(0, 3),
    }[layout]
    param = torch.nn.Parameter(base.clone(memory_format=torch.preserve_format))
    oracle = Oracle("sgd", dict(lr=0.1, momentum=0.9), [base])
    optimizer = FusedAccumSGD([param], lr=0.1, momentum=0.9, accumulation_steps=2)
    assert optimizer._accumulation.buffer_view(param).stride() == param.stride()
    for _ in range(6):
        grad = torch.randn_like(param)  # keeps the parameter's strides, as autograd does
        param.grad = grad.clone(memory_format=torch.preserve_format)
        optimizer.step()
        oracle.micro_step([grad])
        if optimizer.last_step_applied:
            oracle.apply()
    assert param.stride() == base.stride()
    torch.testing.assert_close(param.detach(), oracle.params[0].detach())


def test_step_with_a_closure_returns_its_loss_and_counts_one_micro_step():
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=2)
    batch = _batches(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert optimizer.window_micro_steps == 1
    assert all(p.grad is None for p in model.parameters())
    optimizer.step(closure)
    assert optimizer.last_step_applied


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_interleaved_dtypes_and_groups_in_the_steady_state(backend):
    """After a window's first micro-step every parameter holds a sum, and the later
    micro-steps fold all gradients as one list split by (device, dtype) group: fp32 and
    bf16 parameters interleaved over two param groups must each get their own gradients.
    Expected: the reference backend with one more parameter that never has a gradient,
    which keeps it on the path that takes gradients one by one."""
    from fused_accum.backends import compiled

    if backend == "cpu" and compiled.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the compiled CPU kernels are not built")
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    initial = [torch.randn(3, dtype=dtype) for dtype in dtypes]
    runs = []
    for name, extra in ((backend, []), ("torch", [torch.nn.Parameter(torch.ones(2))])):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        groups = [{"params": params[:3] + extra}, {"params": params[3:], "lr": 0.05}]
        optimizer = FusedAccumAdamW(groups, lr=0.1, accumulation_steps=4, backend=name)
        generator = torch.Generator().manual_seed(1)
        for micro_step in range(8):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
            optimizer.step(weight=1.0 + micro_step)
        runs.append(params)
    for ours, expected in zip(*runs, strict=True):
        tolerance = 1e-6 if ours.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(ours, expected, atol=tolerance, rtol=tolerance)
