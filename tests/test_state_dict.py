"""state_dict round trips with torch.optim, and mid-window stop/resume."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import CONFIGS, OPTIMIZER_PAIRS

from fused_accum import FusedAccumAdamW, FusedAccumSGD

# One configuration per optimizer with state: momentum SGD, amsgrad Adam, AdamW.
ROUND_TRIP_CONFIGS = [CONFIGS[2], CONFIGS[5], CONFIGS[8]]


def _params(dtype=torch.float32):
    shapes = [(7, 3), (1,), (1023,), (0,)]
    return [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in shapes]


def _copy(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _feed(optimizer, params, grads):
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()


def _grads(params, count):
    return [[torch.randn_like(p) for p in params] for _ in range(count)]


def _through_bytes(state_dict):
    stream = io.BytesIO()
    torch.save(state_dict, stream)
    stream.seek(0)
    return torch.load(stream, map_location="cpu")


@pytest.mark.parametrize("name,kwargs", ROUND_TRIP_CONFIGS, ids=[c[0] for c in ROUND_TRIP_CONFIGS])
def test_round_trip_ours_torch_ours(name, kwargs):
    """Train ours, continue in torch.optim from our state dict, then continue in ours
    from torch's: the same parameters as torch.optim all along (one micro-step per
    window, so exact)."""
    ours_class, torch_class = OPTIMIZER_PAIRS[name]
    params = _params()
    reference_params = _copy(params)
    reference = torch_class(reference_params, foreach=False, **kwargs)
    grads = _grads(params, 9)

    ours = ours_class(params, backend="torch", **kwargs)
    for step in grads[:3]:
        _feed(ours, params, step)
        _feed(reference, reference_params, step)

    torch_params = _copy(params)
    in_torch = torch_class(torch_params, foreach=False, **kwargs)
    in_torch.load_state_dict(_through_bytes(ours.state_dict()))
    for step in grads[3:6]:
        _feed(in_torch, torch_params, step)
        _feed(reference, reference_params, step)

    back_params = _copy(torch_params)
    back = ours_class(back_params, backend="torch", **kwargs)
    back.load_state_dict(_through_bytes(in_torch.state_dict()))
    for step in grads[6:]:
        _feed(back, back_params, step)
        _feed(reference, reference_params, step)

    for param, expected in zip(back_params, reference_params, strict=True):
        assert torch.equal(param, expected)
    for param, expected in zip(back_params, reference_params, strict=True):
        for key, value in reference.state[expected].items():
            assert torch.equal(back.state[param][key], value), key


@pytest.mark.parametrize("accumulate_in_backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optimizer_class", [FusedAccumSGD, FusedAccumAdamW])
def test_mid_window_stop_and_resume_is_bit_identical(
    optimizer_class, dtype, accumulate_in_backward
):
    kwargs = dict(lr=0.05, accumulation_steps=4, accumulate_in_backward=accumulate_in_backward)
    if optimizer_class is FusedAccumSGD:
        kwargs["momentum"] = 0.9
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    model = model.to(dtype)
    resumed_model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    ).to(dtype)
    batches = [torch.randn(3, 6, dtype=dtype) for _ in range(4 * 3 + 2)]
    weights = [1 + i % 5 for i in range(len(batches))]

    def train(model, optimizer, batches, weights):
        for batch, weight in zip(batches, weights, strict=True):
            if accumulate_in_backward:
                optimizer.set_weight(weight)
            model(batch).square().mean().backward()
            if accumulate_in_backward:
                optimizer.step()
            else:
                optimizer.step(weight=weight)

    uninterrupted = optimizer_class(model.parameters(), **kwargs)
    stop = 4 + 2  # in the middle of the second window
    train(model, uninterrupted, batches[:stop], weights[:stop])
    checkpoint = _through_bytes(
        {"model": model.state_dict(), "optimizer": uninterrupted.state_dict()}
    )
    train(model, uninterrupted, batches[stop:], weights[stop:])
    uninterrupted.flush()

    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optimizer_class(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.window_micro_steps == 2 and resumed.micro_step_count == stop
    train(resumed_model, resumed, batches[stop:], weights[stop:])
    resumed.flush()

    assert resumed.update_count == uninterrupted.update_count == 4
    for param, expected in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(param, expected)
    for param, expected in zip(resumed_model.parameters(), model.parameters(), strict=True):
        for key, value in uninterrupted.state[expected].items():
            assert torch.equal(resumed.state[param][key], value), key


def test_low_precision_state_keeps_fp32_through_a_state_dict():
    """torch.optim's own loading casts state to the parameter dtype; ours keeps fp32."""
    params = _params(torch.bfloat16)
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=2)
    for step in _grads(params, 5):
        _feed(optimizer, params, step)
    saved = _through_bytes(optimizer.state_dict())
    loaded = FusedAccumAdamW(_copy(params), lr=0.01)
    loaded.load_state_dict(saved)
    for param, original in zip(loaded.param_groups[0]["params"], params, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded.state[param][key].dtype == torch.float32
            assert torch.equal(loaded.state[param][key], optimizer.state[original][key])
        assert torch.equal(
            loaded._accumulation.buffer_view(param), optimizer._accumulation.buffer_view(original)
        )


def test_loading_a_torch_state_dict_into_a_model_of_another_shape_fails_clearly():
    params = _params()
    reference = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in _grads(params, 2):
        _feed(reference, params, step)
    other = [torch.nn.Parameter(torch.randn(3, 7)), *_copy(params[1:])]
    optimizer = FusedAccumSGD(other, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"has shape \(7, 3\) but the parameter has shape"):
        optimizer.load_state_dict(reference.state_dict())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loading_a_state_dict_held_in_memory_keeps_the_state(backend):
    """state_dict() returns views of the optimizer's own storage; loading it back, or
    into a second optimizer sharing nothing, must not zero it on the way."""
    params = _params()
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=2, backend=backend)
    for step in _grads(params, 3):  # one update and a window in progress
        _feed(optimizer, params, step)
    expected = {key: value.clone() for key, value in optimizer.state[params[0]].items()}
    buffer = optimizer._accumulation.buffer_view(params[0]).clone()
    optimizer.load_state_dict(optimizer.state_dict())
    for key, value in expected.items():
        assert torch.equal(optimizer.state[params[0]][key], value), key
    assert torch.equal(optimizer._accumulation.buffer_view(params[0]), buffer)
    assert optimizer.window_micro_steps == 1


def test_a_state_dict_that_does_not_fit_changes_nothing():
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, momentum=0.9, accumulation_steps=2)
    for step in _grads(params, 3):
        _feed(optimizer, params, step)
    before = {i: optimizer.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)}
    other = [torch.nn.Parameter(torch.randn(3, 7)), *_copy(params[1:])]
    wrong = FusedAccumSGD(other, lr=0.5, momentum=0.9)
    _feed(wrong, other, _grads(other, 1)[0])
    with pytest.raises(ValueError, match=r"has shape \(3, 7\) but the parameter has shape"):
        optimizer.load_state_dict(wrong.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.window_micro_steps == 1
    for index, param in enumerate(params):
        assert torch.equal(optimizer.state[param]["momentum_buffer"], before[index])


def test_accumulation_steps_is_a_setting_not_state():
    params = _params()
    saved = FusedAccumSGD(params, lr=0.1, accumulation_steps=4)
    _feed(saved, params, _grads(params, 1)[0])
    loaded = FusedAccumSGD(_copy(params), lr=0.1, accumulation_steps=2)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.accumulation_steps == 2 and loaded.window_micro_steps == 1
