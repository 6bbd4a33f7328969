"""Built-in dynamic loss scaling (loss_scaling=True): the loss is scaled by
optimizer.scale_loss(), a non-finite gradient in any micro-batch skips the whole window
on the device, bit for bit, and the scale backs off or grows there. Every backend."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW, FusedAccumSGD, LossScaling

STEPS = 4
OPTIMIZERS = [
    (FusedAccumSGD, dict(lr=0.05, momentum=0.9)),
    (FusedAccumSGD, dict(lr=0.05, momentum=0.9, dampening=0.5)),
    (FusedAccumAdamW, dict(lr=0.01, amsgrad=True)),
]
OPTIMIZER_IDS = ["sgd", "sgd-dampening", "adamw"]


def _model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batches(windows, poisoned=None):
    """Micro-batches; (window, micro_step, count, value) in ``poisoned`` puts ``count``
    copies of ``value`` into that micro-batch's input."""
    torch.manual_seed(8)
    batches = [[torch.randn(3, 6) for _ in range(STEPS)] for _ in range(windows)]
    if poisoned is not None:
        window, micro_step, count, value = poisoned
        batches[window][micro_step].view(-1)[:count] = value
    return batches


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
        for p in model.parameters()
    ]
    return params, state


def _assert_trains_alike(model, expected_model, backend):
    """Bit for bit; but the compiled CPU kernels contract the last micro-step's
    accumulate-and-step into fused multiply-adds, which the fold-then-step of a window
    decided on the device does not, so there the last bit may differ."""
    for param, expected in zip(model.parameters(), expected_model.parameters(), strict=True):
        if backend == "cpu":
            torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(param, expected)


def _train(model, optimizer, batches, scaled=True):
    for x in batches:
        loss = model(x).square().mean()
        (optimizer.scale_loss(loss) if scaled else loss).backward()
        optimizer.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer_class,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("micro_step", range(STEPS))
@pytest.mark.parametrize("count", [1, 7], ids=["one", "many"])
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_an_overflow_skips_the_whole_window(
    backend, optimizer_class, kwargs, micro_step, count, value
):
    model, reference = _model(), _model()
    scaling = LossScaling(init_scale=2.0**10, growth_interval=1000)
    settings = dict(accumulation_steps=STEPS, backend=backend, **kwargs)
    optimizer = optimizer_class(model.parameters(), loss_scaling=scaling, **settings)
    batches = _batches(3, poisoned=(1, micro_step, count, value))
    _train(model, optimizer, batches[0])
    before = _snapshot(model, optimizer)
    _train(model, optimizer, batches[1])
    after = _snapshot(model, optimizer)
    # nothing changed, bit for bit, and the scale backed off once
    for param, expected in zip(after[0], before[0], strict=True):
        assert torch.equal(param, expected)
    for state, expected_state in zip(after[1], before[1], strict=True):
        assert state.keys() == expected_state.keys()
        for key, expected in expected_state.items():
            assert torch.equal(torch.as_tensor(state[key]).cpu(), torch.as_tensor(expected).cpu())
    assert optimizer.loss_scale.item() == 2.0**9
    # the next window trains normally: the same as a run without scaling that never saw
    # the poisoned window (power-of-two scales cancel exactly)
    _train(model, optimizer, batches[2])
    reference_optimizer = optimizer_class(reference.parameters(), **settings)
    for window in (0, 2):
        _train(reference, reference_optimizer, batches[window], scaled=False)
    _assert_trains_alike(model, reference, backend)
    for param, reference_param in zip(model.parameters(), reference.parameters(), strict=True):
        state, expected_state = optimizer.state[param], reference_optimizer.state[reference_param]
        assert state.keys() == expected_state.keys()
        assert torch.equal(torch.as_tensor(state.get("step", 0)).cpu(),
                           torch.as_tensor(expected_state.get("step", 0)))  # fmt: skip


