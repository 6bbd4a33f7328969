"""A window's first fresh fp32 gradient becomes the parameter's buffer (adopted), as
autograd keeps the first gradient as .grad: no copy, and no flat buffer allocated. Only
gradients nobody else holds are adopted, and every result equals a run that copies."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW, FusedAccumSGD
from fused_accum._ownership import is_private

STEPS = 4
SHAPES = [(7, 5), (1,), (1023,), (3, 4, 5), (0,)]
ADOPTING = CPU_BACKENDS  # every backend adopts (Triton through its address tables)


def _params(dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in SHAPES]


def _groups(optimizer):
    return list(optimizer._accumulation.groups.values())


def _run(params, optimizer, windows, grads_of):
    """``windows`` windows of STEPS micro-steps, with ``grads_of(window, micro_step)`` giving
    each micro-step's gradients (fresh tensors, unless a test says otherwise)."""
    for window in range(windows):
        for micro_step in range(STEPS):
            _hand_over(params, grads_of(window, micro_step))
            optimizer.step()


def _hand_over(params, grads):
    """Set each .grad, keeping no reference here (a frame of its own)."""
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad


def _fresh(seed):
    def grads_of(window, micro_step):
        generator = torch.Generator().manual_seed(seed + 100 * window + micro_step)
        return [torch.randn(shape, generator=generator) for shape in SHAPES]

    return grads_of


def _assert_same(tensors, others):
    for tensor, other in zip(tensors, others, strict=True):
        assert torch.equal(tensor, other)


def _copying(optimizer):
    optimizer._accumulation.adoption = False
    return optimizer


def test_private_tensors_are_told_apart():
    def released(param):
        grad = param.grad
        param.grad = None
        return is_private(grad)

    param = torch.zeros(10, 10, requires_grad=True)
    (param * 2).sum().backward()
    assert released(param)
    param.grad = torch.randn(10, 10)
    assert released(param)
    kept = torch.randn(10, 10)
    param.grad = kept
    assert not released(param)
    param.grad = torch.randn(200)[:100].view(10, 10)  # a view: shares a storage
    assert not released(param)
    param.grad = torch.randn(10, 10)
    storage = param.grad.untyped_storage()  # all the caller keeps
    assert not released(param)
    del storage
    array = np.random.rand(10, 10).astype(np.float32)
    param.grad = torch.from_numpy(array)  # memory numpy owns: no count of torch's sees it
    assert not released(param)


@pytest.mark.parametrize("backend", ADOPTING)
def test_borrowed_and_inference_gradients_are_copied(backend):
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, accumulation_steps=STEPS, backend=backend)
    arrays = [np.random.rand(*shape).astype(np.float32) for shape in SHAPES]
    originals = [array.copy() for array in arrays]
    _hand_over(params, [torch.from_numpy(array) for array in arrays])
    optimizer.step()
    assert optimizer._accumulation.adopted == {}
    with torch.inference_mode():
        grads = [torch.randn(shape) for shape in SHAPES]
    _hand_over(params, grads)
    del grads
    optimizer.step()  # the sums are in the flat buffer: nothing to add in place to these
    optimizer.discard_window()
    with torch.inference_mode():
        grads = [torch.randn(shape) for shape in SHAPES]
    _hand_over(params, grads)
    del grads
    optimizer.step()  # a window's first inference-mode gradients: copied, not adopted
    assert optimizer._accumulation.adopted == {}
    _hand_over(params, _fresh(11)(0, 1))
    optimizer.step()  # and added to without complaint
    for array, original in zip(arrays, originals, strict=True):
        assert np.array_equal(array, original)


