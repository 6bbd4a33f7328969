"""Bad input gets a clear error (or a defined behaviour), never a silent wrong result."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from fused_accum import FusedAccumAdam, FusedAccumAdamW, FusedAccumSGD

ALL = [FusedAccumSGD, FusedAccumAdam, FusedAccumAdamW]


def _param(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape).to(dtype))


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (FusedAccumSGD, torch.optim.SGD, dict(lr=-0.1)),
        (FusedAccumSGD, torch.optim.SGD, dict(lr=0.1, momentum=-0.5)),
        (FusedAccumSGD, torch.optim.SGD, dict(lr=0.1, weight_decay=-1e-4)),
        (FusedAccumSGD, torch.optim.SGD, dict(lr=0.1, nesterov=True)),
        (FusedAccumSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
        (FusedAccumSGD, torch.optim.SGD, dict(lr=torch.tensor([0.1, 0.2]))),
        (FusedAccumAdam, torch.optim.Adam, dict(lr=-1.0)),
        (FusedAccumAdam, torch.optim.Adam, dict(eps=-1e-8)),
        (FusedAccumAdam, torch.optim.Adam, dict(betas=(1.0, 0.999))),
        (FusedAccumAdam, torch.optim.Adam, dict(betas=(0.9, -0.1))),
        (FusedAccumAdam, torch.optim.Adam, dict(betas=(0.9, 1))),
        (FusedAccumAdamW, torch.optim.AdamW, dict(weight_decay=-0.01)),
    ],
)
def test_hyperparameters_are_validated_as_torch_does(ours, theirs, kwargs):
    with pytest.raises(ValueError) as torch_error:
        theirs([_param(3)], **kwargs)
    with pytest.raises(ValueError) as our_error:
        ours([_param(3)], **kwargs)
    assert str(our_error.value) == str(torch_error.value)


@pytest.mark.parametrize("optimizer_class", ALL)
@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4", None])
def test_accumulation_steps_must_be_a_positive_integer(optimizer_class, value):
    with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1"):
        optimizer_class([_param(3)], accumulation_steps=value)
    optimizer = optimizer_class([_param(3)], accumulation_steps=2)
    with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1"):
        optimizer.accumulation_steps = value
    assert optimizer.accumulation_steps == 2


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, torch.tensor(-3.0)])
def test_weight_must_be_positive_and_finite_and_nothing_is_consumed(weight):
    param = _param(4)
    optimizer = FusedAccumSGD([param], lr=0.1, accumulation_steps=2)
    grad = torch.randn(4)
    param.grad = grad
    with pytest.raises(ValueError, match=r"weight must be positive and finite"):
        optimizer.step(weight=weight)
    with pytest.raises(ValueError, match=r"weight must be positive and finite"):
        optimizer.set_weight(weight)
    assert param.grad is grad and optimizer.micro_step_count == 0


@pytest.mark.filterwarnings("ignore:a whole window ended without a gradient")
def test_weight_of_the_wrong_kind():
    optimizer = FusedAccumSGD([_param(4)], lr=0.1)
    with pytest.raises(TypeError, match=r"weight must be a real number, got str"):
        optimizer.step(weight="8")
    with pytest.raises(ValueError, match=r"one-element tensor, got a tensor of shape \(2,\)"):
        optimizer.step(weight=torch.ones(2))
    optimizer.step(weight=torch.tensor(3))  # a one-element tensor is fine


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        FusedAccumAdamW([])


def test_duplicate_parameters():
    param = _param(3)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 appears twice"):
        FusedAccumSGD([param, param], lr=0.1)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        FusedAccumSGD([{"params": [param]}, {"params": [param]}], lr=0.1)


@pytest.mark.parametrize(
    "tensor,message",
    [
        (torch.zeros(3, dtype=torch.complex64), r"is complex \(torch.complex64\)"),
        (torch.zeros(3, dtype=torch.int64), r"has dtype torch.int64; only floating-point"),
        (torch.zeros(3).to_sparse(), r"has layout torch.sparse_coo"),
    ],
)
def test_unsupported_parameters(tensor, message):
    with pytest.raises(ValueError, match=message):
        FusedAccumAdam([_param(2), tensor])
    with pytest.raises(ValueError, match=message):  # a group holding one bare tensor
        FusedAccumAdam([{"params": _param(2)}, {"params": tensor}])


def test_unsupported_options():
    with pytest.raises(ValueError, match=r"does not support differentiable=True"):
        FusedAccumSGD([_param(2)], lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match=r"does not support capturable=True"):
        FusedAccumAdam([_param(2)], capturable=True)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of"):
        FusedAccumSGD([_param(2)], lr=0.1, backend="fast")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run .* runs CUDA tensors"):
        FusedAccumSGD([_param(2)], lr=0.1, backend="cuda")
    # accepted for compatibility with torch.optim: the backend keyword decides
    FusedAccumSGD([_param(2)], lr=0.1, foreach=True, fused=False)


def _expect_step_error(param, message):
    """The step raises, and nothing is consumed: .grad is kept and no window starts."""
    optimizer = FusedAccumAdamW([_param(5), param], accumulation_steps=2)
    optimizer.param_groups[0]["params"][0].grad = torch.randn(5)
    grad = param.grad
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert param.grad is grad
    assert optimizer.param_groups[0]["params"][0].grad is not None
    assert optimizer.micro_step_count == 0 and optimizer.window_micro_steps == 0


def test_sparse_gradient():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 4])).sum().backward()
    _expect_step_error(embedding.weight, r"parameter 1 of param group 0 has a sparse gradient")


def test_gradient_of_another_dtype_or_shape():
    param = _param(4)
    param.grad = torch.zeros(4)
    param.grad.data = torch.zeros(4, dtype=torch.float64)
    _expect_step_error(param, r"has a gradient of dtype torch.float64 but is torch.float32")
    param = _param(4)
    param.grad = torch.zeros(4)
    param.grad.data = torch.zeros(2, 2)
    _expect_step_error(param, r"has a gradient of shape \(2, 2\) but has shape \(4,\)")


def test_parameter_resized_after_the_optimizer_took_it():
    first, second = _param(4), _param(4)
    optimizer = FusedAccumSGD([first, second], lr=0.1, accumulation_steps=2)
    first.data = torch.ones(20)
    first.grad, second.grad = torch.ones(20), torch.ones(4)
    with pytest.raises(
        RuntimeError, match=r"of shape \(20,\) on cpu but was torch.float32 of shape \(4,\)"
    ):
        optimizer.step()
    assert optimizer.micro_step_count == 0 and optimizer.window_weight == 0.0
    assert second.grad is not None


def test_parameter_cast_after_the_optimizer_took_it():
    model = torch.nn.Linear(3, 2)
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1)
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(
        RuntimeError, match=r"is now torch.float64 of shape \(2, 3\) on cpu but was torch.float32"
    ):
        optimizer.step()


def test_named_parameters_name_the_culprit():
    model = torch.nn.Linear(3, 2)
    optimizer = FusedAccumSGD(model.named_parameters(), lr=0.1)
    model.bias.grad = torch.zeros(2)
    model.bias.grad.data = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"parameter 1 \(bias\) of param group 0"):
        optimizer.step()


def test_pickling_or_deep_copying_says_to_use_the_state_dict():
    optimizer = FusedAccumAdamW([_param(3)])
    with pytest.raises(TypeError, match=r"cannot be pickled or deep-copied.*state_dict\(\)"):
        copy.deepcopy(optimizer)
    with pytest.raises(TypeError, match=r"cannot be pickled or deep-copied"):
        pickle.dumps(optimizer)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_bad_gradient_in_the_steady_state_is_named_and_nothing_is_lost(backend):
    """After the window's first micro-step the gradients are folded as one list, checked
    by the compiled ops themselves: a gradient that no longer fits its buffer still gets
    the message that names its parameter, and every .grad stays where it was."""
    from fused_accum.backends import compiled

    if backend == "cpu" and compiled.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the compiled CPU kernels are not built")
    first, second = _param(4), _param(4)
    optimizer = FusedAccumSGD([first, second], lr=0.1, accumulation_steps=3, backend=backend)
    first.grad, second.grad = torch.ones(4), torch.ones(4)
    optimizer.step()
    first.data = torch.ones(20)
    first.grad, second.grad = torch.ones(20), torch.ones(4)
    with pytest.raises(
        RuntimeError, match=r"parameter 0 of param group 0 is now torch.float32 of shape \(20,\)"
    ):
        optimizer.step()
    assert first.grad is not None and second.grad is not None
    assert optimizer.micro_step_count == 1 and optimizer.window_weight == 1.0
    first.data, first.grad = torch.ones(4), torch.ones(4)
    optimizer.step()  # mended: the window goes on, the refused micro-step not counted
    torch.testing.assert_close(optimizer._accumulation.buffer_view(second), torch.full((4,), 2.0))