def _expected_scales(poisoned_windows, windows, init, interval):
    """torch.amp.GradScaler's rule: back off by half after an overflow, double after
    ``interval`` clean updates in a row."""
    scale, tracker, scales = init, 0, []
    for window in range(windows):
        if window in poisoned_windows:
            scale, tracker = scale * 0.5, 0
        else:
            tracker += 1
            if tracker == interval:
                scale, tracker = scale * 2.0, 0
        scales.append(scale)
    return scales


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_scale_grows_and_backs_off_like_grad_scaler(backend):
    model = _model()
    scaling = LossScaling(init_scale=2.0**4, growth_interval=2)
    optimizer = FusedAccumSGD(
        model.parameters(), lr=0.01, accumulation_steps=STEPS, loss_scaling=scaling, backend=backend
    )
    poisoned = {2, 5, 6}
    scales = []
    for window, micro_batches in enumerate(_batches(8)):
        if window in poisoned:
            micro_batches[1][0, 0] = math.inf
        _train(model, optimizer, micro_batches)
        scales.append(optimizer.loss_scale.item())
    assert scales == _expected_scales(poisoned, 8, 2.0**4, 2)
    assert len(set(scales)) > 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_built_in_scaling_equals_grad_scaler(backend):
    """The same training, with the same overflow, through a GradScaler and built in."""
    models = [_model(), _model()]
    settings = dict(lr=0.01, accumulation_steps=STEPS, backend=backend)
    built_in = FusedAccumAdamW(
        models[0].parameters(), loss_scaling=LossScaling(init_scale=2.0**6), **settings
    )
    with_scaler = FusedAccumAdamW(models[1].parameters(), **settings)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    batches = _batches(3, poisoned=(1, 3, 2, math.inf))
    for micro_batches in batches:
        _train(models[0], built_in, micro_batches)
        for x in micro_batches:
            scaler.scale(models[1](x).square().mean()).backward()
            scaler.step(with_scaler)
            scaler.update()
    assert built_in.loss_scale.item() == scaler.get_scale() == 2.0**5
    _assert_trains_alike(models[0], models[1], backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_with_accumulate_in_backward(backend):
    models = [_model(), _model()]
    settings = dict(lr=0.05, momentum=0.9, accumulation_steps=STEPS, backend=backend)
    scaling = LossScaling(init_scale=2.0**6)
    in_backward = FusedAccumSGD(
        models[0].parameters(), loss_scaling=scaling, accumulate_in_backward=True, **settings
    )
    in_step = FusedAccumSGD(models[1].parameters(), loss_scaling=scaling, **settings)
    for micro_batches in _batches(3, poisoned=(1, 0, 1, math.nan)):
        _train(models[0], in_backward, micro_batches)
        _train(models[1], in_step, micro_batches)
    assert in_backward.loss_scale.item() == 2.0**5
    for param, expected in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(param, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_with_clipping(backend):
    """The norm is that of the unscaled mean gradient, and clipping matches torch's."""
    models = [_model(), _model()]
    settings = dict(lr=0.05, accumulation_steps=STEPS, max_grad_norm=0.01, backend=backend)
    scaled = FusedAccumSGD(models[0].parameters(), loss_scaling=True, **settings)
    plain = FusedAccumSGD(models[1].parameters(), **settings)
    for micro_batches in _batches(2):
        _train(models[0], scaled, micro_batches)
        _train(models[1], plain, micro_batches, scaled=False)
        assert plain.grad_norm.item() > 0.01  # it clips
        torch.testing.assert_close(scaled.grad_norm, plain.grad_norm, rtol=1e-6, atol=0)
    for param, expected in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(param, expected)


def test_an_overflow_in_progress_and_the_scale_survive_a_checkpoint():
    model, twin = _model(), _model()
    settings = dict(lr=0.01, accumulation_steps=STEPS, loss_scaling=True)
    optimizer = FusedAccumAdamW(model.parameters(), **settings)
    batches = _batches(3, poisoned=(1, 1, 1, math.inf))
    _train(model, optimizer, batches[0])
    _train(model, optimizer, batches[1][:2])  # the overflow is in, the window not over
    resumed = FusedAccumAdamW(twin.parameters(), **settings)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(optimizer.state_dict())
    for net, opt in ((model, optimizer), (twin, resumed)):
        _train(net, opt, batches[1][2:])
        _train(net, opt, batches[2])
    assert resumed.loss_scale.item() == optimizer.loss_scale.item() == 2.0**15
    for param, expected in zip(twin.parameters(), model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_misuse_says_what_to_do():
    model = _model()
    plain = FusedAccumSGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"scale_loss\(\) needs loss_scaling=True"):
        plain.scale_loss(torch.tensor(1.0))
    assert plain.loss_scale is None
    scaled = FusedAccumSGD(model.parameters(), lr=0.1, loss_scaling=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 6)).sum()).backward()
    with pytest.raises(RuntimeError, match="would scale twice"):
        scaler.step(scaled)
    with pytest.raises(TypeError, match="loss_scaling must be True, False or a fused_accum"):
        FusedAccumSGD(model.parameters(), lr=0.1, loss_scaling="dynamic")
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        LossScaling(backoff_factor=2.0)
    with pytest.raises(ValueError, match="growth_interval must be a positive integer"):
        LossScaling(growth_interval=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("optimizer_class", [FusedAccumSGD, FusedAccumAdamW], ids=["sgd", "adamw"])
def test_no_host_sync_on_gpu(backend, optimizer_class):
    """Whole windows, overflowing and not, clipped, under sync debug mode "error"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model = model.cuda().half()
    optimizer = optimizer_class(
        model.parameters(), lr=1e-3, accumulation_steps=STEPS, backend=backend,
        loss_scaling=True, max_grad_norm=1.0,
    )  # fmt: skip
    batches = [torch.randn(16, 64, device="cuda", dtype=torch.half) for _ in range(3 * STEPS)]
    batches[5] = batches[5].clone().fill_(math.inf)

    def window(micro_batches):
        for x in micro_batches:
            optimizer.scale_loss(model(x).float().square().mean()).backward()
            optimizer.step()

    window(batches[:STEPS])  # first updates create state (and compile kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window(batches[STEPS : 2 * STEPS])  # overflows
        window(batches[2 * STEPS :])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert optimizer.loss_scale.item() == 2.0**15
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("saver,loader", [(True, False), (False, True)], ids=["off", "on"])
def test_a_window_moves_between_scaled_and_unscaled_optimizers(saver, loader):
    """Mid-window, the buffers of a loss-scaled optimizer hold scale * sum: a state dict
    says so, and an optimizer with the other setting re-expresses them."""
    models = [_model(), _model()]
    settings = dict(lr=0.05, momentum=0.9, accumulation_steps=STEPS)
    first = FusedAccumSGD(models[0].parameters(), loss_scaling=saver, **settings)
    straight = FusedAccumSGD(models[1].parameters(), loss_scaling=loader, **settings)
    batches = _batches(1)[0]
    _train(models[0], first, batches[:2], scaled=saver)
    _train(models[1], straight, batches[:2], scaled=loader)
    resumed = FusedAccumSGD(models[0].parameters(), loss_scaling=loader, **settings)
    resumed.load_state_dict(first.state_dict())
    _train(models[0], resumed, batches[2:], scaled=loader)
    _train(models[1], straight, batches[2:], scaled=loader)
    _assert_trains_alike(models[0], models[1], "torch")


def test_flush_skips_a_window_a_grad_scaler_saw_overflow():
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=STEPS)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    for x in _batches(1, poisoned=(0, 1, 1, math.inf))[0][:2]:
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    assert optimizer.flush() is False and not optimizer.last_step_applied
    for param, expected in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, expected)
    assert optimizer.window_micro_steps == 0