@pytest.mark.parametrize("backend", ADOPTING)
@pytest.mark.parametrize("cls", [FusedAccumSGD, FusedAccumAdamW])
def test_first_gradients_are_adopted_without_a_flat_buffer(backend, cls):
    torch.manual_seed(0)
    params = _params()
    optimizer = cls(params, lr=0.01, accumulation_steps=STEPS, backend=backend)
    grads = _fresh(1)(0, 0)
    addresses = [grad.data_ptr() for grad in grads]
    _hand_over(params, grads)
    del grads
    optimizer.step()
    accumulation = optimizer._accumulation
    assert all(param.grad is None for param in params)
    for param, address in zip(params, addresses, strict=True):
        if param.numel():
            assert accumulation.buffer_view(param).data_ptr() == address
    _run(params, optimizer, 3, _fresh(2))
    assert all(group._buffer is None for group in _groups(optimizer))


@pytest.mark.parametrize("backend", ADOPTING)
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (FusedAccumSGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
        (FusedAccumAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ],
    ids=["sgd", "adamw"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adopting_equals_copying_bit_for_bit(backend, cls, kwargs, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton does not run fp64 parameters (backend='auto' takes another)")
    torch.manual_seed(0)
    params = _params(dtype)
    copies = [p.detach().clone().requires_grad_() for p in params]
    adopting = cls(params, accumulation_steps=STEPS, backend=backend, **kwargs)
    copying = _copying(cls(copies, accumulation_steps=STEPS, backend=backend, **kwargs))

    def grads_of(window, micro_step):
        return [g.to(dtype) for g in _fresh(5)(window, micro_step)]

    _run(params, adopting, 3, grads_of)
    _run(copies, copying, 3, grads_of)
    assert adopting._accumulation.adopted == {}  # freed at the window's end
    _assert_same(params, copies)
    for param, copied in zip(params, copies, strict=True):
        for name, value in adopting.state[param].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(copying.state[copied][name]))


@pytest.mark.parametrize("backend", ADOPTING)
def test_a_gradient_the_caller_keeps_is_copied_and_left_alone(backend):
    torch.manual_seed(0)
    params = _params()
    copies = [p.detach().clone().requires_grad_() for p in params]
    kept = [torch.randn(shape) for shape in SHAPES]
    originals = [g.clone() for g in kept]
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=STEPS, backend=backend)
    reference = _copying(
        FusedAccumAdamW(copies, lr=0.01, accumulation_steps=STEPS, backend=backend)
    )
    # the same tensors handed over at every micro-step, as a benchmark might
    _run(params, optimizer, 2, lambda window, micro_step: kept)
    _run(copies, reference, 2, lambda window, micro_step: [g.clone() for g in originals])
    for grad, original in zip(kept, originals, strict=True):
        assert torch.equal(grad, original)
    _assert_same(params, copies)


def test_views_of_one_gradient_buffer_are_not_adopted():
    torch.manual_seed(0)
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, accumulation_steps=STEPS, backend="torch")
    flat = torch.randn(sum(p.numel() for p in params))
    original = flat.clone()
    for param, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = grad.view(param.shape)
    optimizer.step()
    assert optimizer._accumulation.adopted == {}
    for param in params[:2]:
        param.grad = torch.randn(param.shape)
    optimizer.step()
    assert torch.equal(flat, original)


@pytest.mark.parametrize(
    "kwargs,weight",
    [
        (dict(), 2.0),
        (dict(loss_scaling=True), None),
    ],
    ids=["weighted", "loss-scaling"],
)
def test_no_adoption_where_the_first_pass_does_work(kwargs, weight):
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, accumulation_steps=STEPS, **kwargs)
    _hand_over(params, _fresh(3)(0, 0))
    optimizer.step(weight=weight)
    assert optimizer._accumulation.adopted == {}


def test_adopted_gradients_are_freed_when_the_window_ends():
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, accumulation_steps=2, backend="torch")
    grads = _fresh(4)(0, 0)
    watched = weakref.ref(grads[0])
    _hand_over(params, grads)
    del grads
    optimizer.step()
    assert watched() is not None  # the buffer of params[0] now
    _hand_over(params, _fresh(4)(0, 1))
    optimizer.step()
    assert watched() is None


@pytest.mark.parametrize("finish", ["flush", "discard"])
def test_flush_and_discard_with_adopted_buffers(finish):
    torch.manual_seed(0)
    params = _params()
    copies = [p.detach().clone().requires_grad_() for p in params]
    adopting = FusedAccumAdamW(params, lr=0.01, accumulation_steps=STEPS, backend="cpu")
    copying = _copying(FusedAccumAdamW(copies, lr=0.01, accumulation_steps=STEPS, backend="cpu"))
    for optimizer, targets in ((adopting, params), (copying, copies)):
        for micro_step in range(2):
            _hand_over(targets, _fresh(6)(0, micro_step))
            optimizer.step()
        if finish == "flush":
            assert optimizer.flush()
        else:
            optimizer.discard_window()
        _run(targets, optimizer, 1, _fresh(7))
    _assert_same(params, copies)


def test_mid_window_checkpoint_of_adopted_buffers_resumes_exactly():
    torch.manual_seed(0)
    params = _params()
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=STEPS, backend="cpu")
    _run(params, optimizer, 1, _fresh(8))
    _hand_over(params, _fresh(9)(0, 0))
    optimizer.step()
    assert optimizer._accumulation.adopted
    saved = copy.deepcopy(optimizer.state_dict())  # as torch.save would keep it
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = FusedAccumAdamW(resumed_params, lr=0.01, accumulation_steps=STEPS, backend="cpu")
    resumed.load_state_dict(saved)
    for targets, opt in ((params, optimizer), (resumed_params, resumed)):
        for micro_step in range(1, STEPS):
            _hand_over(targets, _fresh(9)(0, micro_step))
            opt.step()
        assert opt.last_step_applied
    _assert_same(params, resumed_params)


def test_accumulate_in_backward_adopts_what_autograd_hands_over():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    adopting = FusedAccumSGD(
        model.parameters(), lr=0.1, accumulation_steps=3, accumulate_in_backward=True
    )
    copying = _copying(
        FusedAccumSGD(twin.parameters(), lr=0.1, accumulation_steps=3, accumulate_in_backward=True)
    )
    for micro_step in range(6):
        batch = torch.randn(4, 6)
        for net, optimizer in ((model, adopting), (twin, copying)):
            net(batch).square().mean().backward()
            if micro_step == 3:  # a window's first backward, with the hooks in place
                assert bool(optimizer._accumulation.adopted) == (optimizer is adopting)
            optimizer.step()
    assert all(group._buffer is None for group in _groups(adopting))
    for param, other in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(param, other)


def test_one_micro_step_windows_allocate_no_flat_buffer():
    params = _params()
    optimizer = FusedAccumSGD(params, lr=0.1, momentum=0.9, backend="cpu")
    _run(params, optimizer, 1, _fresh(10))
    assert all(group._buffer is None for group in _groups(optimizer))


def test_a_failed_fold_leaves_the_window_as_it_was(monkeypatch):
    torch.manual_seed(0)
    params = _params()
    copies = [p.detach().clone().requires_grad_() for p in params]
    failing = FusedAccumSGD(params, lr=0.1, accumulation_steps=2, backend="torch")
    reference = FusedAccumSGD(copies, lr=0.1, accumulation_steps=2, backend="torch")

    def window(targets, optimizer, seed):
        for micro_step in range(2):
            _hand_over(targets, _fresh(seed)(0, micro_step))
            optimizer.step(weight=2.0)  # weighted: folded by the kernel, not adopted

    window(params, failing, 12)  # leaves dead values in the buffers
    window(copies, reference, 12)
    backend = next(iter(failing._accumulation.backends.values()))

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(backend, "accumulate", broken)
    grads = _fresh(13)(0, 0)
    _hand_over(params, grads)
    with pytest.raises(RuntimeError, match="injected"):
        failing.step(weight=2.0)
    monkeypatch.undo()
    assert failing._accumulation.holds_sum == set()
    assert all(param.grad is grad for param, grad in zip(params, grads, strict=True))
    failing.discard_window()  # drops the window, not the gradients given back
    for param in params:
        param.grad = None
    window(params, failing, 14)  # a first contribution again: overwrites the dead values
    window(copies, reference, 14)
    _assert_same(params, copies)
